"""Tiny models and a tiny tokenizer, built offline in milliseconds."""

from __future__ import annotations

import torch

CORPUS = [
    "It was great. It was terrible. It was okay, good, bad.",
    "Title: Context: Question: Answer: Yes No Maybe so because",
    "the cat sat on the mat and the dog ran in the park",
    "Does this mean that is true? Can we infer that? Suppose the word have the same meaning",
    "Denmark Norway Iceland one two three red blue green a an of to in",
]


def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token=None))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tk.train_from_iterator(CORPUS * 5, trainer)
    from tokenizers import processors

    tk.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    tok.padding_side = "left"
    return tok


def tiny_gemma(vocab_size: int, seed: int = 0, sliding_window: int = 16, layers: int = 2):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=sliding_window,
        max_position_embeddings=512, layer_types=["sliding_attention", "full_attention"] * (layers // 2),
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    return Gemma3ForCausalLM(cfg).eval()


def tiny_llama(vocab_size: int, seed: int = 0, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    return LlamaForCausalLM(cfg).eval()

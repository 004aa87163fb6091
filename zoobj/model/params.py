"""Parameter sets: which tensors MeZO perturbs, and everything that follows from that.

The contract is ``ParamSet``; one small class per ``--peft`` value fills it:

- ``FullParams`` (``none``): every weight, or the decoder blocks ``--layers`` names
  (plus the final norm); the token embeddings only with ``train_embeddings``.
- ``LoraParams`` (``lora``): LoRA adapters on the attention q/v projections (peft).
- ``PrefixParams`` (``prefix``): prefix tuning (peft), initialised from real tokens.
- ``TemplateParams`` (``template``): the input vectors of the prompt's closing template
  tokens (``zoobj.model.template``).

``make_param_set`` builds one from the run's settings; ``trainable_parameters`` is the
one-call form (the set's ``attach``). No code outside these classes asks which set a
run trains.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch

from zoobj.errors import ConfigError
from zoobj.model import blocks, template
from zoobj.model.blocks import output_head
from zoobj.model.kv import cache_out
from zoobj.model.prefix import SharedPrefix
from zoobj.model.tail_probes import PromptBodyStore

Named = list[tuple[str, torch.Tensor]]
OnDisable = Callable[[str], None] | None


class ParamSet(Protocol):
    """What a parameter set says about itself.

    - ``name``: its ``--peft`` value; ``lr`` and ``eps``: its defaults, in the units of
      its own tensors; ``paper``: whether they are the paper's (Malladi et al. 2023,
      Tables 15-16) or zoobj's own.
    - ``attach(model, tok) -> (model, [(name, tensor), ...])``: the model to train (a
      peft wrapper, or the model with a template tail attached) and the trained
      tensors in a fixed order (the noise is keyed by that order).
    - ``record() -> dict``: what ``config.json`` holds (under ``param_set``) to rebuild
      it exactly; ``attach`` of a set made from that record trains the same tensors.
    - ``fast_path(model, params, on_disable) -> (store or None, note)``: the store that
      computes once per batch what its perturbations cannot change (``SharedPrefix`` or
      ``PromptBodyStore``), or None and why not (``""``: nothing to say).
    - ``save(model, tok, folder) -> str``: the trained model as a folder (``zoobj export``)
      and how to use it (a paragraph of its model card); ``plain``: whether that folder
      loads with plain transformers as the trained model.
    - optional, ``unit(model, params) -> float``: what one unit of ``lr`` and ``eps`` is in
      the trained tensors (the template tail: the RMS of its tokens' input vectors, so the
      same settings carry from one model to another); absent means 1 (absolute units,
      as the paper's sets give them).
    """

    name: str
    lr: float
    eps: float
    paper: bool
    plain: bool

    def attach(self, model, tok) -> tuple[object, Named]: ...

    def record(self) -> dict: ...

    def fast_path(self, model, params: list, on_disable: OnDisable = None) -> tuple[object | None, str]: ...

    def save(self, model, tok, folder: Path) -> str: ...


def _is_embedding(name: str, model) -> bool:
    emb = model.get_input_embeddings()
    out = output_head(model)
    param = dict(model.named_parameters()).get(name)
    return param is not None and any(m is not None and param is m.weight for m in (emb, out))


def _text(tok, ids: list[int]) -> str:
    return tok.decode(list(ids))


PLAIN_USE = ("`AutoModelForCausalLM.from_pretrained(folder)` and `AutoTokenizer.from_pretrained(folder)` load it "
             "with plain transformers; prompt it with the task's template, as zoobj does.")


def _save_plain(model, tok, folder: Path) -> str:
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return PLAIN_USE


class FullParams:
    """Every weight of the model (full-parameter MeZO), except the token embeddings
    unless ``train_embeddings`` (with a 262k vocabulary they are 64% of Gemma-3-270M and
    cost noise time while changing little); ``layers`` (``top:K`` or ``A-B``, see
    ``zoobj.model.blocks``) keeps those decoder blocks plus the final norm."""

    name, lr, eps, paper, plain = "none", 1e-6, 1e-3, True, True

    def __init__(self, train_embeddings: bool = False, layers: str | None = None) -> None:
        if layers and train_embeddings:
            raise ConfigError("--layers with --train-embeddings: the embeddings lie below every block; "
                              "choose one of the two")
        self.train_embeddings, self.layers = train_embeddings, layers

    def attach(self, model, tok) -> tuple[object, Named]:
        named = [(n, p) for n, p in model.named_parameters() if self.train_embeddings or not _is_embedding(n, model)]
        return model, blocks.select(model, named, self.layers) if self.layers else named

    def record(self) -> dict:
        return {"kind": self.name, "train_embeddings": self.train_embeddings, "layers": self.layers}

    def fast_path(self, model, params: list, on_disable: OnDisable = None) -> tuple[object | None, str]:
        return SharedPrefix.build(model, params, on_disable)

    def save(self, model, tok, folder: Path) -> str:
        return _save_plain(model, tok, folder)


class LoraParams:
    """LoRA adapters from ``peft`` (r=8, alpha=16 on the attention q/v projections, or
    only those inside ``layers``); the base weights stay frozen. Adapter init is seeded
    by ``seed``. Saved merged into the weights: a plain transformers model."""

    name, lr, eps, paper, plain = "lora", 1e-4, 1e-2, True, True

    def __init__(self, seed: int = 0, r: int = 8, alpha: int = 16, layers: str | None = None) -> None:
        self.seed, self.r, self.alpha, self.layers = seed, r, alpha, layers

    def _targets(self, model) -> list[str]:
        targets = [m for m in ("q_proj", "v_proj") if any(n.endswith(m) for n, _ in model.named_modules())]
        if not targets:
            raise ConfigError("--peft lora: this model has no q_proj / v_proj modules to adapt")
        if self.layers:  # the full names of the q/v projections inside the chosen blocks
            prefix, chosen = blocks.resolve(model, self.layers)
            targets = [n for n, _ in model.named_modules()
                       if n.rsplit(".", 1)[-1] in targets and blocks.block_of(n, prefix) in set(chosen)]
        return targets

    def attach(self, model, tok) -> tuple[object, Named]:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise ConfigError("--peft lora needs the peft package: pip install peft") from None
        targets = self._targets(model)
        torch.manual_seed(self.seed)
        model = get_peft_model(model, LoraConfig(r=self.r, lora_alpha=self.alpha, target_modules=targets,
                                                 lora_dropout=0.0, task_type="CAUSAL_LM"))
        model.eval()
        return model, [(n, p) for n, p in model.named_parameters() if "lora_" in n]

    def record(self) -> dict:
        return {"kind": self.name, "r": self.r, "alpha": self.alpha, "layers": self.layers, "seed": self.seed}

    def fast_path(self, model, params: list, on_disable: OnDisable = None) -> tuple[object | None, str]:
        return SharedPrefix.build(model, params, on_disable)

    def save(self, model, tok, folder: Path) -> str:
        return _save_plain(copy.deepcopy(model).merge_and_unload(), tok, folder)


def _word_ids(tok, vocab_size: int) -> list[int]:
    """Token ids that are plain words (letters only, 3+ characters), for prefix initialisation."""
    if tok is None:
        return list(range(vocab_size))
    special = set(getattr(tok, "all_special_ids", []) or [])
    pieces = tok.convert_ids_to_tokens(list(range(min(vocab_size, len(tok)))))
    ids = [i for i, t in enumerate(pieces) if i not in special and isinstance(t, str)
           and len(w := t.lstrip("\u2581\u0120 ")) >= 3 and w.isascii() and w.isalpha()]
    return ids or list(range(vocab_size))


def init_prefix_from_tokens(model, ids: list[int]) -> None:
    """Set a peft prefix to the keys and values the base model computes for the tokens
    ``ids`` (prefix tuning's "real activation" initialisation, Li & Liang 2021, as in
    MeZO's code): the prefix then reads like a few ordinary words before the prompt, so
    step 0 is close to the zero-shot model instead of random keys and values at every layer."""
    cfg = model.active_peft_config
    base = model.get_base_model()
    heads, layers = cfg.num_attention_heads, cfg.num_layers
    if len(ids) != cfg.num_virtual_tokens:
        raise ValueError(f"need {cfg.num_virtual_tokens} token ids, got {len(ids)}")
    device = next(base.parameters()).device
    with torch.no_grad():
        out = base(input_ids=torch.tensor([ids], device=device), use_cache=True)
        rows = []
        for layer in cache_out(out).layers[:layers]:
            k, v = layer.keys[0], layer.values[0]  # [heads, tokens, head_dim]
            if k.shape[0] != heads:
                raise ValueError(f"prefix has {heads} heads per layer, the model's cache {k.shape[0]}")
            rows += [k.permute(1, 0, 2), v.permute(1, 0, 2)]  # peft's layout: [tokens, 2*layers, heads, head_dim]
        weight = torch.stack(rows, dim=1).reshape(len(ids), -1)
        emb = model.prompt_encoder[model.active_adapter].embedding
        emb.weight.copy_(weight.to(emb.weight.dtype))


class PrefixParams:
    """Prefix tuning from ``peft`` (5 virtual tokens per layer), initialised with the
    model's own keys and values of 5 word tokens drawn with ``seed`` (from the
    tokenizer's plain words when ``tok`` is given). It cannot be merged into the
    weights: saved as a peft adapter folder (``peft.AutoPeftModelForCausalLM``)."""

    name, lr, eps, paper, plain = "prefix", 1e-2, 1e-1, True, False

    def __init__(self, seed: int = 0, tokens: int = 5) -> None:
        self.seed, self.tokens = seed, tokens

    def attach(self, model, tok) -> tuple[object, Named]:
        try:
            from peft import PrefixTuningConfig, get_peft_model
        except ImportError:
            raise ConfigError("--peft prefix needs the peft package: pip install peft") from None
        torch.manual_seed(self.seed)
        # peft's prefix cache works with zoobj's own decoding loop (which passes the KV
        # cache back as ``cache=``); peft + transformers 5.24 ``generate`` drops the prefix.
        model = get_peft_model(model, PrefixTuningConfig(num_virtual_tokens=self.tokens, task_type="CAUSAL_LM"))
        words = _word_ids(tok, model.get_base_model().config.vocab_size)
        pick = torch.randperm(len(words), generator=torch.Generator().manual_seed(self.seed))[: self.tokens]
        init_prefix_from_tokens(model, [words[i] for i in pick.tolist()])
        model.eval()
        return model, [(n, p) for n, p in model.named_parameters() if "prompt_encoder" in n]

    def record(self) -> dict:
        return {"kind": self.name, "tokens": self.tokens, "seed": self.seed}

    def fast_path(self, model, params: list, on_disable: OnDisable = None) -> tuple[object | None, str]:
        return SharedPrefix.build(model, params, on_disable)  # says why not: the prefix acts below every block

    def save(self, model, tok, folder: Path) -> str:
        """A peft adapter folder: a prefix is keys and values at every layer, not weights
        that plain transformers could hold."""
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        return ("Prefix tuning has no plain-transformers form: this folder is a peft adapter. Load it with "
                "`peft.AutoPeftModelForCausalLM.from_pretrained(folder)` (its base model must be reachable) or "
                "`zoobj eval --model folder`; prompt it with the task's template.")


class TemplateParams:
    """One trained input vector for each token of the template's tail, the tokens every
    prompt of the task ends with (``zoobj.model.template``); the base weights stay
    frozen. The tail comes from ``tail`` (token ids: a recorded run's), else from
    ``find_tail()`` when attached (the task's template and training rows). The defaults
    are zoobj's own, from the SQuAD dev sweep (docs/results.md, SQuAD)."""

    name, lr, eps, paper, plain = "template", 0.2, 0.2, False, True  # in units of the tail vectors' RMS (unit)

    def __init__(self, tail: list[int] | None = None, find_tail: Callable[[object], list[int]] | None = None) -> None:
        self.tail, self.find_tail, self.text = tail, find_tail, None

    def attach(self, model, tok) -> tuple[object, Named]:
        """The tail from the record where there is one -- refused if the task's prompts no
        longer end with it -- else found from the task."""
        found = list(self.find_tail(tok)) if self.find_tail is not None and tok is not None else None
        if self.tail is None:
            if found is None:
                raise ConfigError("--peft template needs the task's closing tokens (zoobj.model.template.template_tail)")
            self.tail = found
        elif found is not None and found[-len(self.tail):] != list(self.tail):
            raise ConfigError(f"--peft template: the task's prompts now end with {_text(tok, found)!r}, but this run "
                              f"trained the tail {_text(tok, self.tail)!r} (token ids {list(self.tail)}): the task's "
                              "template changed since the run was made; use the template it was made with")
        self.text = _text(tok, self.tail) if tok is not None else None
        model, named = template.attach(model, self.tail)
        model.eval()
        return model, named

    def record(self) -> dict:
        return {"kind": self.name, "tail": self.tail, "text": self.text}

    def unit(self, model, params: list) -> float:
        """The RMS of the tail tokens' input vectors as the model embeds them (Gemma-3-270M:
        1.03, its rows scaled by sqrt(640); SmolLM2-135M: 0.12): lr and eps are fractions
        of it, so a step moves the tail by the same share of its size on either model."""
        tail = template.find(model)
        with torch.no_grad():
            rows = tail.base(tail.tail.unsqueeze(0)).float()
        return float(rows.pow(2).mean().sqrt())

    def fast_path(self, model, params: list, on_disable: OnDisable = None) -> tuple[object | None, str]:
        tail = template.find(model)
        if tail is not None and len(params) == 1 and params[0] is tail.delta:
            return PromptBodyStore.build(model, tail, on_disable)
        return SharedPrefix.build(model, params, on_disable)

    def save(self, model, tok, folder: Path) -> str:
        """A plain transformers model whose tokenizer has one added token per tail token,
        their input rows holding the trained vectors (``template.as_added_tokens``); the
        tail's record beside it (``template.FILE``) lets zoobj's own loading answer the
        task's usual prompts as the trained model."""
        plain, plain_tok, record = template.as_added_tokens(model, tok)
        plain.save_pretrained(folder)
        plain_tok.save_pretrained(folder)
        template.save(folder, record)
        added = "".join(record["tokens"])
        return (f"`AutoModelForCausalLM.from_pretrained(folder)` and `AutoTokenizer.from_pretrained(folder)` load it "
                f"with plain transformers. The trained prompt ending is {len(record['tokens'])} added tokens, `{added}`: "
                f"end each prompt with them in place of the template's closing words {record['text']!r} "
                f"(token ids {record['tail']} -> {record['ids']}). With the template's own words the model answers "
                "as the base model did. The added tokens are never outputs: `generate` suppresses them "
                "(generation_config.json); if you take the argmax of the logits yourself, leave their columns out. "
                "`zoobj eval --model folder --task ...` puts the trained ending in by itself.")


PARAM_SETS = {cls.name: cls for cls in (FullParams, LoraParams, PrefixParams, TemplateParams)}


def make_param_set(peft: str = "none", *, train_embeddings: bool = False, seed: int = 0, layers: str | None = None,
                   lora_r: int = 8, lora_alpha: int = 16, prefix_tokens: int = 5, tail: list[int] | None = None,
                   find_tail: Callable[[object], list[int]] | None = None, recorded: dict | None = None) -> ParamSet:
    """The parameter set ``--peft`` names, with its options; a ConfigError for an unknown
    name or an option that does not apply to it. ``recorded``: a run's ``record()`` (its
    config.json ``param_set``), whose template tail is used as recorded."""
    if peft not in PARAM_SETS:
        raise ConfigError(f"unknown --peft {peft!r}; choose one of {', '.join(PARAM_SETS)}")
    if layers and peft in ("prefix", "template"):
        raise ConfigError(f"--layers does not apply to --peft {peft} (it acts below every layer); "
                          "use --peft lora or full parameters, or leave --layers out")
    if peft == "none":
        return FullParams(train_embeddings, layers)
    if peft == "lora":
        return LoraParams(seed, lora_r, lora_alpha, layers)
    if peft == "prefix":
        return PrefixParams(seed, prefix_tokens)
    return TemplateParams(tail if tail is not None else (recorded or {}).get("tail"), find_tail)


def trainable_parameters(model, peft: str = "none", train_embeddings: bool = False, seed: int = 0,
                         lora_r: int = 8, lora_alpha: int = 16, prefix_tokens: int = 5, tok=None,
                         layers: str | None = None, template_tail: list[int] | None = None):
    """Choose what MeZO perturbs: ``make_param_set(...).attach(model, tok)``. Returns
    ``(model, [(name, tensor), ...])`` in a fixed order."""
    ps = make_param_set(peft, train_embeddings=train_embeddings, seed=seed, layers=layers, lora_r=lora_r,
                        lora_alpha=lora_alpha, prefix_tokens=prefix_tokens, tail=template_tail)
    return ps.attach(model, tok)


def load_saved(model, folder: str | Path):
    """A model loaded from an exported folder, with what its parameter set saved beside
    the weights attached (a template tail); unchanged for the others."""
    return template.load_into(model, folder)

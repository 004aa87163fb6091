"""The decoder blocks of a causal LM: where they are, and which of them train (``--layers``).

A Hugging Face decoder-only model keeps its blocks in one ``nn.ModuleList`` as long as
the config's layer count (``model.layers`` in Llama and Gemma, ``decoder.layers`` in
OPT, ``transformer.h`` in GPT-2, ``gpt_neox.layers`` ...); ``find_blocks`` looks for
that list rather than for a name, so a peft wrapper or an unfamiliar family is found
the same way, and ``None`` (an architecture it cannot read) means "no per-layer
choices here".

- ``parse_layers("top:4", 18)`` -> ``[14, 15, 16, 17]``; ``"12-17"`` -> blocks 12 to 17.
- ``select(model, named, layers)`` keeps the trained tensors inside those blocks, plus
  the final norm where one sits beside the blocks (full-parameter training).
- ``swapped_forwards(modules, forwards)``: give modules another ``forward`` for a call
  (``pass_through`` skips a block), without touching model code.
- ``lowest_trained_block(model, params)``: the cut below which nothing a step perturbs
  can change the computation (``zoobj.model.prefix``), or ``None`` when a trained tensor
  lies outside the blocks and below them (embeddings, a prefix).

>>> parse_layers("top:2", 6), parse_layers("1-3", 6), parse_layers("4", 6)
([4, 5], [1, 2, 3], [4])
"""

from __future__ import annotations

import re
from contextlib import contextmanager

import torch

from zoobj.errors import ConfigError

_NORM = re.compile(r"(^|\.)(norm|final_layer_?norm|ln_f|norm_f|final_norm)$")


def _config(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = base.config
    return getattr(cfg, "text_config", None) or cfg


def layer_count(model) -> int | None:
    cfg = _config(model)
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(getattr(cfg, key, None), int):
            return getattr(cfg, key)
    return None


def find_blocks(model) -> tuple[str, torch.nn.ModuleList] | None:
    """``(qualified name, the ModuleList of decoder blocks)``, or None where there is not
    exactly one ModuleList as long as the config's layer count."""
    n = layer_count(model)
    if not n:
        return None
    found = [(name, m) for name, m in model.named_modules()
             if isinstance(m, torch.nn.ModuleList) and len(m) == n and name]
    # peft may hold ModuleLists of adapters inside each block: keep the outermost
    found = [(name, m) for name, m in found if not any(name.startswith(o + ".") for o, _ in found)]
    return found[0] if len(found) == 1 else None


def block_of(name: str, prefix: str) -> int | None:
    """The block index a parameter or module name lies in, or None outside the blocks."""
    if not name.startswith(prefix + "."):
        return None
    head = name[len(prefix) + 1:].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def parse_layers(text: str, n: int) -> list[int]:
    """``top:K`` (the last K blocks), ``A-B`` (A to B, 0-based, inclusive) or ``A``."""
    spec = text.strip()
    try:
        if spec.startswith("top:"):
            k = int(spec[4:])
            if not 1 <= k <= n:
                raise ValueError
            return list(range(n - k, n))
        lo, _, hi = spec.partition("-")
        lo, hi = int(lo), int(hi or lo)
        if not 0 <= lo <= hi < n:
            raise ValueError
        return list(range(lo, hi + 1))
    except ValueError:
        raise ConfigError(f"--layers {text!r}: give top:K (1 <= K <= {n}) or A-B (0 <= A <= B <= {n - 1}); "
                          f"this model has {n} decoder blocks") from None


def final_norm_names(model, prefix: str) -> list[str]:
    """Parameters of the norm that follows the blocks: a module beside the block list named like a norm."""
    parent = prefix.rsplit(".", 1)[0] if "." in prefix else ""
    out = []
    for name, _ in model.named_parameters():
        module = name.rsplit(".", 1)[0]
        owner = module.rsplit(".", 1)[0] if "." in module else ""
        if owner == parent and _NORM.search(module):
            out.append(name)
    return out


def resolve(model, layers: str) -> tuple[str, list[int]]:
    """The blocks' name and the chosen indices, or a ConfigError naming the problem."""
    found = find_blocks(model)
    if found is None:
        raise ConfigError(f"--layers: cannot find the decoder blocks of this model ({type(model).__name__}: "
                          "no single ModuleList as long as its config's layer count); leave --layers out")
    return found[0], parse_layers(layers, len(found[1]))


def select(model, named: list[tuple[str, torch.Tensor]], layers: str) -> list[tuple[str, torch.Tensor]]:
    """The (name, tensor) pairs of ``named`` inside the chosen blocks, plus the final norm."""
    prefix, chosen = resolve(model, layers)
    keep = set(chosen)
    norm = set(final_norm_names(model, prefix))
    return [(n, p) for n, p in named if block_of(n, prefix) in keep or n in norm]


def trained_blocks(model, params: list[torch.Tensor]) -> list[int] | None:
    """The sorted block indices holding a trained tensor (None: blocks not found)."""
    found = find_blocks(model)
    if found is None:
        return None
    ids = {id(p) for p in params}
    return sorted({b for n, p in model.named_parameters() if id(p) in ids
                   and (b := block_of(n, found[0])) is not None})


def lowest_trained_block(model, params: list[torch.Tensor]) -> int | None:
    """The lowest block holding a trained tensor: blocks below it, and the embeddings,
    compute the same for every perturbation of a step. None where that cannot be said:
    blocks not found, or a trained tensor outside the blocks that is not the final norm
    or an untied output head (embeddings, a prefix encoder: those act below every block)."""
    found = find_blocks(model)
    if found is None or not params:
        return None
    prefix = found[0]
    ids = {id(p) for p in params}
    norm = set(final_norm_names(model, prefix))
    head = output_head(model)
    emb = model.get_input_embeddings()
    lowest = len(found[1])
    for name, p in model.named_parameters():
        if id(p) not in ids:
            continue
        b = block_of(name, prefix)
        if b is not None:
            lowest = min(lowest, b)
        elif name in norm or (head is not None and p is head.weight and p is not emb.weight):
            continue
        else:
            return None
    return lowest


def output_head(model):
    """The module that turns final hidden states into logits (``get_output_embeddings``), or None."""
    return model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None


def pass_through(hidden_states, *args, **kwargs):
    """A block (or head) that returns its input unchanged."""
    return hidden_states


@contextmanager
def swapped_forwards(modules: list[torch.nn.Module], forwards: list):
    """Give each module an instance ``forward`` for the duration, then restore what it had
    (its hooks still run: a perturbation hook sees the call as usual)."""
    saved = [m.__dict__.get("forward") for m in modules]
    try:
        for m, f in zip(modules, forwards):
            m.forward = f
        yield
    finally:
        for m, f in zip(modules, saved):
            if f is None:
                m.__dict__.pop("forward", None)
            else:
                m.forward = f

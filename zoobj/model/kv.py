"""KV-cache and batching helpers that the prediction code and the fast paths share.

Public on purpose: ``zoobj.model.inference`` (scoring, decoding, target NLL),
``zoobj.model.prefix`` (shared lower blocks) and ``zoobj.model.tail_probes`` (template
tail probes together) all use them, and none of them reaches into another's privates.

- the cache argument and output of a forward, across transformers versions
  (``cache_kw``, ``cache_out``), and left-padded stacking of per-row caches
  (``stack_caches``);
- prompts to padded batches (``encode``, ``left_pad``, ``positions``, ``batches``);
- whether a sliding-window layer keeps a whole prompt (``keeps_whole_prompt``);
- the tokens that end a generated answer (``stop_ids``, ``stop_tensor``);
- ``BatchStore``: states computed once per batch, dropped when the prompts or the
  watched weights change; ``FastPathUnavailable``: a fast path cannot serve this model
  or batch, and the caller runs the plain one.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import torch


class FastPathUnavailable(RuntimeError):
    """A fast path (shared lower blocks, prompt bodies, probes together) cannot serve this
    model or batch; the message says why, and the caller runs the plain path."""


def device_of(model) -> torch.device:
    """Where the model's (first) weights live."""
    return next(model.parameters()).device


def cache_kw(model) -> str:
    """transformers 5 calls the KV cache argument ``cache``; earlier versions ``past_key_values``."""
    name = getattr(model, "_zoobj_cache_kw", None)
    if name is None:
        # a peft wrapper takes **kwargs: ask the model underneath (peft's prefix tuning
        # only keeps a cache passed under the name the base model uses)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        params = inspect.signature(base.forward).parameters
        name = "cache" if "cache" in params else "past_key_values"
        try:
            model._zoobj_cache_kw = name
        except AttributeError:  # pragma: no cover
            pass
    return name


def cache_out(out):
    """The KV cache a forward returned, under either name."""
    return out.get("cache", None) if "cache" in out else out.get("past_key_values", None)


def encode(tok, texts: Sequence[str], special: bool) -> list[list[int]]:
    """Token ids of each text (``special``: with the tokenizer's special tokens, as a prompt)."""
    return [tok(t, add_special_tokens=special)["input_ids"] for t in texts]


def encode_candidates(tok, candidates: Sequence[Sequence[str]]) -> list[list[list[int]]]:
    """Token ids of each row's candidate continuations (no special tokens); a candidate
    that encodes to no tokens is a ValueError naming it."""
    ids = [encode(tok, cs, special=False) for cs in candidates]
    for cs, row in zip(candidates, ids):
        for c, i in zip(cs, row):
            if not i:
                raise ValueError(f"candidate {c!r} encodes to no tokens")
    return ids


def left_pad(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, attention mask)`` of the sequences, left-padded to the longest."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(s)
            mask[i, width - len(s):] = 1
    return ids.to(device), mask.to(device)


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch (padding at position 0)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def batches(n: int, size: int):
    """``range``s of at most ``size`` consecutive indices covering ``0 .. n-1``."""
    for start in range(0, n, size):
        yield range(start, min(n, start + size))


def keeps_whole_prompt(model, width: int) -> bool:
    """Whether a prompt this long keeps every key in a sliding-window layer's cache (a cut
    cache can be neither stacked with others nor shared)."""
    window = getattr(model.config, "sliding_window", None) or 0
    return not window or width < window - 1


def stack_caches(model, caches: list, lengths: list[int], width: int):
    """Per-row KV caches (row i holding ``lengths[i]`` positions) left-padded into one
    batch cache of ``width``; None where they cannot be (no per-layer tensors, a cache
    class that takes no config, or a row a sliding-window layer has cut)."""
    from torch.nn.functional import pad as fpad

    if not all(hasattr(c, "layers") for c in caches):
        return None
    try:
        merged = type(caches[0])(config=model.config)
    except TypeError:
        return None
    for li in range(len(caches[0].layers)):
        ks, vs = [], []
        for c, n in zip(caches, lengths):
            k, v = c.layers[li].keys, c.layers[li].values
            if k is None or k.shape[-2] != n:
                return None
            ks.append(fpad(k, (0, 0, width - n, 0)))
            vs.append(fpad(v, (0, 0, width - n, 0)))
        merged.update(torch.cat(ks), torch.cat(vs), li)
    return merged


def stop_ids(tok) -> set[int]:
    """Token ids that end an answer: eos, and every token whose text holds a newline."""
    cached = getattr(tok, "_zoobj_stop_ids", None)
    if cached is not None:
        return cached
    stops = {i for i in (tok.eos_token_id,) if i is not None}
    for piece, idx in tok.get_vocab().items():
        if "\n" in piece or piece in ("Ċ", "<0x0A>"):
            stops.add(idx)
    try:
        tok._zoobj_stop_ids = stops
    except AttributeError:  # pragma: no cover
        pass
    return stops


def stop_tensor(tok, dev) -> torch.Tensor:
    """``stop_ids`` as a sorted tensor on ``dev``, for greedy decoding."""
    return torch.tensor(sorted(stop_ids(tok)), device=dev)


def target_nll(logits: torch.Tensor, target: Sequence[int]) -> float:
    """Summed negative log-likelihood of ``target`` where ``logits[j]`` predicts ``target[j]``."""
    ids = torch.tensor(list(target), device=logits.device)[:, None]
    return -float((logits.gather(-1, ids)[:, 0] - torch.logsumexp(logits, dim=-1)).sum())


class BatchStore:
    """States computed once per batch of prompts (a fast path's store), dropped when the
    batch's prompts change or any tensor in ``watched`` has been written in place since
    (its version counter moved); and the switch to the plain path (``disable``), which
    tells ``on_disable`` once, with the reason."""

    def __init__(self, watched: list[torch.Tensor], on_disable: Callable[[str], None] | None = None) -> None:
        self.watched = watched
        self.entries: dict = {}
        self.disabled: str | None = None  # why the plain path runs from now on
        self.on_disable = on_disable
        self._batch: frozenset | None = None
        self._version: int | None = None

    def _fingerprint(self) -> int:
        return sum(p._version for p in self.watched)

    def begin(self, keys) -> None:
        """A prediction call over these prompts starts: drop what belongs to another batch
        or to weights that have changed since it was stored."""
        batch, version = frozenset(keys), self._fingerprint()
        if batch != self._batch or version != self._version:
            self.entries.clear()
            self._batch, self._version = batch, version

    def disable(self, why: str) -> None:
        if self.disabled is None:
            self.disabled = why
            self.entries.clear()
            if self.on_disable is not None:
                self.on_disable(why)

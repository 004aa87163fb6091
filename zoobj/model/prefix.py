"""The frozen lower blocks, computed once per step (``--layers``, LoRA on the upper blocks).

Within a MeZO step only the trained tensors move. When they all sit in decoder blocks
``cut`` and above (``--layers top:K``, LoRA on the upper blocks), the embeddings and
blocks ``0 .. cut-1`` compute the same thing over a prompt for every one of the 2N
probes: their output hidden states and their keys and values. ``SharedPrefix`` keeps
those, per prompt (generation) or per padded batch (scoring), and a probe runs only
blocks ``cut ..`` over the prompt, then decodes with a cache assembled from the shared
lower layers and its own upper ones. Decoding shares too: the lower blocks' work on a
generated token depends only on the tokens before it, and the probes of one step
mostly generate the same answers, so it is stored per token path (prompt and tokens so
far) and a decoding step whose every row is stored runs only the upper blocks.

How, without touching model code: a probe's forward is the model's own forward with
blocks ``0 .. cut-2`` passing their input through and block ``cut-1`` returning the
stored hidden states (the instance's ``forward`` is swapped for the call, then put
back); the lower pass is the model's forward with blocks ``cut ..`` passing through,
block ``cut-1``'s output caught by a hook. Masks, positions and rotary embeddings are
the model's own. Where this cannot work the caller is told why (``SharedPrefix.build``
returns the reason) and runs the plain path:

- a trained tensor below every block (embeddings, a prefix: ``blocks.lowest_trained_block``);
- no block list found, or blocks that do not return a plain tensor (older transformers);
- a model spread over devices (accelerate's hooks own each block's ``forward``);
- per batch: a prompt longer than a sliding-window layer keeps (its cache is cut).

The store is invalidated when the batch's prompts change and when any tensor below the
cut has been written in place since (its version counter moved), so a stale cache is
never used.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from zoobj.model import blocks
from zoobj.model.kv import BatchStore, FastPathUnavailable, cache_out


class SharedPrefix:
    """The frozen lower blocks' hidden states and keys/values for the current batch."""

    def __init__(self, model, cut: int, prefix: str, block_list: torch.nn.ModuleList,
                 params: list[torch.Tensor], on_disable: Callable[[str], None] | None = None) -> None:
        self.model, self.cut, self.prefix, self.block_list = model, cut, prefix, block_list
        trained = {id(p) for p in params}
        # what the stored states depend on: the lower blocks, and the untrained tensors
        # outside the blocks (embeddings; a frozen final norm or head is harmless here)
        watched = [p for n, p in model.named_parameters() if id(p) not in trained
                   and ((b := blocks.block_of(n, prefix)) is None or b < cut)]
        self.store = BatchStore(watched, on_disable)  # per batch; ``store.disabled``: why the plain path runs
        self.hits = self.misses = 0  # prompts (or padded batches) found in the store / computed
        self.decode_hits = self.decode_misses = 0  # decoding steps that ran the upper blocks only / all

    # ------------------------------------------------------------------ construction

    @classmethod
    def build(cls, model, params: list[torch.Tensor],
              on_disable: Callable[[str], None] | None = None) -> tuple[SharedPrefix | None, str]:
        """``(SharedPrefix, description)``, ``(None, why the plain path runs)``, or ``(None, "")``
        where block 0 trains (nothing lies below it)."""
        found = blocks.find_blocks(model)
        if found is None:
            return None, "no decoder block list found in this model"
        devices = set((getattr(model, "hf_device_map", None) or {}).values())
        if len(devices) > 1:
            return None, "the model is spread over several devices"
        cut = blocks.lowest_trained_block(model, params)
        if cut is None:
            return None, "a trained tensor acts below every block (embeddings or a prefix)"
        if cut == 0:  # nothing below the trained blocks: not a fallback, there is nothing to share
            return None, ""
        prefix, block_list = found
        return cls(model, cut, prefix, block_list, params, on_disable), f"blocks 0-{cut - 1} computed once per step, {len(block_list) - cut} per probe"

    # ------------------------------------------------------------------ the two passes

    def _catching(self, skip: list, **call):
        """The model's forward with the modules ``skip`` passing their input through:
        (its output, the hidden states after block cut-1)."""
        caught = {}
        handle = self.block_list[self.cut - 1].register_forward_hook(lambda _m, _a, output: caught.update(h=output))
        try:
            with blocks.swapped_forwards(skip, [blocks.pass_through] * len(skip)):
                out = self.model(**call)
        finally:
            handle.remove()
        h = caught.get("h")
        if not isinstance(h, torch.Tensor):
            raise FastPathUnavailable("its decoder blocks return a tuple, not a tensor (an older transformers)")
        return out, h

    def _upper(self, h: torch.Tensor, kv: list, **call):
        """The model's forward from the cut up, ``h`` standing for block cut-1's output;
        then the lower layers' keys and values ``kv`` join the output's cache (in place)."""
        lower = list(self.block_list)[: self.cut]

        def inject(hidden_states, *args, **kwargs):
            return h

        with blocks.swapped_forwards(lower, [blocks.pass_through] * (self.cut - 1) + [inject]):
            out = self.model(**call)
        cache = cache_out(out)
        for i, (k, v) in enumerate(kv):
            cache.update(k, v, i)
        return out

    def _lower(self, key, **inputs):
        """Blocks below the cut over these inputs: (hidden states after block cut-1, [(k, v)] per lower layer)."""
        entry = self.store.entries.get(key)
        if entry is not None:
            self.hits += 1
            return entry
        self.misses += 1
        skip = list(self.block_list)[self.cut:]  # the upper blocks, and the head (its output is not wanted)
        head = blocks.output_head(self.model)
        if isinstance(head, torch.nn.Module):
            skip.append(head)
        out, h = self._catching(skip, **inputs, use_cache=True, logits_to_keep=1)
        cache = cache_out(out)
        self.store.entries[key] = entry = (h, [(cache.layers[i].keys, cache.layers[i].values) for i in range(self.cut)])
        return entry

    def forward(self, key, logits_to_keep: int = 1, **inputs):
        """The model's output for ``inputs`` (logits of the last ``logits_to_keep``
        positions, a full cache), computing only the blocks from the cut up; ``key``
        names the inputs in the store."""
        h, kv = self._lower(key, **inputs)
        return self._upper(h, kv, **inputs, use_cache=True, logits_to_keep=logits_to_keep)

    def decode(self, keys: list, **inputs):
        """One decoding step of a batch whose rows have the token paths ``keys`` (the
        prompt and the tokens generated so far, the newest included), with the probe's
        cache among ``inputs``. Where every row's path is stored, only the blocks from
        the cut up run and the stored lower keys and values join the cache; otherwise
        the whole model runs and what its lower blocks made is stored for every row.
        (Probes of one step mostly generate the same tokens: most steps are hits.)"""
        entries = [self.store.entries.get(k) for k in keys]
        if all(e is not None for e in entries):
            self.decode_hits += 1
            kv = [(torch.cat([e[1][i][0] for e in entries]), torch.cat([e[1][i][1] for e in entries]))
                  for i in range(self.cut)]
            return self._upper(torch.cat([e[0] for e in entries]), kv, **inputs, use_cache=True)
        self.decode_misses += 1
        out, h = self._catching([], **inputs, use_cache=True)
        cache = cache_out(out)
        # copies of this token's rows: a view would keep the step's whole cache alive
        layers = [(cache.layers[i].keys[:, :, -1:].clone(), cache.layers[i].values[:, :, -1:].clone())
                  for i in range(self.cut)]
        h = h[:, -1:].clone()
        for r, key in enumerate(keys):
            self.store.entries[key] = (h[r : r + 1], [(k[r : r + 1], v[r : r + 1]) for k, v in layers])
        return out

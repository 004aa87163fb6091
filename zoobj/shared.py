"""Compute once per step what a step's perturbations cannot change.

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

import torch

from zoobj import blocks as _blocks


class _Store:
    """What both stores share: a per-batch store of computed states, dropped when the
    batch's prompts change or any tensor in ``self._watched`` has been written in place
    since (its version counter moved); and the switch to the plain path."""

    _watched: list
    _store: dict
    _batch: frozenset | None
    _version: int | None
    disabled: str | None
    on_disable: object

    def _fingerprint(self) -> int:
        return sum(p._version for p in self._watched)

    def begin(self, keys) -> None:
        """A prediction call over these prompts starts: drop what belongs to another batch
        or to weights that have changed since it was stored."""
        batch, version = frozenset(keys), self._fingerprint()
        if batch != self._batch or version != self._version:
            self._store.clear()
            self._batch, self._version = batch, version

    def disable(self, why: str) -> None:
        if self.disabled is None:
            self.disabled = why
            self._store.clear()
            if self.on_disable is not None:
                self.on_disable(why)


class SharedPrefix(_Store):
    """The frozen lower blocks' hidden states and keys/values for the current batch."""

    def __init__(self, model, cut: int, prefix: str, block_list: torch.nn.ModuleList,
                 params: list[torch.Tensor]) -> None:
        self.model, self.cut, self.prefix, self.blocks = model, cut, prefix, block_list
        trained = {id(p) for p in params}
        # what the stored states depend on: the lower blocks, and the untrained tensors
        # outside the blocks (embeddings; a frozen final norm or head is harmless here)
        self._watched = [p for n, p in model.named_parameters() if id(p) not in trained
                         and ((b := _blocks.block_of(n, prefix)) is None or b < cut)]
        self._store: dict = {}
        self._batch: frozenset | None = None
        self._version: int | None = None
        self.hits = self.misses = 0  # prompts (or padded batches) found in the store / computed
        self.decode_hits = self.decode_misses = 0  # decoding steps that ran the upper blocks only / all
        self.disabled: str | None = None  # why the plain path runs from now on
        self.on_disable = None  # called once with that reason (the training loop logs it)

    # ------------------------------------------------------------------ construction

    @classmethod
    def build(cls, model, params: list[torch.Tensor]) -> tuple[SharedPrefix | None, str]:
        """``(SharedPrefix, description)``, ``(None, why the plain path runs)``, or ``(None, "")``
        where block 0 trains (nothing lies below it)."""
        found = _blocks.find_blocks(model)
        if found is None:
            return None, "no decoder block list found in this model"
        devices = set((getattr(model, "hf_device_map", None) or {}).values())
        if len(devices) > 1:
            return None, "the model is spread over several devices"
        cut = _blocks.lowest_trained_block(model, params)
        if cut is None:
            return None, "a trained tensor acts below every block (embeddings or a prefix)"
        if cut == 0:  # nothing below the trained blocks: not a fallback, there is nothing to share
            return None, ""
        prefix, block_list = found
        return cls(model, cut, prefix, block_list, params), f"blocks 0-{cut - 1} computed once per step, {len(block_list) - cut} per probe"

    # ------------------------------------------------------------------ the two passes

    def _catching(self, skip: list, **call):
        """The model's forward with the modules ``skip`` passing their input through:
        (its output, the hidden states after block cut-1)."""
        caught = {}
        handle = self.blocks[self.cut - 1].register_forward_hook(lambda _m, _a, output: caught.update(h=output))
        try:
            with _blocks.swapped_forwards(skip, [_blocks.pass_through] * len(skip)):
                out = self.model(**call)
        finally:
            handle.remove()
        h = caught.get("h")
        if not isinstance(h, torch.Tensor):
            raise _Unsupported("its decoder blocks return a tuple, not a tensor (an older transformers)")
        return out, h

    def _upper(self, h: torch.Tensor, kv: list, **call):
        """The model's forward from the cut up, ``h`` standing for block cut-1's output;
        then the lower layers' keys and values ``kv`` join the output's cache (in place)."""
        lower = list(self.blocks)[: self.cut]

        def inject(hidden_states, *args, **kwargs):
            return h

        with _blocks.swapped_forwards(lower, [_blocks.pass_through] * (self.cut - 1) + [inject]):
            out = self.model(**call)
        cache = _cache_of(out)
        for i, (k, v) in enumerate(kv):
            cache.update(k, v, i)
        return out

    def _lower(self, key, **inputs):
        """Blocks below the cut over these inputs: (hidden states after block cut-1, [(k, v)] per lower layer)."""
        entry = self._store.get(key)
        if entry is not None:
            self.hits += 1
            return entry
        self.misses += 1
        skip = list(self.blocks)[self.cut:]  # the upper blocks, and the head (its output is not wanted)
        head = _blocks.output_head(self.model)
        if isinstance(head, torch.nn.Module):
            skip.append(head)
        out, h = self._catching(skip, **inputs, use_cache=True, logits_to_keep=1)
        cache = _cache_of(out)
        self._store[key] = entry = (h, [(cache.layers[i].keys, cache.layers[i].values) for i in range(self.cut)])
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
        entries = [self._store.get(k) for k in keys]
        if all(e is not None for e in entries):
            self.decode_hits += 1
            kv = [(torch.cat([e[1][i][0] for e in entries]), torch.cat([e[1][i][1] for e in entries]))
                  for i in range(self.cut)]
            return self._upper(torch.cat([e[0] for e in entries]), kv, **inputs, use_cache=True)
        self.decode_misses += 1
        out, h = self._catching([], **inputs, use_cache=True)
        cache = _cache_of(out)
        # copies of this token's rows: a view would keep the step's whole cache alive
        layers = [(cache.layers[i].keys[:, :, -1:].clone(), cache.layers[i].values[:, :, -1:].clone())
                  for i in range(self.cut)]
        h = h[:, -1:].clone()
        for r, key in enumerate(keys):
            self._store[key] = (h[r : r + 1], [(k[r : r + 1], v[r : r + 1]) for k, v in layers])
        return out


class _Unsupported(RuntimeError):
    """The shared path cannot run on this model (the message says why)."""


def _cache_of(out):
    from zoobj.inference import _cache_out

    return _cache_out(out)


def build(model, params: list[torch.Tensor]):
    """The store that serves these trained tensors: ``SharedPromptBody`` for a trained
    template tail (``--peft template``), else ``SharedPrefix``; ``(store or None, note)``."""
    from zoobj import template

    tail = template.find(model)
    if tail is not None and len(params) == 1 and params[0] is tail.delta:
        return SharedPromptBody.build(model, tail)
    return SharedPrefix.build(model, params)


PROBE_ROWS = 64  # rows (prompts times probes) per forward when a step's probes run together
PROBE_LOGITS = 2**27  # at most this many logits per forward of scored probes (512 MiB in fp32; 512 positions
# at Gemma 3's 262K-token vocabulary): a CE forward returns the logits of every tail and target position


class SharedPromptBody(_Store):
    """For a trained template tail: each prompt's keys and values *before* the tail,
    computed once and reused by every probe while the prompts stay.

    Causal attention: a token's keys and values depend only on the tokens up to it, so
    with only the tail's input vectors trained, the prompt's body (everything before
    its last occurrence of the tail) is the same for every perturbation. A probe copies
    the body's cache and runs the tail (and, for a scored target, the target) over it:
    a few tokens instead of the whole prompt. Rows that do not end with the tail, or
    whose body holds it too, run whole. Decoding runs the whole model on its one new
    token, as it always does. Serves the same calls as ``SharedPrefix`` (``begin``,
    ``forward``, ``decode``), so the prediction functions take either.
    """

    def __init__(self, model, tail) -> None:
        self.model, self.tail = model, tail
        trained = id(tail.delta)
        self._watched = [p for p in model.parameters() if id(p) != trained]
        self._store: dict = {}
        self._batch: frozenset | None = None
        self._version: int | None = None
        self.hits = self.misses = 0  # prompt bodies found in the store / computed
        self.decode_hits = self.decode_misses = 0  # (decoding is never shared here)
        self.disabled: str | None = None
        self.on_disable = None

    @classmethod
    def build(cls, model, tail) -> tuple[SharedPromptBody | None, str]:
        devices = set((getattr(model, "hf_device_map", None) or {}).values())
        if len(devices) > 1:
            return None, "the model is spread over several devices"
        k = tail.tail.numel()
        return cls(model, tail), f"prompt bodies computed once per batch, {k} tail tokens and the answer per probe"

    def _body(self, body: tuple):
        cache = self._store.get(body)
        if cache is not None:
            self.hits += 1
            return cache
        self.misses += 1
        dev = self.tail.delta.device
        out = self.model(input_ids=torch.tensor([body], device=dev), use_cache=True, logits_to_keep=1)
        self._store[body] = cache = _cache_of(out)
        return cache

    def _row(self, ids: list[int], keep: int):
        """One unpadded row: (logits of its last ``keep`` positions or fewer, its cache)."""
        import copy

        dev = self.tail.delta.device
        starts = self.tail.matches(torch.tensor([ids])).nonzero()[:, 1].tolist()
        s = starts[-1] if starts else 0
        if s == 0 or self.tail.matches(torch.tensor([ids[:s]])).any():  # nothing to share, or the body moves too
            out = self.model(input_ids=torch.tensor([ids], device=dev), use_cache=True, logits_to_keep=keep)
            return out.logits, _cache_of(out)
        cache = copy.deepcopy(self._body(tuple(ids[:s])))
        rest = torch.tensor([ids[s:]], device=dev)
        pos = torch.arange(s, len(ids), device=dev)[None]
        from zoobj.inference import _cache_kw

        out = self.model(input_ids=rest, position_ids=pos, use_cache=True, logits_to_keep=min(keep, rest.shape[1]),
                         **{_cache_kw(self.model): cache})
        return out.logits, _cache_of(out)

    def forward(self, key, logits_to_keep: int = 1, input_ids=None, attention_mask=None, position_ids=None, **_):
        """The model's output over ``input_ids`` (left-padded rows): logits of the last
        ``logits_to_keep`` positions (zeros where a row's shared body holds them) and a
        cache of the whole width."""
        from transformers.modeling_outputs import CausalLMOutputWithPast

        rows = []
        for r in range(input_ids.shape[0]):
            ids = input_ids[r] if attention_mask is None else input_ids[r][attention_mask[r].bool()]
            rows.append(ids.tolist())
        results = [self._row(ids, logits_to_keep) for ids in rows]
        if len(rows) == 1 and attention_mask is None:
            logits, cache = results[0]
        else:
            width = input_ids.shape[1]
            logits = results[0][0].new_zeros((len(rows), logits_to_keep, results[0][0].shape[-1]))
            for r, (lg, _) in enumerate(results):
                logits[r, logits_to_keep - lg.shape[1]:] = lg[0]
            from zoobj.inference import stack_caches

            cache = stack_caches(self.model, [c for _, c in results], [len(ids) for ids in rows], width)
            if cache is None:
                raise _Unsupported("a row's cache cannot be stacked (a sliding-window layer cut it)")
        return CausalLMOutputWithPast(logits=logits, **{"cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values": cache})

    def _split(self, ids: list[list[int]], extra: int) -> tuple[list[int], list[int]]:
        """For the probes together: ``(prompts that run over their stored bodies, prompts too
        long for that)``. A prompt whose length plus ``extra`` tokens is more than a
        sliding-window layer keeps has no body cache to stack: it runs whole, once per
        point. Raises ``_Unsupported`` for a one-token tail or a prompt that does not end
        with the tail or holds it before its end (see ``generate_probes``)."""
        from zoobj.inference import _keeps_whole_prompt

        tail = self.tail.tail.tolist()
        k = len(tail)
        if k < 2:
            raise _Unsupported("a one-token tail")
        for p in ids:
            if p[-k:] != tail or len(p) == k or bool(self.tail.matches(torch.tensor([p[:-k]])).any()):
                raise _Unsupported("a prompt that does not end with the tail, or holds it before its end")
        fit = [i for i, p in enumerate(ids) if _keeps_whole_prompt(self.model, len(p) + extra)]
        return fit, [i for i in range(len(ids)) if i not in set(fit)]

    def _fit(self, positions: int) -> int:
        """How many groups of ``positions`` positions' logits fit in ``PROBE_LOGITS`` (at least 1)."""
        head = _blocks.output_head(self.model)
        vocab = getattr(head, "out_features", None) or self.model.config.get_text_config().vocab_size
        return max(1, PROBE_LOGITS // (positions * vocab))

    def _points(self, ids: list[list[int]], deltas: torch.Tensor, rows: int, positions: int = 1):
        """Per group of points: ``(first point, points, stacked body cache, body mask, body
        lengths)`` -- each prompt's stored body cache once per point, left-padded,
        probe-major (row ``j * len(ids) + i``: prompt ``i`` at point ``first + j``). A group
        has about ``rows`` rows, fewer where its ``positions`` logits per row would pass
        ``PROBE_LOGITS``; at least one point."""
        from zoobj.inference import stack_caches

        k, dev = self.tail.tail.numel(), self.tail.delta.device
        bodies = [self._body(tuple(p[:-k])) for p in ids]
        starts = [len(p) - k for p in ids]
        width = max(starts)
        per = max(1, min(rows // len(ids), self._fit(len(ids) * positions)))  # points per forward
        for first in range(0, deltas.shape[0], per):
            points = min(per, deltas.shape[0] - first)
            cache = stack_caches(self.model, bodies * points, starts * points, width)
            if cache is None:
                raise _Unsupported("a prompt body's cache cannot be stacked")
            mask = torch.zeros((len(ids) * points, width), dtype=torch.long, device=dev)
            for r, n in enumerate(starts * points):
                mask[r, width - n:] = 1
            yield first, points, cache, mask, starts * points

    def _whole(self, seq: list[int], deltas: torch.Tensor, keep: int):
        """A sequence too long for the stored bodies, run whole at every point at once (one
        row per point, no padding): the model's output and its attention mask."""
        dev = self.tail.delta.device
        inputs = torch.tensor([seq], device=dev).expand(deltas.shape[0], -1)
        with self.tail.per_row(deltas):
            out = self.model(input_ids=inputs, use_cache=True, logits_to_keep=keep)
        return out, torch.ones_like(inputs)

    def _tails(self, deltas: torch.Tensor, first: int, points: int, prompts: int, cache, mask, starts, new,
               new_mask, keep: int):
        """The forward of each row's tail (and ``new`` tokens after it) over its body, the row's
        point's tail in place of ``delta``: ``(output, attention mask of the whole width)``."""
        from zoobj.inference import _cache_kw

        dev = self.tail.delta.device
        full = torch.cat([mask, new_mask], dim=1)
        pos = torch.tensor(starts, device=dev)[:, None] + torch.arange(new.shape[1], device=dev)[None]
        with self.tail.per_row(deltas[first : first + points].repeat_interleave(prompts, 0)):
            out = self.model(input_ids=new, attention_mask=full, position_ids=pos, use_cache=True,
                             logits_to_keep=keep, **{_cache_kw(self.model): cache})
        return out, full

    @torch.inference_mode()
    def generate_probes(self, tok, prompts: list[str], deltas: torch.Tensor, max_new_tokens: int,
                        rows: int = PROBE_ROWS) -> list[list[str]]:
        """Greedy answers to ``prompts`` at several points of the tail: ``answers[p][i]``
        under ``deltas[p]`` (shape ``(points, k, dim)``), the same as moving ``delta`` to
        each point and calling ``inference.generate``. The probes run together, about
        ``rows`` rows (prompts times points) per forward: a forward reads the model's
        weights once for all of them, where one probe at a time reads them once per
        probe (per prompt, for the tail). Raises ``_Unsupported`` where a prompt does not
        end with the tail or also holds it before, for a one-token tail (a generated
        token could be the tail, which the per-row deltas do not follow), and where a
        cache cannot be stacked."""
        from zoobj.inference import _encode, _stops, answer_text, greedy

        ids = _encode(tok, prompts, special=True)
        self.begin(tuple(p) for p in ids)
        tail, dev = self.tail.tail, self.tail.delta.device
        stops = _stops(tok, dev)
        fit, long = self._split(ids, max_new_tokens)
        answers: list[list[str]] = [[""] * len(ids) for _ in range(deltas.shape[0])]
        some = [ids[i] for i in fit]
        for first, points, cache, mask, starts in (self._points(some, deltas, rows) if some else ()):
            n = len(mask)
            out, full = self._tails(deltas, first, points, len(some), cache, mask, starts, tail[None].expand(n, -1),
                                    torch.ones((n, len(tail)), dtype=torch.long, device=dev), keep=1)
            new = greedy(self.model, out.logits[:, -1], _cache_of(out), full, max_new_tokens, stops, tok.pad_token_id)
            for r, row in enumerate(new):
                answers[first + r // len(some)][fit[r % len(some)]] = answer_text(tok, row)
        for i in long:
            out, mask = self._whole(ids[i], deltas, keep=1)
            new = greedy(self.model, out.logits[:, -1], _cache_of(out), mask, max_new_tokens, stops, tok.pad_token_id)
            for j, row in enumerate(new):
                answers[j][i] = answer_text(tok, row)
        return answers

    def nll_probes(self, tok, prompts: list[str], targets: list[str], deltas: torch.Tensor,
                   rows: int = PROBE_ROWS) -> list[tuple[float, int]]:
        """``(summed NLL, target tokens)`` of ``targets[i]`` after ``prompts[i]`` at each point
        of the tail (``deltas[p]``), as ``inference.target_nll_sum`` gives with ``delta`` moved
        there; the probes run together, as in ``generate_probes``."""
        return [(sum(t for t, _ in point), sum(c for _, c in point))
                for point in self.nll_rows(tok, prompts, targets, deltas, rows)]

    @torch.inference_mode()
    def nll_rows(self, tok, prompts: list[str], targets: list[str], deltas: torch.Tensor,
                 rows: int = PROBE_ROWS) -> list[list[tuple[float, int]]]:
        """``nll[p][i]``: ``(summed NLL, tokens)`` of ``targets[i]`` after ``prompts[i]`` at the
        point ``deltas[p]`` of the tail, every point's rows in batched forwards (``nll_probes``
        sums them; the smoothed generation objective scores candidate answers with them)."""
        from zoobj.inference import _encode

        ids, t_ids = _encode(tok, prompts, special=True), _encode(tok, targets, special=False)
        self.begin(tuple(p) for p in ids)  # the bodies depend on the prompts only: a generate over them keeps the store
        tail, dev, pad = self.tail.tail.tolist(), self.tail.delta.device, tok.pad_token_id
        longest = max(len(t) for t in t_ids)
        new = torch.full((len(ids), len(tail) + longest), pad, dtype=torch.long, device=dev)
        new_mask = torch.zeros_like(new)
        for i, t in enumerate(t_ids):  # the tail, then the target; padding after (it sees only itself)
            new[i, : len(tail) + len(t)] = torch.tensor(tail + t)
            new_mask[i, : len(tail) + len(t)] = 1
        fit, long = self._split(ids, longest)
        totals = [[(0.0, 0)] * len(ids) for _ in range(deltas.shape[0])]

        def add(point: int, i: int, logits: torch.Tensor) -> None:  # logits[j] predicts target token j
            t = t_ids[i]
            if t:
                picked = logits.gather(-1, torch.tensor(t, device=dev)[:, None])[:, 0]
                totals[point][i] = (-float((picked - torch.logsumexp(logits, dim=-1)).sum()), len(t))

        some = [ids[i] for i in fit]
        for first, points, cache, mask, starts in (self._points(some, deltas, rows, new.shape[1]) if some else ()):
            sel = torch.tensor(fit, device=dev)
            out, _ = self._tails(deltas, first, points, len(some), cache, mask, starts, new[sel].repeat(points, 1),
                                 new_mask[sel].repeat(points, 1), keep=new.shape[1])
            logits = out.logits[:, len(tail) - 1 : -1].float()  # position j predicts target token j
            for r in range(len(logits)):
                i = fit[r % len(some)]
                add(first + r // len(some), i, logits[r, : len(t_ids[i])])
        for i in long:
            t = t_ids[i]
            per = self._fit(len(t) + 1)
            for first in range(0, deltas.shape[0], per):
                out, _ = self._whole(ids[i] + t, deltas[first : first + per], keep=len(t) + 1)
                for j in range(out.logits.shape[0]):
                    add(first + j, i, out.logits[j, : len(t)].float())
        return totals

    def decode(self, keys: list, **inputs):
        self.decode_misses += 1
        return self.model(**inputs, use_cache=True)

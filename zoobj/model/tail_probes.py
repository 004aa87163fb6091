"""A template tail's probes together: the prompt bodies computed once per batch.

With only the tail's input vectors trained (``--peft template``, ``zoobj.model.template``),
causal attention makes everything before the tail -- the prompt's body -- the same for
every perturbation. ``PromptBodyStore`` keeps each body's keys and values; a probe runs
the tail (and a scored target, or greedy decoding) over a copy of them, and a step's
2n points run as per-row deltas in a few batched forwards (``generate_probes``,
``nll_rows``, ``nll_probes``) instead of 2n whole forwards. Where a batch cannot be
served this way (a one-token tail, a prompt that does not end with the tail or holds it
earlier, a cache that cannot be stacked) it raises ``FastPathUnavailable`` and the
caller runs the probes one by one.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch

from zoobj.model.blocks import output_head
from zoobj.model.inference import answer_text, greedy
from zoobj.model.kv import (
    BatchStore,
    FastPathUnavailable,
    cache_kw,
    cache_out,
    encode,
    encode_candidates,
    keeps_whole_prompt,
    stack_caches,
    stop_tensor,
    target_nll,
)

PROBE_ROWS = 64  # rows (prompts times probes) per forward when a step's probes run together
PROBE_LOGITS = 2**27  # at most this many logits per forward of scored probes (512 MiB in fp32; 512 positions
# at Gemma 3's 262K-token vocabulary): a CE forward returns the logits of every tail and target position


class PromptBodyStore:
    """For a trained template tail: each prompt's keys and values *before* the tail,
    computed once and reused by every probe while the prompts stay.

    Causal attention: a token's keys and values depend only on the tokens up to it, so
    with only the tail's input vectors trained -- and applied only at the prompt's end --
    the prompt's body (everything before its last k tokens) is the same for every
    perturbation. A probe copies the body's cache and runs the tail (and, for a scored
    target, the target) over it: a few tokens instead of the whole prompt. Rows whose
    prompt does not end with the tail run whole. Decoding runs the whole model on its
    one new token, as it always does. Serves the same calls as ``SharedPrefix`` (``store``,
    ``forward``, ``decode``), so the prediction functions take either.
    """

    def __init__(self, model, tail, on_disable: Callable[[str], None] | None = None) -> None:
        self.model, self.tail = model, tail
        trained = id(tail.delta)
        self.store = BatchStore([p for p in model.parameters() if id(p) != trained], on_disable)
        self.hits = self.misses = 0  # prompt bodies found in the store / computed
        self.decode_hits = self.decode_misses = 0  # (decoding is never shared here)

    @classmethod
    def build(cls, model, tail, on_disable: Callable[[str], None] | None = None) -> tuple[PromptBodyStore | None, str]:
        devices = set((getattr(model, "hf_device_map", None) or {}).values())
        if len(devices) > 1:
            return None, "the model is spread over several devices"
        k = tail.tail.numel()
        return cls(model, tail, on_disable), f"prompt bodies computed once per batch, {k} tail tokens and the answer per probe"

    def _body(self, body: tuple):
        cache = self.store.entries.get(body)
        if cache is not None:
            self.hits += 1
            return cache
        self.misses += 1
        dev = self.tail.delta.device
        with self.tail.placed(None):  # the body ends before the tail: nothing of it is trained
            out = self.model(input_ids=torch.tensor([body], device=dev), use_cache=True, logits_to_keep=1)
        self.store.entries[body] = cache = cache_out(out)
        return cache

    def _row(self, ids: list[int], end: int | None, keep: int):
        """One unpadded row whose prompt ends at ``end`` (None: no prompt end in it): (logits
        of its last ``keep`` positions or fewer, its cache). Over its stored body where the
        tail ends the prompt; whole otherwise."""
        dev, k = self.tail.delta.device, self.tail.tail.numel()
        s = None if end is None else end - k
        if s is None or s < 1 or ids[s:end] != self.tail.tail.tolist():  # no tail to run over a body
            with self.tail.placed(end):
                out = self.model(input_ids=torch.tensor([ids], device=dev), use_cache=True, logits_to_keep=keep)
            return out.logits, cache_out(out)
        cache = copy.deepcopy(self._body(tuple(ids[:s])))
        rest = torch.tensor([ids[s:]], device=dev)
        pos = torch.arange(s, len(ids), device=dev)[None]
        with self.tail.placed(k):  # the tail opens the rest
            out = self.model(input_ids=rest, position_ids=pos, use_cache=True, logits_to_keep=min(keep, rest.shape[1]),
                             **{cache_kw(self.model): cache})
        return out.logits, cache_out(out)

    def forward(self, key, logits_to_keep: int = 1, input_ids=None, attention_mask=None, position_ids=None, **_):
        """The model's output over ``input_ids`` (left-padded rows whose prompts end where the
        tail's ``placed`` says): logits of the last ``logits_to_keep`` positions (zeros where
        a row's shared body holds them) and a cache of the whole width."""
        from transformers.modeling_outputs import CausalLMOutputWithPast

        ends = self.tail.prompt_ends(input_ids)
        rows, row_ends = [], []
        for r in range(input_ids.shape[0]):
            keep = None if attention_mask is None else attention_mask[r].bool()
            ids = input_ids[r] if keep is None else input_ids[r][keep]
            pad = 0 if keep is None else int((~keep).sum())
            rows.append(ids.tolist())
            row_ends.append(None if ends is None else int(ends[r]) - pad)
        results = [self._row(ids, end, logits_to_keep) for ids, end in zip(rows, row_ends)]
        if len(rows) == 1 and attention_mask is None:
            logits, cache = results[0]
        else:
            width = input_ids.shape[1]
            logits = results[0][0].new_zeros((len(rows), logits_to_keep, results[0][0].shape[-1]))
            for r, (lg, _) in enumerate(results):
                logits[r, logits_to_keep - lg.shape[1]:] = lg[0]
            cache = stack_caches(self.model, [c for _, c in results], [len(ids) for ids in rows], width)
            if cache is None:
                raise FastPathUnavailable("a row's cache cannot be stacked (a sliding-window layer cut it)")
        field = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
        return CausalLMOutputWithPast(logits=logits, **{field: cache})

    def _split(self, ids: list[list[int]], extra: int) -> tuple[list[int], list[int]]:
        """For the probes together: ``(prompts that run over their stored bodies, prompts too
        long for that)``. A prompt whose length plus ``extra`` tokens is more than a
        sliding-window layer keeps has no body cache to stack: it runs whole, once per
        point. Raises ``FastPathUnavailable`` for a prompt that does not end with the tail."""
        tail = self.tail.tail.tolist()
        if any(p[-len(tail):] != tail or len(p) == len(tail) for p in ids):  # each prompt ends with it, after a body
            raise FastPathUnavailable("a prompt that does not end with the tail")
        fit = [i for i, p in enumerate(ids) if keeps_whole_prompt(self.model, len(p) + extra)]
        return fit, [i for i in range(len(ids)) if i not in set(fit)]

    def _fit(self, positions: int) -> int:
        """How many groups of ``positions`` positions' logits fit in ``PROBE_LOGITS`` (0: not one)."""
        head = output_head(self.model)
        vocab = getattr(head, "out_features", None) or self.model.config.get_text_config().vocab_size
        return PROBE_LOGITS // (positions * vocab)

    def _groups(self, prompts: int, points: int, rows: int, positions: int):
        """``(first point, points, prompt indices)`` per forward: about ``rows`` rows (prompts
        times points), and at most ``PROBE_LOGITS`` logits of ``positions`` positions per row
        -- fewer prompts per forward, one point at a time, where one point's rows would pass
        it (a single row is never split)."""
        fit = self._fit(positions)
        if fit >= prompts:  # every prompt of a point in one forward: as many points as fit
            per = max(1, min(rows // prompts, fit // prompts))
            for first in range(0, points, per):
                yield first, min(per, points - first), list(range(prompts))
            return
        size = max(1, min(fit, rows))
        for first in range(points):
            for start in range(0, prompts, size):
                yield first, 1, list(range(start, min(prompts, start + size)))

    def _points(self, ids: list[list[int]], deltas: torch.Tensor, rows: int, positions: int = 1):
        """Per forward: ``(first point, points, prompt indices, stacked body cache, body mask,
        body lengths)`` -- those prompts' stored body caches once per point, left-padded,
        probe-major (row ``j * len(sel) + i``: prompt ``sel[i]`` at point ``first + j``);
        grouped by ``_groups``."""
        k, dev = self.tail.tail.numel(), self.tail.delta.device
        bodies = [self._body(tuple(p[:-k])) for p in ids]
        for first, points, sel in self._groups(len(ids), deltas.shape[0], rows, positions):
            starts = [len(ids[i]) - k for i in sel] * points
            width = max(starts)
            cache = stack_caches(self.model, [bodies[i] for i in sel] * points, starts, width)
            if cache is None:
                raise FastPathUnavailable("a prompt body's cache cannot be stacked")
            mask = torch.zeros((len(starts), width), dtype=torch.long, device=dev)
            for r, n in enumerate(starts):
                mask[r, width - n:] = 1
            yield first, points, sel, cache, mask, starts

    def _whole(self, seq: list[int], end: int, deltas: torch.Tensor, keep: int):
        """A sequence (its prompt ending at ``end``) too long for the stored bodies, run whole
        at every point at once (one row per point, no padding): the model's output and its
        attention mask."""
        dev = self.tail.delta.device
        inputs = torch.tensor([seq], device=dev).expand(deltas.shape[0], -1)
        with self.tail.per_row(deltas), self.tail.placed(end):
            out = self.model(input_ids=inputs, use_cache=True, logits_to_keep=keep)
        return out, torch.ones_like(inputs)

    def _tails(self, deltas: torch.Tensor, first: int, points: int, prompts: int, cache, mask, starts, new,
               new_mask, keep: int):
        """The forward of each row's tail (and ``new`` tokens after it) over its body, the row's
        point's tail in place of ``delta``: ``(output, attention mask of the whole width)``."""
        dev = self.tail.delta.device
        full = torch.cat([mask, new_mask], dim=1)
        pos = torch.tensor(starts, device=dev)[:, None] + torch.arange(new.shape[1], device=dev)[None]
        with self.tail.per_row(deltas[first : first + points].repeat_interleave(prompts, 0)), \
                self.tail.placed(self.tail.tail.numel()):  # each row's input opens with the tail
            out = self.model(input_ids=new, attention_mask=full, position_ids=pos, use_cache=True,
                             logits_to_keep=keep, **{cache_kw(self.model): cache})
        return out, full

    @torch.inference_mode()
    def generate_probes(self, tok, prompts: list[str], deltas: torch.Tensor, max_new_tokens: int,
                        rows: int = PROBE_ROWS) -> list[list[str]]:
        """Greedy answers to ``prompts`` at several points of the tail: ``answers[p][i]``
        under ``deltas[p]`` (shape ``(points, k, dim)``), the same as moving ``delta`` to
        each point and calling ``inference.generate``. The probes run together, about
        ``rows`` rows (prompts times points) per forward: a forward reads the model's
        weights once for all of them, where one probe at a time reads them once per
        probe (per prompt, for the tail). Raises ``FastPathUnavailable`` where a prompt does not
        end with the tail and where a cache cannot be stacked."""
        ids = encode(tok, prompts, special=True)
        self.store.begin(tuple(p) for p in ids)
        tail, dev = self.tail.tail, self.tail.delta.device
        stops = stop_tensor(tok, dev)
        fit, long = self._split(ids, max_new_tokens)
        answers: list[list[str]] = [[""] * len(ids) for _ in range(deltas.shape[0])]
        some = [ids[i] for i in fit]
        for first, points, sel, cache, mask, starts in (self._points(some, deltas, rows) if some else ()):
            n = len(mask)
            out, full = self._tails(deltas, first, points, len(sel), cache, mask, starts, tail[None].expand(n, -1),
                                    torch.ones((n, len(tail)), dtype=torch.long, device=dev), keep=1)
            new = greedy(self.model, out.logits[:, -1], cache_out(out), full, max_new_tokens, stops, tok.pad_token_id)
            for r, row in enumerate(new):
                answers[first + r // len(sel)][fit[sel[r % len(sel)]]] = answer_text(tok, row)
        for i in long:
            out, mask = self._whole(ids[i], len(ids[i]), deltas, keep=1)
            new = greedy(self.model, out.logits[:, -1], cache_out(out), mask, max_new_tokens, stops, tok.pad_token_id)
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
        ids, t_ids = encode(tok, prompts, special=True), encode(tok, targets, special=False)
        self.store.begin(tuple(p) for p in ids)  # the bodies depend on the prompts only: a generate over them keeps the store
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
            if t_ids[i]:
                totals[point][i] = (target_nll(logits, t_ids[i]), len(t_ids[i]))

        some = [ids[i] for i in fit]
        for first, points, sel, cache, mask, starts in (self._points(some, deltas, rows, new.shape[1]) if some else ()):
            chosen = torch.tensor([fit[i] for i in sel], device=dev)
            out, _ = self._tails(deltas, first, points, len(sel), cache, mask, starts, new[chosen].repeat(points, 1),
                                 new_mask[chosen].repeat(points, 1), keep=new.shape[1])
            logits = out.logits[:, len(tail) - 1 : -1].float()  # position j predicts target token j
            for r in range(len(logits)):
                i = fit[sel[r % len(sel)]]
                add(first + r // len(sel), i, logits[r, : len(t_ids[i])])
        for i in long:
            t = t_ids[i]
            per = max(1, self._fit(len(t) + 1))
            for first in range(0, deltas.shape[0], per):
                out, _ = self._whole(ids[i] + t, len(ids[i]), deltas[first : first + per], keep=len(t) + 1)
                for j in range(out.logits.shape[0]):
                    add(first + j, i, out.logits[j, : len(t)].float())
        return totals

    @torch.inference_mode()
    def choice_probes(self, tok, prompts: list[str], candidates: list[list[str]], deltas: torch.Tensor,
                      length_normalize: bool = True, rows: int = PROBE_ROWS) -> list[list[list[float]]]:
        """``scores[p][i][c]``: candidate ``c`` of prompt ``i`` at the point ``deltas[p]`` of
        the tail, as ``inference.score_candidates(..., relative=True)`` gives with ``delta``
        moved there (each row's scores may be off by one constant of that row: the softmax
        over the candidates and the argmax are exact). Where every candidate is one token,
        a point costs the tail's forward over each body and the candidates' logits; longer
        candidates are scored as targets (``nll_rows``: mean or summed log-probability)."""
        cand_ids = encode_candidates(tok, candidates)
        if any(len(i) != 1 for ids in cand_ids for i in ids):
            pairs = [(i, c) for i, cs in enumerate(candidates) for c in range(len(cs))]
            nll = self.nll_rows(tok, [prompts[i] for i, _ in pairs], [candidates[i][c] for i, c in pairs], deltas, rows)
            scores: list[list[list[float]]] = [[[] for _ in prompts] for _ in nll]
            for point, got in zip(scores, nll):
                for (i, _), (total, count) in zip(pairs, got):
                    point[i].append(-total / count if length_normalize else -total)
            return scores
        ids = encode(tok, prompts, special=True)
        self.store.begin(tuple(p) for p in ids)
        tail, dev = self.tail.tail, self.tail.delta.device
        fit, long = self._split(ids, 0)
        scores = [[[] for _ in prompts] for _ in range(deltas.shape[0])]
        some = [ids[i] for i in fit]
        for first, points, sel, cache, mask, starts in (self._points(some, deltas, rows) if some else ()):
            n = len(mask)
            out, _ = self._tails(deltas, first, points, len(sel), cache, mask, starts, tail[None].expand(n, -1),
                                 torch.ones((n, len(tail)), dtype=torch.long, device=dev), keep=1)
            logits = out.logits[:, -1].float()
            for r in range(n):
                i = fit[sel[r % len(sel)]]
                scores[first + r // len(sel)][i] = [float(logits[r, c[0]]) for c in cand_ids[i]]
        for i in long:
            per = max(1, self._fit(1))
            for first in range(0, deltas.shape[0], per):
                out, _ = self._whole(ids[i], len(ids[i]), deltas[first : first + per], keep=1)
                for j in range(out.logits.shape[0]):
                    scores[first + j][i] = [float(out.logits[j, -1, c[0]]) for c in cand_ids[i]]
        return scores

    def decode(self, keys: list, **inputs):
        self.decode_misses += 1
        return self.model(**inputs, use_cache=True)

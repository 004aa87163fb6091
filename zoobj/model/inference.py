"""Batched forward passes that turn prompts into predictions, and nothing more.

- ``score_candidates``: log-likelihood of each candidate continuation. The prompts are
  encoded once (left padding, KV cache, logits for the last position only); when every
  candidate is a single token that one forward is all; otherwise the cache is repeated
  per candidate and only the candidate tokens run through the model. A caller that
  compares candidates only with one another (argmax, a softmax over them) asks for
  ``relative`` scores: single-token candidates then cost their own rows of the output
  head, not the vocabulary's (262k rows in Gemma 3: half of a short prompt's forward).
- ``generate``: greedy decoding in batches with the KV cache, prompts sorted by length
  to waste little on padding, each row stopping at a newline or eos; the prompts are
  prefilled one by one and their last hidden states go through the output head together
  (one read of the head's weights instead of one per prompt).
- ``target_nll``: mean negative log-likelihood of target tokens after their prompts,
  with logits computed only where targets are (and, with ``shared``, the frozen lower
  blocks computed once per batch, as for the other two).

Everything runs under ``torch.inference_mode``; no gradients exist anywhere.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from contextlib import nullcontext

import torch

from zoobj.model import template
from zoobj.model.blocks import output_head, pass_through, swapped_forwards
from zoobj.model.kv import (
    FastPathUnavailable,
    batches,
    cache_kw,
    cache_out,
    device_of,
    encode,
    encode_candidates,
    keeps_whole_prompt,
    left_pad,
    positions,
    stack_caches,
    stop_tensor,
)

# peft's prefix tuning hands the model its prefix as past_key_values while the decoding
# below passes the cache (already holding that prefix) as ``cache``; transformers 5 warns
# on every such call that it uses ``cache``, which is what is meant here.
warnings.filterwarnings("ignore", message="Both `past_key_values` and `cache` are set", category=FutureWarning)


def _exact_head(model, input_ids: list[int]):
    """The output head, where the model's logits are exactly the head's output (checked
    once per model, on one real prompt); None where the model changes them afterwards
    (a soft cap, a scale) or has no head to call. Only then may the head be skipped
    inside the forward and applied outside it."""
    head = output_head(model)
    known = model.__dict__.get("_zoobj_exact_head")  # a bool: a module stored here would become a submodule
    if known is not None:
        return head if known else None
    ok = False
    if isinstance(head, torch.nn.Linear):
        inputs = {"input_ids": torch.tensor([input_ids], device=device_of(model)), "use_cache": False, "logits_to_keep": 1}
        ref = model(**inputs).logits[:, -1]
        with swapped_forwards([head], [pass_through]):
            h = model(**inputs).logits[:, -1]
        ok = h.shape[-1] == head.in_features and torch.allclose(head(h), ref, rtol=1e-4, atol=1e-4)
    model.__dict__["_zoobj_exact_head"] = bool(ok)
    return head if ok else None


def _restricted(head: torch.nn.Linear, ids: torch.Tensor):
    """A forward for ``head`` that computes only the vocabulary rows ``ids`` (read at call
    time, so a perturbation hook on the head is seen)."""
    def forward(x):
        bias = head.bias[ids] if head.bias is not None else None
        return torch.nn.functional.linear(x, head.weight[ids], bias)
    return forward


def _through_shared(shared, via_shared, plain):
    """``via_shared()`` when ``shared`` (a ``zoobj.model.prefix.SharedPrefix``) is given and
    still enabled; where it cannot serve the model, it is disabled (once, with its
    reason) and ``plain()`` runs, as it does without one."""
    if shared is not None and shared.store.disabled is None:
        try:
            return via_shared()
        except FastPathUnavailable as exc:
            shared.store.disable(str(exc))
    return plain()


def _prefill(model, shared, key, head_forward=None, **inputs):
    """The prompt forward (last position's logits, the cache), through ``shared`` where it
    can serve these inputs. ``head_forward``: ``(head, forward)`` to run in place of the
    output head's (its output is then what ``logits`` holds)."""
    swap = swapped_forwards([head_forward[0]], [head_forward[1]]) if head_forward else nullcontext()
    with swap:
        return _through_shared(shared, lambda: shared.forward(key, **inputs),
                               lambda: model(**inputs, use_cache=True, logits_to_keep=1))


@torch.inference_mode()
def score_candidates(
    model, tok, prompts: Sequence[str], candidates: Sequence[Sequence[str]],
    length_normalize: bool = True, batch_size: int = 16, shared=None, relative: bool = False,
) -> list[list[float]]:
    """Log-likelihood of each candidate string appended to its prompt.

    ``candidates[i]`` are the continuations of ``prompts[i]``, each exactly as it is to
    be appended (leading space included where the template wants one). With
    ``length_normalize`` the score is the mean log-probability per candidate token.
    ``relative``: each row's scores may be off by one constant of that row (enough for
    an argmax or a softmax over the candidates): where all of a batch's candidates are
    single tokens, their logits are computed instead of the vocabulary's log-softmax.
    ``shared`` (``zoobj.model.prefix.SharedPrefix``): the frozen lower blocks over each batch
    of prompts are computed once and reused while the prompts and those weights stay.
    """
    dev, pad = device_of(model), tok.pad_token_id
    prompt_ids = encode(tok, prompts, special=True)
    cand_ids = encode_candidates(tok, candidates)
    scores: list[list[float]] = [[] for _ in prompts]
    if shared is not None:
        shared.store.begin(tuple(p) for p in prompt_ids)
    head = _exact_head(model, prompt_ids[0]) if relative and prompts else None
    for rows in batches(len(prompts), batch_size):
        ids, mask = left_pad([prompt_ids[i] for i in rows], pad, dev)
        use = shared if keeps_whole_prompt(model, ids.shape[1]) else None
        flat = [(r, j, c) for r, i in enumerate(rows) for j, c in enumerate(cand_ids[i])]
        key = tuple(tuple(prompt_ids[i]) for i in rows)
        inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": positions(mask)}
        if head is not None and all(len(c) == 1 for _, _, c in flat):  # the candidates' rows of the head only
            vocab = sorted({c[0] for _, _, c in flat})
            column = {v: k for k, v in enumerate(vocab)}
            out = _prefill(model, use, key, (head, _restricted(head, torch.tensor(vocab, device=dev))), **inputs)
            logits = out.logits[:, -1].float()  # (b, len(vocab))
            totals = {(r, j): float(logits[r, column[c[0]]]) for r, j, c in flat}
        else:
            out = _prefill(model, use, key, **inputs)
            first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # (b, V)
            totals = {(r, j): float(first[r, c[0]]) for r, j, c in flat}
        if any(len(c) > 1 for _, _, c in flat):
            _add_continuations(model, out, mask, flat, [len(cand_ids[i]) for i in rows], pad, totals)
        for r, j, c in flat:
            value = totals[(r, j)]
            scores[rows[r]].append(value / len(c) if length_normalize else value)
    return scores


def _add_continuations(model, out, mask: torch.Tensor, flat: list, counts: list[int], pad: int, totals: dict) -> None:
    """Add to ``totals[(r, j)]`` the log-probabilities of candidate ``j``'s tokens after its
    first (``flat``: ``(row, candidate, ids)``), running only those tokens over the prompt
    cache of ``out`` repeated once per candidate."""
    if len(set(counts)) != 1:
        raise ValueError("examples in one batch must have the same number of candidates")
    dev, per = mask.device, counts[0]
    cache = cache_out(out)
    cache.batch_repeat_interleave(per)
    width = max(len(c) for _, _, c in flat) - 1
    cids = torch.full((len(flat), max(width, 1)), pad, dtype=torch.long)
    cmask = torch.zeros((len(flat), max(width, 1)), dtype=torch.long)
    for k, (_, _, c) in enumerate(flat):
        cids[k, : len(c) - 1] = torch.tensor(c[:-1])
        cmask[k, : len(c) - 1] = 1
    full_mask = torch.cat([mask.repeat_interleave(per, 0), cmask.to(dev)], dim=1)
    start = mask.sum(-1).repeat_interleave(per, 0)[:, None]
    pos = start + torch.arange(cids.shape[1], device=dev)[None, :]
    with template.placed(model, None):  # candidate tokens: no prompt ends here
        out2 = model(input_ids=cids.to(dev), attention_mask=full_mask, position_ids=pos, use_cache=True,
                     **{cache_kw(model): cache})
    logp = torch.log_softmax(out2.logits.float(), dim=-1)
    for k, (r, j, c) in enumerate(flat):
        if len(c) > 1:
            nxt = torch.tensor(c[1:], device=dev)
            totals[(r, j)] += float(logp[k, : len(c) - 1].gather(-1, nxt[:, None]).sum())


def _merged_prefill(model, prompt_ids: list[list[int]], dev, shared=None):
    """Prefill each prompt alone (no compute spent on padding), then stack the KV caches
    left-padded into one batch for decoding. None where the cache cannot be stacked
    (no per-layer tensors, or a prompt that a sliding-window layer has already cut).
    With ``shared``, each prompt's frozen lower blocks come from its store."""
    width = max(len(p) for p in prompt_ids)
    if not keeps_whole_prompt(model, width):
        return None
    head = _exact_head(model, prompt_ids[0])  # the head runs once, over every prompt's last state
    swap = (head, pass_through) if head is not None else None
    outs = [_prefill(model, shared, tuple(p), swap, input_ids=torch.tensor([p], device=dev)) for p in prompt_ids]
    merged = stack_caches(model, [cache_out(o) for o in outs], [len(p) for p in prompt_ids], width)
    if merged is None:
        return None
    mask = torch.zeros((len(prompt_ids), width), dtype=torch.long, device=dev)
    for i, p in enumerate(prompt_ids):
        mask[i, width - len(p):] = 1
    last = torch.cat([o.logits[:, -1] for o in outs])
    return (head(last) if head is not None else last), merged, mask


def greedy(model, logits, cache, mask, max_new_tokens: int, stops: torch.Tensor, pad: int, forward=None):
    """Greedy decoding of a prefilled batch: ``(rows, max_new_tokens)`` token ids (``pad``
    after a row's stop token). ``logits``: each row's last-position logits; ``cache`` and
    ``mask``: the batch's cache and attention mask (left-padded). A row that has stopped
    leaves the batch. ``forward(active, tokens, inputs)``, where given, runs a decoding
    step in place of the model (``active``: the batch rows still generating)."""
    dev, kw = logits.device, cache_kw(model)
    new = torch.full((logits.shape[0], max_new_tokens), pad, dtype=torch.long, device=dev)
    active = torch.arange(logits.shape[0], device=dev)  # rows still generating
    last = mask.sum(-1) - 1
    with template.placed(model, None):  # a generated token is never the prompt's tail
        for t in range(max_new_tokens):
            nxt = logits.argmax(-1)
            new[active, t] = nxt
            done = torch.isin(nxt, stops)
            if bool(done.all()) or t == max_new_tokens - 1:
                break
            if bool(done.any()):  # stopped rows leave the batch
                keep = (~done).nonzero().squeeze(-1)
                cache.batch_select_indices(keep)
                active, nxt, mask, last = active[keep], nxt[keep], mask[keep], last[keep]
            mask = torch.cat([mask, torch.ones((len(active), 1), dtype=mask.dtype, device=dev)], dim=1)
            last = last + 1
            step = {"input_ids": nxt[:, None], "attention_mask": mask, "position_ids": last[:, None], kw: cache}
            out = forward(active, nxt, step) if forward is not None else model(**step, use_cache=True)
            logits, cache = out.logits[:, -1], cache_out(out)
    return new


def answer_text(tok, ids: torch.Tensor) -> str:
    """A generated row's answer: its text up to the first newline, stripped."""
    return tok.decode(ids.tolist(), skip_special_tokens=True).split("\n", 1)[0].strip()


@torch.inference_mode()
def generate(
    model, tok, prompts: Sequence[str], max_new_tokens: int = 50, batch_size: int = 16, shared=None,
) -> list[str]:
    """Greedy continuations, cut at the first newline (or eos), stripped.

    Prompts are prefilled one by one (so no work goes into padding) and decoded
    together; a row that has stopped leaves the batch. With ``shared``
    (``zoobj.model.prefix.SharedPrefix``) each prompt's frozen lower blocks are computed once
    and reused while the prompts and those weights stay; decoding runs every block.
    """
    dev, pad = device_of(model), tok.pad_token_id
    prompt_ids = encode(tok, prompts, special=True)
    order = sorted(range(len(prompts)), key=lambda i: len(prompt_ids[i]))  # less padding per batch
    stops = stop_tensor(tok, dev)
    results: list[str] = [""] * len(prompts)
    if shared is not None:
        shared.store.begin(tuple(p) for p in prompt_ids)
    for rows in batches(len(order), batch_size):
        idx = [order[i] for i in rows]
        fits = keeps_whole_prompt(model, max(len(prompt_ids[i]) for i in idx))
        merged = _merged_prefill(model, [prompt_ids[i] for i in idx], dev, shared)
        if merged is not None:
            logits, cache, mask = merged
        else:  # one padded batch
            ids, mask = left_pad([prompt_ids[i] for i in idx], pad, dev)
            out = _prefill(model, shared if fits else None, tuple(tuple(prompt_ids[i]) for i in idx),
                           input_ids=ids, attention_mask=mask, position_ids=positions(mask))
            logits, cache = out.logits[:, -1], cache_out(out)
        # decoding shares the lower blocks only where the prompt did and the cache stays whole
        dec = shared if fits and keeps_whole_prompt(model, mask.shape[1] + max_new_tokens) else None
        forward = None
        if dec is not None:
            paths = [(tuple(prompt_ids[i]), ()) for i in idx]  # each row's prompt and tokens so far

            def forward(active, nxt, step):
                for a, token in zip(active.tolist(), nxt.tolist()):
                    paths[a] = (paths[a][0], paths[a][1] + (token,))
                keys = [paths[a] for a in active.tolist()]
                return _through_shared(dec, lambda: dec.decode(keys, **step), lambda: model(**step, use_cache=True))

        new = greedy(model, logits, cache, mask, max_new_tokens, stops, pad, forward)
        for r, i in enumerate(idx):
            results[i] = answer_text(tok, new[r])
    return results


def target_nll(model, tok, prompts: Sequence[str], targets: Sequence[str], batch_size: int = 16,
               shared=None) -> float:
    """Mean negative log-likelihood per target token of ``targets[i]`` after ``prompts[i]``."""
    total, count = target_nll_sum(model, tok, prompts, targets, batch_size, shared=shared)
    if count == 0:
        raise ValueError("no target tokens to score")
    return total / count


@torch.inference_mode()
def target_nll_sum(model, tok, prompts: Sequence[str], targets: Sequence[str],
                   batch_size: int = 16, shared=None) -> tuple[float, int]:
    """``(summed NLL, number of target tokens)``: what data-parallel ranks add up.
    ``shared`` (``zoobj.model.prefix.SharedPrefix``): the frozen lower blocks over each batch
    of prompt + target sequences are computed once while they and those weights stay."""
    dev, pad = device_of(model), tok.pad_token_id
    total, count = 0.0, 0
    p_all = encode(tok, prompts, special=True)
    t_all = encode(tok, targets, special=False)
    if shared is not None:
        shared.store.begin(tuple(p + t) for p, t in zip(p_all, t_all))
    for rows in batches(len(prompts), batch_size):
        p_ids, t_ids = [p_all[i] for i in rows], [t_all[i] for i in rows]
        seqs = [p + t for p, t in zip(p_ids, t_ids)]
        ids, mask = left_pad(seqs, pad, dev)
        keep = max(len(t) for t in t_ids) + 1  # left padding: every target ends at the last position
        inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": positions(mask)}
        use = shared if keeps_whole_prompt(model, ids.shape[1]) else None
        with template.placed(model, [ids.shape[1] - len(t) for t in t_ids]):  # each prompt ends before its target
            out = _through_shared(use, lambda: shared.forward(tuple(tuple(s) for s in seqs), logits_to_keep=keep,
                                                              **inputs),
                                  lambda: model(**inputs, logits_to_keep=keep))
        logp = torch.log_softmax(out.logits[:, :-1].float(), dim=-1)  # position k predicts token k+1
        for r, t in enumerate(t_ids):
            if not t:
                continue
            nxt = torch.tensor(t, device=dev)
            total -= float(logp[r, -len(t):].gather(-1, nxt[:, None]).sum())
            count += len(t)
    return total, count

"""A template-tail step's probes one at a time, or together: seconds and agreement.

With ``--peft template`` the trained tensor is the input vectors of the prompt's
closing tokens, so a step's 2N probes differ only in those few vectors: they can run
as one batch, each row seeing its own probe's tail (``TemplateTail.per_row``), over
prompt bodies computed once (``PromptBodyStore``). ``MeZO.step(..., probes=)`` does
that for the hard generation metric. This bench takes one step's 2N points (the
engine's own, ``MeZO.points``) on the default model and a batch of 16 SQuAD training
questions, and times

- ``one at a time``: each point written into the tail, then ``inference.generate``
  through the store (what a step does without ``probes``);
- ``together, R rows``: ``PromptBodyStore.generate_probes`` with about R rows
  (questions times points) per forward;

with the prompt bodies already stored (both paths compute them once per batch; their
cost is printed apart); then the same for the cross-entropy objective (the gold
answers' NLL: ``inference.target_nll_sum`` one point at a time, or
``PromptBodyStore.nll_probes``). Ratio = seconds / the one-at-a-time seconds.
Agreement: the answers of every point, both ways (generation); the largest relative
difference of the points' NLL sums (CE). Memory: the highest resident set size during
the call above the one it started at (sampled every 5 ms). Last line: one JSON object.

    python bench/template_probes.py                 # about 7 minutes on 2 CPU cores
    python bench/template_probes.py --rows 64 --n 4
    python bench/template_probes.py --ce-only --start 115 --rows 16 32 64   # a batch with a 45-token answer
    python bench/template_probes.py --choice sst2 --rows 32 64 128    # a classification task's candidates

``--choice TASK`` times a classification task's candidate scores instead (its own
template tail and training rows): ``inference.score_candidates`` one point at a time
against ``PromptBodyStore.choice_probes``; agreement: the largest difference of a
point's softmax over the candidates (what the smoothed metric weighs).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import threading
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_cost import cpu_label  # noqa: E402


@contextlib.contextmanager
def rss_growth():
    """Yields a dict whose ``mib`` is, after the block, the peak resident set size during it
    minus the one at its start (Linux: /proc/self/statm, sampled every 5 ms)."""
    page = os.sysconf("SC_PAGE_SIZE") / 2**20
    with contextlib.suppress(OSError, AttributeError):  # freed memory back to the system first (glibc)
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)

    def rss() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    out, start, stop = {"mib": 0.0}, rss(), threading.Event()
    peak = [start]

    def sample() -> None:
        while not stop.wait(0.005):
            peak[0] = max(peak[0], rss())

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        yield out
    finally:
        stop.set()
        t.join()
        out["mib"] = max(peak[0], rss()) - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--n", type=int, default=8, help="directions (2n points)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--eps", type=float, default=0.2)
    ap.add_argument("--rows", type=int, nargs="+", default=[16, 64, 256], help="rows per forward, together")
    ap.add_argument("--start", type=int, default=0, help="the batch: training questions start .. start + batch size")
    ap.add_argument("--ce-only", action="store_true", help="only the cross-entropy part")
    ap.add_argument("--choice", metavar="TASK", help="a classification task's candidate scores instead of SQuAD")
    ap.add_argument("--unbounded", action="store_true",
                    help="CE together also without the cap on logits per forward (zoobj.model.tail_probes.PROBE_LOGITS)")
    args = ap.parse_args()
    warnings.simplefilter("ignore")

    from zoobj import MeZO
    from zoobj.model import inference
    from zoobj.model import tail_probes as shared_mod
    from zoobj.model.loading import load_model
    from zoobj.model.params import trainable_parameters
    from zoobj.model.params import TemplateParams
    from zoobj.model.template import template_tail
    from zoobj.tasks import get_task

    task = get_task(args.choice or "squad")
    rows = task.load("train")[args.start : args.start + args.batch_size]
    model, tok = load_model(args.model)
    model, named = trainable_parameters(model, "template", tok=tok, template_tail=template_tail(task, tok, rows))
    delta = named[0][1]
    shared, note = TemplateParams().fast_path(model, [delta])
    prompts = [task.prompt(r) for r in rows]
    points = MeZO([delta], lr=0.0, eps=args.eps, seed=0, n=args.n).points([11 + k for k in range(args.n)])
    stacked = torch.stack([p[0] for p in points])

    print(f"CPU: {cpu_label()}, {torch.get_num_threads()} threads; {args.model}, template tail "
          f"({delta.numel():,} numbers); {len(points)} points x {len(prompts)} {task.name} rows "
          f"(training {args.start}..{args.start + len(prompts) - 1})"
          + ("" if args.choice else f", {args.max_new_tokens}-token answers"))
    t0 = time.perf_counter()
    if args.choice:
        inference.score_candidates(model, tok, prompts, [task.choices(r) for r in rows], batch_size=len(prompts),
                                   shared=shared, relative=True)
    else:
        inference.generate(model, tok, prompts, max_new_tokens=args.max_new_tokens, batch_size=len(prompts),
                           shared=shared)
    print(f"bodies + one probe first: {time.perf_counter() - t0:.1f} s")
    result = {"cpu": cpu_label(), "points": len(points), "questions": len(prompts), "start": args.start}
    print(f"{'way':<30}{'seconds':>9}{'ratio':>8}{'agreement':>16}{'memory':>12}")

    def line(way: str, sec: float, one: float, agreement: str, mib: float) -> None:
        print(f"{way:<30}{sec:9.1f}{sec / one:8.3f}{agreement:>16}{f'+{mib:,.0f} MiB':>12}")

    base = delta.detach().clone()

    def each_point(fn):  # fn() at every point in turn, the tail written in place; then back
        out = []
        for p in points:
            with torch.no_grad():
                delta.copy_(p[0])
            out.append(fn())
        with torch.no_grad():
            delta.copy_(base)
        return out

    if args.choice:
        choice(args, model, tok, task, rows, shared, stacked, each_point, line, result)
        return
    if not args.ce_only:
        t0 = time.perf_counter()
        with rss_growth() as mem:
            alone = each_point(lambda: inference.generate(model, tok, prompts, max_new_tokens=args.max_new_tokens,
                                                          batch_size=len(prompts), shared=shared))
        one = time.perf_counter() - t0
        line("one at a time", one, one, "-", mem["mib"])
        result.update(one_at_a_time_s=round(one, 2), one_at_a_time_mib=round(mem["mib"]))
        for r in args.rows:
            t0 = time.perf_counter()
            with rss_growth() as mem:
                together = shared.generate_probes(tok, prompts, stacked, args.max_new_tokens, rows=r)
            sec = time.perf_counter() - t0
            same = sum(a == b for pa, pb in zip(alone, together) for a, b in zip(pa, pb))
            line(f"together, {r} rows", sec, one, f"{same}/{len(points) * len(prompts)}", mem["mib"])
            result[f"together_{r}_ratio"] = round(sec / one, 3)
            result[f"together_{r}_agreement"] = same / (len(points) * len(prompts))
            result[f"together_{r}_mib"] = round(mem["mib"])
    targets = [task.target(r) for r in rows]
    t0 = time.perf_counter()
    with rss_growth() as mem:
        nll = each_point(lambda: inference.target_nll_sum(model, tok, prompts, targets, batch_size=len(prompts),
                                                           shared=shared))
    one = time.perf_counter() - t0
    line("CE, one at a time", one, one, "-", mem["mib"])
    result.update(ce_one_at_a_time_s=round(one, 2), ce_one_at_a_time_mib=round(mem["mib"]))
    budgets = {"": shared_mod.PROBE_LOGITS} if not args.unbounded else {"": shared_mod.PROBE_LOGITS, ", no cap": 2**62}
    for r in args.rows:
        for label, cap in budgets.items():
            shared_mod.PROBE_LOGITS = cap
            t0 = time.perf_counter()
            with rss_growth() as mem:
                together = shared.nll_probes(tok, prompts, targets, stacked, rows=r)
            sec = time.perf_counter() - t0
            worst = max(abs(a[0] - b[0]) / abs(a[0]) for a, b in zip(nll, together))
            line(f"CE together, {r} rows{label}", sec, one, f"max rel {worst:.1e}", mem["mib"])
            key = f"ce_together_{r}{'_nocap' if label else ''}"
            result.update({f"{key}_ratio": round(sec / one, 3), f"{key}_max_rel_diff": float(f"{worst:.2e}"),
                           f"{key}_mib": round(mem["mib"])})
        shared_mod.PROBE_LOGITS = budgets[""]
    print(json.dumps(result))


def choice(args, model, tok, task, rows, shared, stacked, each_point, line, result) -> None:
    """--choice: the candidates' scores one point at a time, then together."""
    import numpy as np

    from zoobj.model import inference

    prompts, cands = [task.prompt(r) for r in rows], [task.choices(r) for r in rows]
    norm = getattr(task, "length_normalize", True)

    def soft(scores):
        return [np.exp(np.asarray(s) - max(s)) / np.exp(np.asarray(s) - max(s)).sum() for s in scores]

    t0 = time.perf_counter()
    with rss_growth() as mem:
        alone = each_point(lambda: inference.score_candidates(model, tok, prompts, cands, length_normalize=norm,
                                                              batch_size=len(prompts), shared=shared, relative=True))
    one = time.perf_counter() - t0
    line("one at a time", one, one, "-", mem["mib"])
    result.update(task=task.name, one_at_a_time_s=round(one, 2), one_at_a_time_mib=round(mem["mib"]))
    for r in args.rows:
        t0 = time.perf_counter()
        with rss_growth() as mem:
            together = shared.choice_probes(tok, prompts, cands, stacked, length_normalize=norm, rows=r)
        sec = time.perf_counter() - t0
        worst = max(float(np.abs(a - b).max()) for pa, pb in zip(alone, together)
                    for a, b in zip(soft(pa), soft(pb)))
        line(f"together, {r} rows", sec, one, f"max {worst:.1e}", mem["mib"])
        result.update({f"together_{r}_ratio": round(sec / one, 3), f"together_{r}_max_prob_diff": float(f"{worst:.2e}"),
                       f"together_{r}_mib": round(mem["mib"])})
    print(json.dumps(result))


if __name__ == "__main__":
    main()

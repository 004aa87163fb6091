"""A template-tail step's probes one at a time, or together: seconds and agreement.

With ``--peft template`` the trained tensor is the input vectors of the prompt's
closing tokens, so a step's 2N probes differ only in those few vectors: they can run
as one batch, each row seeing its own probe's tail (``TemplateTail.per_row``), over
prompt bodies computed once (``SharedPromptBody``). ``MeZO.step(..., probes=)`` does
that for the hard generation metric. This bench takes one step's 2N points (the
engine's own, ``MeZO.points``) on the default model and a batch of 16 SQuAD training
questions, and times

- ``one at a time``: each point written into the tail, then ``inference.generate``
  through the store (what a step does without ``probes``);
- ``together, R rows``: ``SharedPromptBody.generate_probes`` with about R rows
  (questions times points) per forward;

with the prompt bodies already stored (both paths compute them once per batch; their
cost is printed apart); then the same for the cross-entropy objective (the gold
answers' NLL: ``inference.target_nll_sum`` one point at a time, or
``SharedPromptBody.nll_probes``). Ratio = seconds / the one-at-a-time seconds.
Agreement: the answers of every point, both ways (generation); the largest relative
difference of the points' NLL sums (CE). Last line: one JSON object.

    python bench/template_probes.py                 # about 7 minutes on 2 CPU cores
    python bench/template_probes.py --rows 64 --n 4
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_cost import cpu_label  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--n", type=int, default=8, help="directions (2n points)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--eps", type=float, default=0.2)
    ap.add_argument("--rows", type=int, nargs="+", default=[16, 64, 256], help="rows per forward, together")
    args = ap.parse_args()
    warnings.simplefilter("ignore")

    from zoobj import MeZO, inference
    from zoobj.models import load_model, trainable_parameters
    from zoobj.shared import build
    from zoobj.tasks import get_task
    from zoobj.template import template_tail

    task = get_task("squad")
    rows = task.load("train")[: args.batch_size]
    model, tok = load_model(args.model)
    model, named = trainable_parameters(model, "template", tok=tok, template_tail=template_tail(task, tok, rows))
    delta = named[0][1]
    shared, note = build(model, [delta])
    prompts = [task.prompt(r) for r in rows]
    points = MeZO([delta], lr=0.0, eps=args.eps, seed=0, n=args.n).points([11 + k for k in range(args.n)])
    stacked = torch.stack([p[0] for p in points])

    t0 = time.perf_counter()
    inference.generate(model, tok, prompts, max_new_tokens=args.max_new_tokens, batch_size=len(prompts), shared=shared)
    bodies = time.perf_counter() - t0  # the bodies, and one probe at the base point

    base = delta.detach().clone()
    t0 = time.perf_counter()
    alone = []
    for p in points:
        with torch.no_grad():
            delta.copy_(p[0])
        alone.append(inference.generate(model, tok, prompts, max_new_tokens=args.max_new_tokens,
                                        batch_size=len(prompts), shared=shared))
    one = time.perf_counter() - t0
    with torch.no_grad():
        delta.copy_(base)

    print(f"CPU: {cpu_label()}, {torch.get_num_threads()} threads; {args.model}, template tail "
          f"({delta.numel():,} numbers); {len(points)} points x {len(prompts)} questions, "
          f"{args.max_new_tokens}-token answers; bodies + one probe first: {bodies:.1f} s")
    print(f"{'way':<22}{'seconds':>9}{'ratio':>8}{'agreement':>16}")
    print(f"{'one at a time':<22}{one:9.1f}{1.0:8.3f}{'-':>16}")
    result = {"cpu": cpu_label(), "points": len(points), "questions": len(prompts), "one_at_a_time_s": round(one, 2),
              "bodies_s": round(bodies, 2)}
    for r in args.rows:
        t0 = time.perf_counter()
        together = shared.generate_probes(tok, prompts, stacked, args.max_new_tokens, rows=r)
        sec = time.perf_counter() - t0
        same = sum(a == b for pa, pb in zip(alone, together) for a, b in zip(pa, pb))
        print(f"{f'together, {r} rows':<22}{sec:9.1f}{sec / one:8.3f}{f'{same}/{len(points) * len(prompts)}':>16}")
        result[f"together_{r}_ratio"] = round(sec / one, 3)
        result[f"together_{r}_agreement"] = same / (len(points) * len(prompts))
    targets = [task.target(r) for r in rows]
    t0 = time.perf_counter()
    nll = []
    for p in points:
        with torch.no_grad():
            delta.copy_(p[0])
        nll.append(inference.target_nll_sum(model, tok, prompts, targets, batch_size=len(prompts), shared=shared))
    one = time.perf_counter() - t0
    with torch.no_grad():
        delta.copy_(base)
    print(f"{'CE, one at a time':<22}{one:9.1f}{1.0:8.3f}{'-':>16}")
    result["ce_one_at_a_time_s"] = round(one, 2)
    for r in args.rows:
        t0 = time.perf_counter()
        together = shared.nll_probes(tok, prompts, targets, stacked, rows=r)
        sec = time.perf_counter() - t0
        worst = max(abs(a[0] - b[0]) / abs(a[0]) for a, b in zip(nll, together))
        print(f"{f'CE together, {r} rows':<22}{sec:9.1f}{sec / one:8.3f}{f'max rel {worst:.1e}':>16}")
        result[f"ce_together_{r}_ratio"] = round(sec / one, 3)
        result[f"ce_together_{r}_max_rel_diff"] = float(f"{worst:.2e}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()

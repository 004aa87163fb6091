"""How far the weights drift in low precision when nothing should move them.

200 MeZO steps at lr = 0 must leave the weights where they were. Side by side:

- ``inplace``: the paper's sequence, +eps z, -2 eps z, +eps z written into the
  weights; in bf16/fp16 each pass is rounded, so the weights walk away. At lr = 0
  the update does not depend on the losses, so this arm's closure returns a
  constant (the drift is exactly what a real run at lr = 0 would get).
- ``forward``: zoobj's exact scheme (perturbed weights built per module during the
  forward); its closure runs a real forward on one SST-2 sentence, so the hooks work.

For each: the share of weights changed, the largest change, the drift's norm
relative to the weights', and the cross-entropy on 32 SST-2 validation sentences
before and after. The LAST line is one JSON object.

    python bench/lowprec_drift.py                          # Gemma-3-270M, bf16 and fp16, 200 steps
    python bench/lowprec_drift.py --model DIR --steps 50
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from zoobj.engine.mezo import MeZO
from zoobj.model import inference
from zoobj.model.loading import load_model
from zoobj.model.params import trainable_parameters
from zoobj.tasks import get_task


def drift(model_name: str, dtype: str, perturb: str, steps: int, eps: float) -> dict:
    model, tok = load_model(model_name, dtype=dtype)
    model, named = trainable_parameters(model)  # the default full-parameter set (embeddings frozen)
    params = [p for _, p in named]
    start = [p.detach().clone() for p in params]
    task = get_task("sst2")
    held = task.load("validation")[:32]
    one = task.load("train")[:1]

    def ce(rows):
        return inference.target_nll(model, tok, [task.prompt(r) for r in rows], [task.target(r) for r in rows])

    before = ce(held)
    opt = MeZO(params, lr=0.0, eps=eps, perturb=perturb, model=model)
    closure = (lambda: ce(one)) if perturb == "forward" else (lambda: 0.0)
    t0 = time.time()
    for _ in range(steps):
        opt.step(closure)
    seconds = time.time() - t0
    changed = total = 0
    max_abs, num, den = 0.0, 0.0, 0.0
    for p, s in zip(params, start):
        d = p.detach().float() - s.float()
        changed += int((p.detach() != s).sum())
        total += p.numel()
        max_abs = max(max_abs, float(d.abs().max()))
        num += float((d * d).sum())
        den += float((s.float() ** 2).sum())
    return {"dtype": dtype, "perturb": perturb, "steps": steps, "changed_share": changed / total,
            "max_abs_change": max_abs, "relative_drift": (num / den) ** 0.5, "ce_before": before,
            "ce_after": ce(held), "seconds": round(seconds, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--eps", type=float, default=1e-3)
    ap.add_argument("--dtypes", default="bf16,fp16")
    args = ap.parse_args()
    rows = [drift(args.model, d, p, args.steps, args.eps) for d in args.dtypes.split(",") for p in ("inplace", "forward")]
    print(f"{'dtype':6}{'perturb':9}{'changed':>10}{'max |dw|':>11}{'|dw|/|w|':>11}{'CE before':>11}{'CE after':>10}")
    for r in rows:
        print(f"{r['dtype']:6}{r['perturb']:9}{r['changed_share']:>10.2%}{r['max_abs_change']:>11.3g}"
              f"{r['relative_drift']:>11.3g}{r['ce_before']:>11.4f}{r['ce_after']:>10.4f}")
    print(json.dumps({"model": args.model, "eps": args.eps, "rows": rows}))


if __name__ == "__main__":
    main()

"""What a probe costs when the frozen lower blocks are computed once per step.

On the default model (Gemma-3-270M, fp32), one run, arms interleaved round by round,
median of rounds:

- generation: a SQuAD-F1 step, batch 16 (train split), LoRA on the q/v projections of
  the top 4 blocks, training generations of 16 tokens;
- scoring: an SST-2 accuracy step, batch 16, full parameters of the top 4 blocks (plus
  the final norm);

each at N = 1 and N = 16 directions, by the plain path and by the shared path
(``zoobj.model.prefix``). The unit is one plain evaluation of the same batch with the same
trained set; a ratio is ``seconds per step / (2N x unit)``: 1.0 is what the plain path
must cost, less is what sharing saves.

The shared path also decodes from the store where a probe's tokens so far match ones
already decoded this step (``SharedPrefix.decode``); the share of decoding steps that
did is printed.

Agreement: for one N = 16 step per task, every probe is evaluated by both paths on the
same perturbed weights; the predictions are compared row by row (a scoring mismatch
whose two best candidates lie within 1e-4 is a float-rounding tie, counted apart) and
the losses to 1e-6. Peak memory: VmHWM after each arm, reset in between
(``/proc/self/clear_refs``), against the plain N = 1 step.

Last line: one JSON object with ``gen_n16_ratio``, ``gen_n1_ratio``, ``score_n16_ratio``,
``score_n1_ratio``, ``agreement`` (and the plain path's ratios, peak memory, the CPU).

    python bench/probe_cost.py                 # about 30-40 minutes on 2 CPU cores
    python bench/probe_cost.py --rounds 1 --n 4   # a quick look
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_cost import cpu_label  # noqa: E402


def reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_mib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def setup(kind: str, model_name: str, batch: int, gen: int):
    """(model, tok, params, task, rows, metric, max_new_tokens) for one of the two steps."""
    from zoobj.model.loading import load_model
    from zoobj.model.params import trainable_parameters
    from zoobj.tasks import get_task

    model, tok = load_model(model_name)
    peft, task_name, metric = ("lora", "squad", "f1") if kind == "gen" else ("none", "sst2", "accuracy")
    model, named = trainable_parameters(model, peft, seed=0, tok=tok, layers="top:4")
    params = [p for _, p in named]
    if peft == "lora":  # LoRA's B starts at zero; a trained adapter is not: make the probes differ
        with torch.no_grad():
            for p in params:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(p.numel()))
    task = get_task(task_name)
    rows = task.load("train")[:batch]
    return model, tok, params, task, rows, metric, gen if kind == "gen" else None


def agreement(model, tok, params, task, rows, metric, gen, shared, n: int, eps: float) -> dict:
    """Both paths on each probe of one n-direction step: identical predictions, losses."""
    from zoobj import MeZO
    from zoobj.metrics import get_metric
    from zoobj.run.objective import predict

    fn = get_metric(metric)
    refs = [task.reference(r) for r in rows]
    extra = {"prompts": [task.prompt(r) for r in rows], "rows": list(rows)}
    counts = {"rows": 0, "same": 0, "ties": 0, "losses": 0, "same_loss": 0}

    def closure():
        plain = predict(model, tok, task, rows, batch_size=len(rows), max_new_tokens=gen)
        fast = predict(model, tok, task, rows, batch_size=len(rows), max_new_tokens=gen, shared=shared)
        diff = [i for i, (a, b) in enumerate(zip(plain, fast)) if a != b]
        if diff and task.kind == "classification":
            from zoobj.model import inference

            scores = inference.score_candidates(model, tok, [task.prompt(rows[i]) for i in diff],
                                                [task.choices(rows[i]) for i in diff], batch_size=len(diff))
            counts["ties"] += sum(sorted(s)[-1] - sorted(s)[-2] < 1e-4 for s in scores)
        counts["rows"] += len(rows)
        counts["same"] += len(rows) - len(diff)
        lp, lf = -float(fn(plain, refs, **extra)), -float(fn(fast, refs, **extra))
        counts["losses"] += 1
        counts["same_loss"] += abs(lp - lf) <= 1e-6
        return lf

    MeZO(params, lr=0.0, eps=eps, seed=7, n=n).step(closure)  # lr 0: the weights end where they began
    return counts


def measure(kind: str, args) -> dict:
    from zoobj import MeZO
    from zoobj.model.prefix import SharedPrefix
    from zoobj.run.objective import make_objective

    model, tok, params, task, rows, metric, gen = setup(kind, args.model, args.batch, args.gen)
    shared, why = SharedPrefix.build(model, params)
    if shared is None:
        raise SystemExit(f"shared path unavailable: {why}")
    eps = 1e-2 if kind == "gen" else 1e-3
    plain_obj = make_objective("metric", model, tok, task, metric, batch_size=len(rows), max_new_tokens=gen)
    fast_obj = make_objective("metric", model, tok, task, metric, batch_size=len(rows), max_new_tokens=gen,
                              shared=shared)
    plain_obj(rows)  # warm-up: allocator, compile of the noise kernel
    fast_obj(rows)

    def step(objective, n):
        opt = MeZO(params, lr=0.0, eps=eps, seed=3, n=n)  # lr 0: every round starts from the same weights
        opt.step(lambda: objective(rows))

    step(plain_obj, 1)  # warm-up of the step itself: the noise kernel compiles on its first pass
    arms = {"unit": lambda: plain_obj(rows)}
    for n in sorted({1, args.n}):
        arms[f"plain_n{n}"] = lambda n=n: step(plain_obj, n)
        arms[f"shared_n{n}"] = lambda n=n: step(fast_obj, n)
    times: dict[str, list[float]] = {k: [] for k in arms}
    peaks: dict[str, float] = {}
    names = list(arms)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:  # the order turns each round
            reset_peak()
            t = time.perf_counter()
            arms[name]()
            times[name].append(time.perf_counter() - t)
            peaks[name] = max(peaks.get(name, 0.0), peak_mib())
            print(f"  {kind} round {r}: {name} {times[name][-1]:.2f} s", file=sys.stderr, flush=True)
    unit = statistics.median(times["unit"])
    decoded = shared.decode_hits + shared.decode_misses
    out = {"decode_hit_rate": shared.decode_hits / decoded if decoded else None, "unit_s": unit, "trained_parameters": sum(p.numel() for p in params), "cut": shared.cut,
           "prompt_tokens": statistics.mean(len(tok(task.prompt(r))["input_ids"]) for r in rows)}
    for n in sorted({1, args.n}):
        for path in ("plain", "shared"):
            out[f"{path}_n{n}_ratio"] = statistics.median(times[f"{path}_n{n}"]) / (2 * n * unit)
            out[f"{path}_n{n}_peak_over_plain_n1"] = peaks[f"{path}_n{n}"] / peaks["plain_n1"]
    out["agreement"] = agreement(model, tok, params, task, rows, metric, gen, shared, args.n, eps)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--gen", type=int, default=16, help="training generation length (SQuAD)")
    ap.add_argument("--n", type=int, default=16, help="directions of the population step")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", choices=["gen", "score"], help="one of the two steps")
    args = ap.parse_args()
    warnings.simplefilter("ignore")

    results = {kind: measure(kind, args) for kind in ("gen", "score") if args.only in (None, kind)}
    n = args.n
    print(f"CPU: {cpu_label()}, {torch.get_num_threads()} threads; batch {args.batch}, N = 1 and {n}, "
          f"median of {args.rounds} rounds; ratio = step seconds / (2N x one plain evaluation)")
    print(f"{'step':34} {'unit s':>7} {'plain':>7} {'shared':>7} {'peak/plain N=1':>15}")
    for kind, r in results.items():
        label = ("SQuAD F1, LoRA top 4, gen 16" if kind == "gen" else "SST-2 accuracy, full top 4") + f" (cut {r['cut']})"
        for k in sorted({1, n}):
            print(f"{label + f', N={k}':34} {r['unit_s']:7.2f} {r[f'plain_n{k}_ratio']:7.3f} "
                  f"{r[f'shared_n{k}_ratio']:7.3f} {r[f'shared_n{k}_peak_over_plain_n1']:15.3f}")
    if "gen" in results and results["gen"]["decode_hit_rate"] is not None:
        print(f"decoding steps that ran the upper blocks only (shared arms): {results['gen']['decode_hit_rate']:.1%}")
    rows = sum(r["agreement"]["rows"] for r in results.values())
    same = sum(r["agreement"]["same"] for r in results.values())
    ties = sum(r["agreement"]["ties"] for r in results.values())
    for kind, r in results.items():
        a = r["agreement"]
        print(f"agreement {kind}: {a['same']}/{a['rows']} predictions identical ({a['ties']} float-rounding ties), "
              f"{a['same_loss']}/{a['losses']} probe losses equal")
    summary = {"cpu": cpu_label(), "threads": torch.get_num_threads(), "n": n, "rounds": args.rounds,
               "agreement": round((same + ties) / rows, 5) if rows else None, "mismatches_not_ties": rows - same - ties}
    for kind, r in results.items():
        key = "gen" if kind == "gen" else "score"
        for k in sorted({1, n}):
            tag = f"n{k}"
            summary[f"{key}_{tag}_ratio"] = round(r[f"shared_n{k}_ratio"], 4)
            summary[f"{key}_{tag}_plain_ratio"] = round(r[f"plain_n{k}_ratio"], 4)
            summary[f"{key}_{tag}_peak_over_plain_n1"] = round(r[f"shared_n{k}_peak_over_plain_n1"], 4)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

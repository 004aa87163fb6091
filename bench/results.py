"""The paper's Table 3 pattern at the scale of this machine: zero-shot, MeZO on
cross-entropy, MeZO on the metric itself -- SST-2 accuracy and SQuAD F1 / EM.

Default model (Gemma-3-270M), shipped data, one seed schedule and the same step
budget for both trained arms of a task. Settings were picked on the dev split (held
out of train) with ``bench/sweep.py``; validation is only ever evaluated here. Every
arm is a resumable run directory under ``--out``: run the same command again (in a
later session, say) and unfinished arms continue from their trajectories.

Prints the table (validation metric with a 95% bootstrap interval, wall time per
arm) and writes ``results.json`` and one curve PNG per task into ``--out``.

    python bench/results.py                      # everything (hours on 2 cores; resumable)
    python bench/results.py --task sst2          # one task
    python bench/results.py --quick              # a small SST-2 slice, under 10 minutes
    python bench/results.py --quick --slice --model DIR   # the same code on a few rows and steps (a smoke test)

Each trained arm keeps the weights of its best dev evaluation (``--keep best``; dev is
held out of train), so validation sees one model per arm, chosen without validation.

``--quick`` checks an ordering and exits 1 when it does not hold: MeZO on accuracy
must beat zero-shot accuracy on the slice it evaluates.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

# Settings per task (chosen on dev with bench/sweep.py; see the README's Results section).
TASKS = {
    "sst2": dict(
        metric="accuracy", steps=400, batch_size=16, eval_limit=872, seed=0, eval_every=50, dev_limit=500, keep="best",
        # full parameters (the default recipe since trains the tail); CE over the vocabulary, the only form then
        ce=dict(peft="none", lr=1e-6, eps=1e-3, ce_over="vocabulary"),
        # the hard accuracy with a population of 8 directions, losses z-scored within the step (lr: a step length
        # per unit of noise), 50 steps = CE's 800 training forward passes; lr 1e-3 from the dev sweep
        # docs/results/sweeps/sst2-population (3e-3 overshot: dev 74.6 -> 61.2 by step 12). The plain arm before
        # it (lr 1e-5, n 1) peaked at step 100 of 400 and fell to 52.8 (README: "How it got there").
        metric_arm=dict(peft="none", lr=1e-3, eps=1e-3, n=8, shaping="zscore", steps=50, eval_every=5),
    ),
    # The template tail (--peft template: the input vectors of "\nAnswer:", 1,920 numbers), a population of 8
    # directions with z-scored losses, lr 0.2, eps 0.2, batch 16, from the dev sweep docs/results/sweeps/squad-template
    # (dev F1 20.7 -> 26.5 after 5 steps). Earlier LoRA, prefix, top-4-block and smoothed arms stayed within a point
    # or two of zero-shot (README: "How it got there"). CE trains the same tail with the same estimator and budget
    # (its settings were not tuned separately). 500 validation questions, EM of the same answers beside F1.
    "squad": dict(
        metric="f1", extra_metrics=["exact_match"], steps=40, batch_size=16, eval_limit=500, seed=0,
        eval_every=5, dev_limit=48, keep="best",
        ce=dict(peft="template", n=8, shaping="zscore", lr=0.2, eps=0.2),
        metric_arm=dict(peft="template", n=8, shaping="zscore", lr=0.2, eps=0.2, train_max_new_tokens=16),
    ),
}
QUICK = dict(sst2=dict(TASKS["sst2"], steps=60, eval_limit=200, eval_every=0, keep="last",
                       metric_arm=dict(TASKS["sst2"]["metric_arm"], steps=8, eval_every=0)))  # 128 passes vs CE's 120


def sliced(spec: dict) -> dict:
    """A spec cut down to a few rows and steps: the commands' code paths, not their numbers."""
    small = dict(steps=2, batch_size=2, eval_limit=4, dev_limit=4, eval_every=1)
    arm = {k: v for k, v in spec["metric_arm"].items() if k not in ("steps", "eval_every")}
    return {**spec, **small, "ce": dict(spec["ce"]), "metric_arm": {**arm, "steps": 1, "eval_every": 1},
            "train_max_new_tokens": 2}


def zero_shot(task_name: str, spec: dict, out: Path) -> dict:
    from zoobj.model.loading import load_model
    from zoobj.run.objective import evaluate, predict
    from zoobj.tasks import get_task

    path = out / "zero-shot.json"
    if path.exists():
        return json.loads(path.read_text())
    start = time.time()
    task = get_task(task_name)
    model, tok = load_model(spec.get("model", "gemma-3-270m"))
    rows = task.load(task.eval_split)[: spec["eval_limit"]]
    preds = predict(model, tok, task, rows, batch_size=32)
    result = {}
    for name in [spec["metric"], *spec.get("extra_metrics", [])]:
        r = evaluate(model, tok, task, name, rows=rows, predictions=preds)
        result[name] = {"value": r["value"], "ci95": r["ci95"], "n": r["n"]}
    result["wall_seconds"] = round(time.time() - start, 1)
    path.write_text(json.dumps(result, indent=1))
    return result


def trained(task_name: str, spec: dict, arm: str, out: Path) -> dict:
    from zoobj.engine import trajectory as tj
    from zoobj.run.train import TrainConfig, run

    run_dir = out / arm
    objective = "ce" if arm == "ce" else "metric"
    settings = dict(spec["ce"] if arm == "ce" else spec["metric_arm"])
    # an arm may set its own steps and dev interval: a population of n directions takes 1/n of the steps
    # for the same forward passes
    steps, eval_every = settings.pop("steps", spec["steps"]), settings.pop("eval_every", spec["eval_every"])
    if "model" in spec:
        settings["model"] = spec["model"]
    if "train_max_new_tokens" in spec and objective == "metric" and task_name == "squad":
        settings["train_max_new_tokens"] = spec["train_max_new_tokens"]
    cfg = TrainConfig(task=task_name, metric=spec["metric"], objective=objective, steps=steps,
                      batch_size=spec["batch_size"], eval_limit=spec["eval_limit"], seed=spec["seed"],
                      eval_every=eval_every, dev_limit=spec["dev_limit"], keep=spec.get("keep", "last"),
                      zero_shot=False, output=str(run_dir), **settings)  # zero_shot() scores the base model once
    done = run_dir / tj.EVAL
    finished = json.loads(done.read_text()) if done.exists() else {}
    if "kept_steps" not in finished or finished["steps"] < steps:
        # unfinished, finished before --keep existed (resuming at the same step count re-does only the final
        # evaluation, on the weights of the best dev step), or a budget raised in TASKS: continue the arm
        resume = (run_dir / tj.TRAJECTORY).exists()
        run(cfg, resume=resume)
        (run_dir / "extra_metrics.json").unlink(missing_ok=True)  # scored on the previous final weights
    result = json.loads(done.read_text())
    log = tj.read_jsonl(run_dir / tj.LOG)
    seconds = sum(r["seconds"] for r in log if r.get("event") == "step")
    dev = [r for r in log if r.get("event") == "dev"]
    summary = {spec["metric"]: {"value": result["value"], "ci95": result["ci95"], "n": result["n"]},
               "tie_rate": result["tie_rate"], "train_seconds": round(seconds), "steps": result["steps"],
               "kept_steps": result["kept_steps"], "best_dev": result["best_dev"],
               "last_dev": dev[-1]["value"] if dev else None,  # overshoot: how far the last is from the best
               "forward_passes": 2 * tj.read_json(run_dir / tj.CONFIG)["n"] * result["steps"],  # n as the run resolved it
               "wall_seconds": round(_wall(log))}
    extra = spec.get("extra_metrics", [])
    if extra:
        cached = run_dir / "extra_metrics.json"
        if not cached.exists():
            from zoobj.run.objective import evaluate
            from zoobj.tasks import get_task

            task = get_task(task_name)
            rows = task.load(task.eval_split)[: spec["eval_limit"]]
            # the final evaluation's own predictions (every finished arm has them: see the resume above)
            preds = [r["prediction"] for r in tj.read_jsonl(run_dir / tj.PREDICTIONS)]
            got = {}
            for name in extra:
                r = evaluate(None, None, task, name, rows=rows, predictions=preds)
                got[name] = {"value": r["value"], "ci95": r["ci95"], "n": r["n"]}
            cached.write_text(json.dumps(got, indent=1))
        summary.update(json.loads(cached.read_text()))
    return summary


def _wall(log: list[dict]) -> float:
    """Seconds the arm took: its steps, dev evaluations and last final evaluation (the log's timings,
    summed over every session that ran it)."""
    finals = [r for r in log if r.get("event") == "final"]
    return (sum(r.get("seconds", 0) for r in log if r.get("event") in ("step", "dev"))
            + (finals[-1].get("eval_seconds", 0) if finals else 0))


def plot(task_name: str, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from zoobj.engine import trajectory as tj
    from zoobj.run.plots import rolling_ties_and_grad

    fig, axes = plt.subplots(1, 4, figsize=(15, 3.2))
    for arm, colour in (("ce", "#4C72B0"), ("metric", "#DD8452")):
        log_path = out / arm / tj.LOG
        if not log_path.exists():
            continue
        log = tj.read_jsonl(log_path)
        dev = [r for r in log if r.get("event") == "dev"]
        steps = [r for r in log if r.get("event") == "step"]
        cfg_path = out / arm / "config.json"
        n = json.loads(cfg_path.read_text()).get("n", 1) if cfg_path.exists() else 1
        passes = 2 * n  # training forward passes per step: arms with populations are drawn on the same axis
        axes[0].plot([passes * tj.shown_step(r) for r in dev], [r["value"] for r in dev], marker="o", color=colour,
                     label=f"{arm} (n={n})")
        done = out / arm / tj.EVAL
        kept = json.loads(done.read_text()).get("kept_steps") if done.exists() else None
        if kept and any(tj.shown_step(r) == kept for r in dev):  # the step whose weights were evaluated
            axes[0].plot([passes * kept], [next(r["value"] for r in dev if tj.shown_step(r) == kept)], marker="*", ms=14,
                         color=colour, ls="none")
        w = max(1, min(25, len(steps) // 5))
        tie_rate, median_g = rolling_ties_and_grad(steps, w)
        x = [passes * k for k in range(w, len(steps) + 1)]
        axes[1].plot(x, tie_rate, color=colour, label=arm)
        axes[2].plot(x, median_g, color=colour, label=arm)
        spread = [r.get("spread") or 0.0 for r in steps]  # std of a step's 2n losses: how much a probe moves the loss
        axes[3].plot(x, [statistics.median(spread[i - w:i]) for i in range(w, len(steps) + 1)], color=colour, label=arm)
    zs = out / "zero-shot.json"
    if zs.exists():
        metric = next(k for k in json.loads(zs.read_text()) if k != "wall_seconds")
        axes[0].axhline(json.loads(zs.read_text())[metric]["value"], color="#999999", ls="--", label="zero-shot (val)")
    axes[0].set(title=f"{task_name}: dev metric", xlabel="training forward passes")
    axes[1].set(title="tie rate (l+ == l-), rolling", xlabel="training forward passes", ylim=(-0.05, 1.05))
    axes[2].set(title="|g| or shaped coefficient, median", xlabel="training forward passes", yscale="log")
    axes[3].set(title="loss spread in a step, median", xlabel="training forward passes")
    axes[3].set_yscale("symlog", linthresh=1e-3)
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / f"{task_name}.png"
    fig.savefig(path, dpi=70)
    plt.close(fig)
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", choices=sorted(TASKS), action="append")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--model", default=None, help="a model other than the default (e.g. a tiny one for --slice)")
    ap.add_argument("--slice", action="store_true", help="a few rows and steps per arm: the code, not the numbers "
                    "(no ordering check)")
    ap.add_argument("--arm", choices=("ce", "metric"), action="append",
                    help="train only this arm (repeatable); the others are read if their run directory has finished")
    args = ap.parse_args()
    if args.quick:
        args.arm = None  # the check needs both arms
    specs = QUICK if args.quick else {k: TASKS[k] for k in (args.task or TASKS)}
    specs = {k: {**(sliced(v) if args.slice else v), **({"model": args.model} if args.model else {})}
             for k, v in specs.items()}
    root = Path(args.out or ("runs/results-quick" if args.quick else "runs/results"))
    table = {}
    for name, spec in specs.items():
        out = root / name
        out.mkdir(parents=True, exist_ok=True)
        arms = {"zero-shot": zero_shot(name, spec, out)}
        for arm in ("ce", "metric"):
            if args.arm and arm not in args.arm and not (out / arm / "eval.json").exists():
                continue  # not asked for and not there: its cells read "-"
            arms[arm] = trained(name, spec, arm, out)
        table[name] = arms
        plot(name, out)
    previous = json.loads((root / "results.json").read_text()) if (root / "results.json").exists() else {}
    (root / "results.json").write_text(json.dumps({**previous, **table}, indent=1))  # other tasks' rows stay

    def cell(r, metric):
        if r is None or metric not in r:
            return "-"
        low, high = r[metric]["ci95"]
        return f"{100 * r[metric]['value']:.1f} [{100 * low:.1f}, {100 * high:.1f}]"

    print("| arm | " + " | ".join(f"{t} {m}" for t, s in specs.items()
                                    for m in [s["metric"], *s.get("extra_metrics", [])]) + " |")
    for arm, label in (("zero-shot", "zero-shot"), ("ce", "MeZO-CE"), ("metric", "MeZO-metric")):
        cells = [cell(table[t].get(arm), m) for t, s in specs.items() for m in [s["metric"], *s.get("extra_metrics", [])]]
        print(f"| {label} | " + " | ".join(cells) + " |")
    for t in specs:
        for arm in ("ce", "metric"):
            r = table[t].get(arm)
            if r is None:
                continue
            kept = "" if r["kept_steps"] == r["steps"] else f" (kept step {r['kept_steps']}, best dev {r['best_dev']:.3f})"
            last = "" if r.get("last_dev") is None else f", last dev {r['last_dev']:.3f}"
            print(f"{t} {arm}: {r['steps']} steps, {r.get('forward_passes', '?')} training forward passes{kept}{last}, "
                  f"{r['train_seconds']} s of steps, {r.get('wall_seconds', '?')} s in all, tie rate {r['tie_rate']:.0%}")
    if args.quick and not args.slice:
        r, z = table["sst2"]["metric"]["accuracy"], table["sst2"]["zero-shot"]["accuracy"]
        ok = r["value"] > z["value"]
        print(f"check: MeZO-metric accuracy {r['value']:.3f} > zero-shot {z['value']:.3f}: {'holds' if ok else 'FAILS'}")
        return 0 if ok else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

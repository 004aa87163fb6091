"""A short settings sweep on the dev split (held out of train), never on validation.

Each setting is a real ``zoobj`` run (``runs/sweep/<name>``, resumable) evaluated on
the dev rows every ``--eval-every`` steps; the final validation evaluation is skipped
(``eval_limit`` 0 would be refused, so it scores just 1 example and is ignored). One
line per setting: dev metric at each evaluation, tie rate, median |g|, seconds/step.
The LAST line is one JSON object.

    python bench/sweep.py --task sst2 --steps 150 \\
        --arm ce:lr=1e-6 --arm ce:lr=5e-6 --arm metric:lr=1e-6,eps=1e-2
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def parse_arm(text: str) -> tuple[str, dict]:
    objective, _, rest = text.partition(":")
    settings = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        settings[key.strip()] = json.loads(value) if value.strip()[0] in "[{\"tf" else float(value)
    for key in ("n", "batch_size", "train_max_new_tokens", "seed", "steps", "dev_limit"):
        if key in settings:
            settings[key] = int(settings[key])
    return objective, settings


def main() -> None:
    from zoobj.engine import trajectory as tj
    from zoobj.run.train import TrainConfig, run

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", required=True)
    ap.add_argument("--metric")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--dev-limit", type=int, default=200)
    ap.add_argument("--peft", default="none")
    ap.add_argument("--arm", action="append", required=True, help="objective:key=value,... (TrainConfig fields)")
    ap.add_argument("--out", default="runs/sweep")
    ap.add_argument("--plot", help="also draw every arm's dev metric, tie rate and |g| into this PNG")
    args = ap.parse_args()
    rows = []
    for text in args.arm:
        objective, settings = parse_arm(text)
        plain = text.replace(":", "-").replace(",", "-").replace("=", "").replace('"', "")  # no quotes in paths
        name = f"{args.task}-{plain}"
        out = Path(args.out) / name
        cfg = TrainConfig(task=args.task, metric=args.metric, objective=objective, steps=args.steps,
                          batch_size=args.batch_size, eval_every=args.eval_every, dev_limit=args.dev_limit,
                          eval_limit=1, zero_shot=False, peft=args.peft, output=str(out),
                          **{k: v for k, v in settings.items()})
        resume = (out / tj.TRAJECTORY).exists()
        if resume and len(tj.read_trajectory(out / tj.TRAJECTORY)) >= args.steps:
            pass  # done already: just report it
        else:
            run(cfg, resume=resume)
        log = tj.read_jsonl(out / tj.LOG)
        steps = [r for r in log if r.get("event") == "step"]
        dev = [(tj.shown_step(r), round(r["value"], 4)) for r in log if r.get("event") == "dev"]
        row = {"arm": text, "dev": dev, "tie_rate": sum(r["ties"] > 0 for r in steps) / len(steps),
               "median_abs_g": statistics.median(abs(r["grad"]) for r in steps),
               "seconds_per_step": statistics.median(r["seconds"] for r in steps)}
        row["log"] = str(out / tj.LOG)
        rows.append(row)
        print(f"{text:40} dev {dev}  ties {row['tie_rate']:.0%}  |g| {row['median_abs_g']:.3g}  "
              f"{row['seconds_per_step']:.2f} s/step", flush=True)
    if args.plot:
        plot(rows, args.plot, args.task)
    for row in rows:
        row.pop("log")
    print(json.dumps({"task": args.task, "steps": args.steps, "batch_size": args.batch_size, "rows": rows}))


def plot(rows: list[dict], path: str, task: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from zoobj.engine import trajectory as tj
    from zoobj.run.plots import rolling_ties_and_grad

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for row in rows:
        log = tj.read_jsonl(row["log"])
        steps = [r for r in log if r.get("event") == "step"]
        w = max(1, min(20, len(steps) // 5))
        x = range(w, len(steps) + 1)
        axes[0].plot([0] + [s for s, _ in row["dev"]], [np.nan] + [v for _, v in row["dev"]], marker="o", label=row["arm"])
        tie_rate, median_g = rolling_ties_and_grad(steps, w)
        axes[1].plot(x, tie_rate, label=row["arm"])
        axes[2].plot(x, median_g, label=row["arm"])
    axes[0].set(title=f"{task}: dev metric", xlabel="step")
    axes[1].set(title="tie rate (l+ == l-), rolling", xlabel="step", ylim=(-0.05, 1.05))
    axes[2].set(title="|projected gradient|, rolling median", xlabel="step", yscale="symlog")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    plt.close(fig)


if __name__ == "__main__":
    main()

"""Gaussian against Rademacher directions at equal forward passes, on dev.

Reads run directories made by ``bench/sweep.py`` (one per noise kind and seed, the
same settings otherwise, so every arm has made the same number of training forward
passes at each dev evaluation) and prints, per task: each arm's dev metric with its
95% interval at every evaluation, the mean over seeds per kind, whether the kinds'
intervals overlap at each point, and the median seconds per step. Draws dev metric
against training forward passes (``--png``). The LAST line is one JSON object.

The runs of docs/benchmarks.md (2 seeds per kind, the SST-2 and SQuAD settings of the results
page at equal budgets; about 90 minutes on 2 cores):

    python bench/sweep.py --task sst2 --metric accuracy --steps 30 --batch-size 16 --eval-every 5 \\
        --dev-limit 300 --out docs/results/noise/sst2 \\
        --arm 'metric:lr=1e-3,eps=1e-3,n=8,shaping="zscore",noise="gaussian",seed=0' \\
        --arm 'metric:lr=1e-3,eps=1e-3,n=8,shaping="zscore",noise="rademacher",seed=0' \\
        --arm 'metric:lr=1e-3,eps=1e-3,n=8,shaping="zscore",noise="gaussian",seed=1' \\
        --arm 'metric:lr=1e-3,eps=1e-3,n=8,shaping="zscore",noise="rademacher",seed=1'
    python bench/sweep.py --task squad --metric f1 --peft template --steps 12 --batch-size 16 \\
        --eval-every 4 --dev-limit 64 --out docs/results/noise/squad \\
        --arm 'metric:noise="gaussian",seed=0' --arm 'metric:noise="rademacher",seed=0' \\
        --arm 'metric:noise="gaussian",seed=1' --arm 'metric:noise="rademacher",seed=1'
    python bench/noise_kinds.py docs/results/noise/sst2 docs/results/noise/squad --png docs/results/noise/kinds.png
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def read_arm(run_dir: Path) -> dict:
    from zoobj.engine import trajectory as tj

    config = tj.read_json(run_dir / tj.CONFIG)
    log = tj.read_jsonl(run_dir / tj.LOG)
    steps = [r for r in log if r.get("event") == "step"]
    per_step = 2 * config.get("n", 1)  # closure calls a step: each a forward over the batch
    dev = [(tj.shown_step(r) * per_step, r["value"], r["ci95"]) for r in log if r.get("event") == "dev"]
    return {"task": config["task"], "kind": config.get("noise", "gaussian"), "seed": config["seed"], "dev": dev,
            "seconds_per_step": statistics.median(r["seconds"] for r in steps) if steps else None,
            "trainable": config.get("trainable_parameters")}


def compare(arms: list[dict]) -> dict:
    """Per forward-pass count: each kind's mean over seeds, and whether some interval of one
    kind overlaps some interval of the other (no overlap anywhere: a difference beyond noise)."""
    points = sorted({p for a in arms for p, _, _ in a["dev"]})
    rows = []
    for p in points:
        at = {k: [(v, ci) for a in arms if a["kind"] == k for q, v, ci in a["dev"] if q == p]
              for k in ("gaussian", "rademacher")}
        if not all(at.values()):
            continue
        overlap = any(g[0] <= r[1] and r[0] <= g[1] for _, g in at["gaussian"] for _, r in at["rademacher"])
        rows.append({"passes": p, **{k: round(statistics.mean(v for v, _ in at[k]), 4) for k in at},
                     "intervals_overlap": overlap})
    return {"points": rows,
            "seconds_per_step": {k: statistics.median(a["seconds_per_step"] for a in arms if a["kind"] == k)
                                 for k in ("gaussian", "rademacher") if any(a["kind"] == k for a in arms)}}


def plot(by_task: dict[str, list[dict]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(by_task), figsize=(5.5 * len(by_task), 3.4), squeeze=False)
    for ax, (task, arms) in zip(axes[0], by_task.items()):
        for a in sorted(arms, key=lambda a: (a["kind"], a["seed"])):
            xs, ys = [p for p, _, _ in a["dev"]], [v for _, v, _ in a["dev"]]
            lo, hi = [ci[0] for _, _, ci in a["dev"]], [ci[1] for _, _, ci in a["dev"]]
            color = "C0" if a["kind"] == "gaussian" else "C3"
            style = "-" if a["seed"] == 0 else "--"
            ax.plot(xs, ys, style, color=color, marker="o", ms=3, label=f"{a['kind']} seed {a['seed']}")
            ax.fill_between(xs, lo, hi, color=color, alpha=0.06)
        ax.set(title=f"{task}: dev metric (95% intervals shaded)", xlabel="training forward passes")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("roots", nargs="+", help="folders holding one bench/sweep.py run directory per arm")
    ap.add_argument("--png", help="draw dev metric against forward passes here")
    args = ap.parse_args()
    by_task: dict[str, list[dict]] = {}
    for root in args.roots:
        for run_dir in sorted(p.parent for p in Path(root).glob("*/config.json")):
            arm = read_arm(run_dir)
            if not arm["dev"]:
                continue  # not evaluated yet (a run under way)
            by_task.setdefault(arm["task"], []).append(arm)
    out = {}
    for task, arms in by_task.items():
        print(f"{task} ({arms[0]['trainable']:,} trained numbers)")
        for a in sorted(arms, key=lambda a: (a["kind"], a["seed"])):
            points = "  ".join(f"{p}: {v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" for p, v, ci in a["dev"])
            print(f"  {a['kind']:10} seed {a['seed']}  {a['seconds_per_step']:.1f} s/step  {points}")
        out[task] = compare(arms)
        for row in out[task]["points"]:
            print(f"  at {row['passes']} passes: mean gaussian {row['gaussian']:.3f}, rademacher "
                  f"{row['rademacher']:.3f}; intervals overlap: {row['intervals_overlap']}")
    if args.png:
        plot(by_task, args.png)
    print(json.dumps(out))


if __name__ == "__main__":
    main()

"""curve.png of a run directory: loss, dev metric, tie rate and |projected gradient|
against the step (steps counted from 1, as everywhere else), read from its log.jsonl."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from zoobj.engine import trajectory as tj


def rolling_ties_and_grad(steps: list[dict], window: int) -> tuple[np.ndarray, list[float]]:
    """Over each run of ``window`` consecutive step records of a log: the tie rate -- the
    share of the window's directions with l+ == l-, as the summary counts it -- and the
    median |projected gradient|, one value per full window."""
    tied = np.convolve([float(r["ties"]) for r in steps], np.ones(window), mode="valid")
    directions = np.convolve([float(r.get("directions", 1)) for r in steps], np.ones(window), mode="valid")
    tie_rate = np.minimum(1.0, tied / directions)
    g = np.abs([r["grad"] for r in steps])
    return tie_rate, [float(np.median(g[i : i + window])) for i in range(len(g) - window + 1)]


def plot_curve(run_dir: str | Path) -> None:
    """curve.png: loss, dev metric, tie rate and |projected gradient| against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    log = tj.read_jsonl(run_dir / tj.LOG)
    steps = [r for r in log if r.get("event") == "step"]
    dev = [r for r in log if r.get("event") == "dev"]
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.2))
    xs = [tj.shown_step(r) for r in steps]  # steps counted from 1, as everywhere else
    axes[0].plot(xs, [r["loss"] for r in steps], lw=1)
    axes[0].set(title="loss (mean of l+ and l-)", xlabel="step")
    if dev:
        axes[1].plot([tj.shown_step(r) for r in dev], [r["value"] for r in dev], marker="o")
    else:  # say so, rather than an empty 0-1 panel
        axes[1].text(0.5, 0.5, "no dev evaluation\n(--eval-every 0)", ha="center", va="center",
                     transform=axes[1].transAxes, color="0.4")
        axes[1].set_yticks([])
    axes[1].set(title="dev metric (after step)", xlabel="step")
    window = 0
    if steps:
        window = max(1, min(20, len(steps) // 4))  # several points even for a short run
        tie_rate, median_g = rolling_ties_and_grad(steps, window)
        axes[2].plot(xs[window - 1 :], tie_rate, marker=".")
        g = np.abs([r["grad"] for r in steps])
        axes[3].plot(xs, g, lw=0.5, alpha=0.4)
        axes[3].plot(xs[window - 1 :], median_g, lw=1.5)
        if (g > 0).any():
            axes[3].set_yscale("symlog", linthresh=max(1e-6, float(np.min(g[g > 0]))))
    axes[2].set(title=f"tie rate (rolling {window})", xlabel="step", ylabel="share of directions tied",
                ylim=(-0.05, 1.05))
    axes[3].set(title=f"|g| (rolling median {window})", xlabel="step", ylabel="|projected gradient|")
    from matplotlib.ticker import LogFormatterSciNotation, MaxNLocator

    if axes[3].get_yscale() == "symlog":
        axes[3].yaxis.set_major_formatter(LogFormatterSciNotation(linthresh=axes[3].yaxis.get_transform().linthresh))
    last = max(xs + [tj.shown_step(r) for r in dev] + [1])
    for ax in axes:
        ax.set_xlim(0.5, last + 0.5)  # every panel over the run's steps
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    fig.tight_layout()
    tmp = run_dir / ".curve.tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, run_dir / tj.CURVE)

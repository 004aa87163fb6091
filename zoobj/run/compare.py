"""zero-shot vs MeZO on cross-entropy vs MeZO on the metric: same seed, same budget."""

from __future__ import annotations

import dataclasses
import os
import time
from datetime import datetime
from pathlib import Path

from zoobj.engine import trajectory as tj
from zoobj.run.train import TrainConfig, run


def _steps(r: dict) -> str:
    steps, kept = r.get("steps", 0), r.get("kept_steps")
    return str(steps) if kept in (None, steps) else f"{kept} of {steps} (best dev)"


# The settings both arms share, as zoobj train takes them (zoobj.run.config), and the
# comparison's own defaults where they differ (none now: each arm is the run zoobj train
# makes, its dev evaluations and best dev step included).
SETTINGS = ("metric", "model", "steps", "batch_size", "lr", "eps", "n", "shaping", "peft", "layers", "shared", "seed",
            "eval_limit", "eval_every", "dev_limit", "keep", "train_max_new_tokens")
DEFAULTS: dict = {}


def compare(task: str, ce_lr: float | None = None, output: str | None = None, reporter_factory=None,
            **settings) -> Path:
    """Runs the three arms into ``output`` and writes ``report.md`` and ``compare.png``; returns report.md.

    ``settings``: TrainConfig's (see SETTINGS), the same for both arms; one left out or
    None is the default (DEFAULTS, else TrainConfig's). ``ce_lr``: the cross-entropy
    arm's learning rate (default: ``lr``)."""
    from zoobj.model.loading import load_model
    from zoobj.run.objective import ce_over_for, evaluate, shared_classes
    from zoobj.tasks import get_task

    base = TrainConfig(task=task, zero_shot=False, **{**DEFAULTS, **{k: v for k, v in settings.items() if v is not None}})
    base = dataclasses.replace(base.resolved(), output=None)  # the task's recipe and the defaults, for both arms
    t = get_task(task)
    metric = base.metric = base.metric or t.metric
    out = Path(output or Path("runs") / f"compare-{t.name}-{metric}-{datetime.now():%Y%m%d-%H%M%S}")
    out.mkdir(parents=True, exist_ok=True)

    start = time.time()
    m, tok = load_model(base.model)
    rows = t.load(t.eval_split)[: base.eval_limit]
    zero = evaluate(m, tok, t, metric, rows=rows, batch_size=base.batch_size)
    zero.update(wall_seconds=round(time.time() - start, 1))
    arms = {"zero-shot": zero}
    if shared_classes(t, rows) is not None:  # calibration applies: the cheapest fix, beside the trained arms
        began = time.time()
        arms["zero-shot, calibrated"] = evaluate(m, tok, t, metric, rows=rows, batch_size=base.batch_size,
                                                 calibrate=True)
        arms["zero-shot, calibrated"].update(wall_seconds=round(time.time() - began, 1))
    del m, tok
    for name, objective, arm_lr in (("MeZO (cross-entropy)", "ce", ce_lr if ce_lr is not None else base.lr),
                                    (f"MeZO ({metric})", "metric", base.lr)):
        arms[name] = run(_arm(base, t, objective, arm_lr, out), reporter=reporter_factory() if reporter_factory else None)

    lines = [f"# zoobj compare: {t.name}, {metric}", "",
             f"Model {base.model}; {base.steps} steps, batch {base.batch_size}, seed {base.seed}, parameters: {base.peft}; "
             f"population {base.n} ({base.shaping}), lr {base.lr:g}, eps {base.eps}{_scale(base)} for both arms"
             f"{f', the metric smoothed (T = {base.smooth:g})' if base.smooth else ''}"
             f", cross-entropy over the {base.ce_over or ce_over_for(t)}"
             f"{f' ({base.recipe} recipe)' if base.recipe else ''}; "
             f"evaluated on the first {zero['n']} examples of {zero['split']} (95% bootstrap intervals).", "",
             f"| | {metric} | 95% CI | steps | eps | tie rate | wall time |", "|---|---|---|---|---|---|---|"]
    for name, r in arms.items():
        low, high = r["ci95"]
        tie = f"{r['tie_rate']:.0%}" if "tie_rate" in r else "-"
        lines.append(f"| {name} | {100 * r['value']:.1f} | [{100 * low:.1f}, {100 * high:.1f}] | "
                     f"{_steps(r)} | {_eps(r)} | {tie} | {r['wall_seconds']:.0f} s |")
    lines += ["", "Which differences lie outside the 95% intervals (the two intervals do not overlap):", ""]
    lines += [f"- {line}" for line in differences(arms)]
    lines += ["", "Runs: `ce/` and `metric/` (each a full run directory; `zoobj export` rebuilds its weights).", ""]
    report = out / "report.md"
    tmp = out / ".report.md.tmp"
    tmp.write_text("\n".join(lines))
    os.replace(tmp, report)
    tj.write_json(out / "compare.json", {k: {kk: vv for kk, vv in v.items() if kk != "predictions"}
                                          for k, v in arms.items()})
    _plot(arms, metric, out / "compare.png")
    return report


def differences(arms: dict) -> list[str]:
    """Each pair of arms, the later against the earlier, in words: which is higher, by how
    much (in points), and whether their 95% intervals are apart.

    >>> arms = {"zero-shot": {"value": 0.5, "ci95": [0.45, 0.55]},
    ...         "MeZO (f1)": {"value": 0.7, "ci95": [0.65, 0.75]},
    ...         "MeZO (cross-entropy)": {"value": 0.52, "ci95": [0.47, 0.57]}}
    >>> differences(arms)[0]
    'MeZO (f1) is 20.0 points above zero-shot: outside the intervals'
    >>> differences(arms)[1]
    'MeZO (cross-entropy) is 2.0 points above zero-shot: within the intervals'
    """
    names, out = list(arms), []
    for j, b in enumerate(names):
        for a in names[:j]:
            (va, (la, ha)), (vb, (lb, hb)) = (arms[a]["value"], arms[a]["ci95"]), (arms[b]["value"], arms[b]["ci95"])
            apart = lb > ha or hb < la
            where = (f"is {100 * abs(vb - va):.1f} points {'above' if vb > va else 'below'}" if vb != va
                     else "is level with")
            out.append(f"{b} {where} {a}: {'outside' if apart else 'within'} the intervals")
    return out


def _arm(base: TrainConfig, task, objective: str, lr: float, out: Path) -> TrainConfig:
    """One trained arm's settings: the shared ones, and what is the objective's own (the
    metric's smoothing and generation length; what cross-entropy normalises over)."""
    from zoobj.run.objective import ce_over_for

    metric = objective == "metric"
    return dataclasses.replace(base, objective=objective, lr=lr, output=str(out / objective),
                               ce_over=None if metric else (base.ce_over or ce_over_for(task)),
                               train_max_new_tokens=base.train_max_new_tokens if metric else None,
                               smooth=base.smooth if metric else 0.0)


def _scale(cfg) -> str:
    return f", scale {cfg.scale}" if cfg.scale != 1 else ""


def _eps(result: dict) -> str:
    """The eps an arm ran with and its scale (from its config.json: --eps auto and --scale
    auto choose them per arm)."""
    config = Path(result.get("run_dir", "")) / tj.CONFIG
    if "run_dir" not in result or not config.exists():
        return "-"
    saved = tj.read_json(config)
    scale = saved.get("scale", 1.0)
    return (f"{saved['eps']:g}" + (" (auto)" if "eps_calibration" in saved else "")
            + (f" x{scale:g}" if scale != 1 else "") + (" (scale auto)" if "scale_calibration" in saved else ""))


def _plot(arms: dict, metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(arms)
    values = [arms[k]["value"] for k in names]
    errs = [[v - arms[k]["ci95"][0] for k, v in zip(names, values)], [arms[k]["ci95"][1] - v for k, v in zip(names, values)]]
    fig, ax = plt.subplots(figsize=(7, 4))
    colors = {"zero-shot": "#999999", "zero-shot, calibrated": "#C7C7C7"}
    ax.bar(names, values, yerr=errs, capsize=6, color=[colors.get(k, "#4C72B0" if "cross" in k else "#DD8452")
                                                      for k in names])
    ax.set_ylabel(metric)
    ax.set_ylim(0, 1)
    ax.set_title("zero-shot vs MeZO-CE vs MeZO-metric (95% CI)")
    fig.tight_layout()
    tmp = path.with_name("." + path.name)
    fig.savefig(tmp, dpi=150, format="png")  # 1050 x 600
    plt.close(fig)
    os.replace(tmp, path)

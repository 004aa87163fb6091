"""``--report-to``: the numbers of ``log.jsonl`` sent to the experiment trackers people
use, by the Hugging Face Trainer's names (``tensorboard``, ``mlflow``, ``wandb``,
``none``). Each tracker is an optional extra (``pip install 'zoobj[tensorboard]'``, ...);
one asked for but not installed is a one-line error naming the pip command, before the
model loads.

What goes where: the run's settings as hyperparameters; each step's ``train/loss``,
``train/grad``, ``train/tie_rate``, ``train/spread`` and ``train/seconds`` at the step
counted from 1; each dev evaluation as ``dev/<metric>``; the zero-shot and final
evaluations as ``eval/zero_shot_<metric>`` and ``eval/<metric>`` (with ``eval/tie_rate``,
``eval/wall_seconds``). Where: TensorBoard event files in ``<run dir>/tensorboard``;
MLflow's ``MLFLOW_TRACKING_URI``, else a local file store in ``<run dir>/mlruns``
(experiment ``zoobj``); W&B's project ``$WANDB_PROJECT`` or ``zoobj``, its files under
the run directory (``WANDB_MODE=offline`` keeps them there).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from zoobj.errors import ConfigError

REPORT_TO = ("none", "tensorboard", "mlflow", "wandb")
# the module each tracker needs, and the extra that installs it
NEEDS = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow"), "wandb": ("wandb", "wandb")}


def parse(report_to: str | None) -> list[str]:
    """The trackers of ``--report-to`` (comma-separated; ``none`` or nothing: none), each
    checked to be a known name whose package is installed."""
    names = [x.strip() for x in (report_to or "none").split(",") if x.strip() and x.strip() != "none"]
    for name in names:
        if name not in REPORT_TO:
            raise ConfigError(f"unknown --report-to {name!r}; choose from {', '.join(REPORT_TO)} (comma-separated)")
        module, extra = NEEDS[name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"--report-to {name} needs the {module} package: pip install 'zoobj[{extra}]'")
    return list(dict.fromkeys(names))


def _scalar_entries(entry: dict, metric: str) -> tuple[int | None, dict[str, float]]:
    """A log.jsonl entry as ``(step counted from 1, {name: value})``; nothing for the others."""
    event = entry.get("event")
    if event == "step":
        keys = ("loss", "grad", "tie_rate", "spread", "seconds")
        return entry["step"] + 1, {f"train/{k}": float(entry[k]) for k in keys if entry.get(k) is not None}
    if event == "dev":
        return entry["step"] + 1, {f"dev/{metric}": float(entry["value"])}
    if event == "zero_shot":
        return 0, {f"eval/zero_shot_{metric}": float(entry["value"])}
    if event == "final":
        values = {f"eval/{metric}": float(entry["value"]), "eval/tie_rate": float(entry["tie_rate"]),
                  "eval/wall_seconds": float(entry["wall_seconds"])}
        return int(entry["steps"]), values
    return None, {}


class _TensorBoard:
    def __init__(self, run_dir: Path, settings: dict) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        table = "\n".join(f"| {k} | {v} |" for k, v in settings.items())
        self.writer.add_text("settings", "| setting | value |\n|---|---|\n" + table)

    def log(self, step: int, values: dict) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        self.writer.close()


class _MLflow:
    def __init__(self, run_dir: Path, settings: dict) -> None:
        import mlflow

        if not os.environ.get("MLFLOW_TRACKING_URI"):  # a local file store in the run directory
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow.set_tracking_uri((run_dir / "mlruns").resolve().as_uri())
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "zoobj"))
        self.mlflow = mlflow
        self.run = mlflow.start_run(run_name=run_dir.name)
        mlflow.log_params({k: str(v)[:500] for k, v in settings.items()})

    def log(self, step: int, values: dict) -> None:
        self.mlflow.log_metrics(values, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


class _WandB:
    def __init__(self, run_dir: Path, settings: dict) -> None:
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "zoobj"), name=run_dir.name, config=settings,
                              dir=str(run_dir), reinit="create_new")

    def log(self, step: int, values: dict) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


KINDS = {"tensorboard": _TensorBoard, "mlflow": _MLflow, "wandb": _WandB}


class Trackers:
    """The trackers of one run (rank 0): ``log(entry)`` for every log.jsonl entry."""

    def __init__(self, names: list[str], run_dir: str | Path, settings: dict, metric: str) -> None:
        run_dir = Path(run_dir)
        flat = {k: (json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in settings.items()}
        self.metric, self.open = metric, [KINDS[name](run_dir, flat) for name in names]
        self.last = -1  # the highest step sent: a tracker's steps only go up (W&B drops older ones)

    def log(self, entry: dict) -> None:
        step, values = _scalar_entries(entry, self.metric)
        if step is None or not values or not self.open:
            return
        step = max(step, self.last)
        self.last = step
        for tracker in self.open:
            tracker.log(step, values)

    def close(self) -> None:
        for tracker in self.open:
            tracker.close()
        self.open = []


class Tee:
    """A log writer that also sends each entry to the trackers (``append``, ``close``)."""

    def __init__(self, writer, trackers: Trackers) -> None:
        self.writer, self.trackers = writer, trackers

    def append(self, entry: dict) -> None:
        self.writer.append(entry)
        self.trackers.log(entry)

    def close(self) -> None:
        self.writer.close()
        self.trackers.close()

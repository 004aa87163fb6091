"""The training loop and the run directory: train, resume, export, compare.

A run directory holds ``config.json`` (every resolved setting, the model id and a hash
of the base weights), ``trajectory.jsonl`` (one engine record per step: the
checkpoint), ``log.jsonl`` (losses, dev metrics, timings), ``eval.json`` (final
numbers), ``predictions.jsonl`` (the final evaluation's prediction per example, in the
order of the evaluated rows) and ``curve.png``. No weights unless asked: base model +
trajectory rebuild them (``export``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import resource
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

import zoobj
from zoobj import trajectory as tj
from zoobj.errors import ConfigError
from zoobj.mezo import RULES, MeZO
from zoobj.objective import OBJECTIVES, evaluate, make_objective

PEFT = ("none", "lora", "prefix")
PARALLEL = ("data", "query")
KEEP = ("last", "best")
# The paper's settings per parameter set (Malladi et al. 2023, Tables 15-16).
PAPER_DEFAULTS = {"none": (1e-6, 1e-3), "lora": (1e-4, 1e-2), "prefix": (1e-2, 1e-1)}


@dataclass
class TrainConfig:
    """Every setting of a run. ``None`` means "the default for this task and parameter set"."""

    task: str
    metric: str | None = None
    objective: str = "metric"
    model: str = "gemma-3-270m"
    steps: int = 20
    batch_size: int = 8
    lr: float | None = None
    eps: float | None = None
    n: int = 1
    rule: str = "sgd"
    peft: str = "none"
    seed: int = 0
    weight_decay: float = 0.0
    train_embeddings: bool = False
    eval_every: int = 10
    eval_limit: int = 100
    dev_limit: int = 32
    keep: str = "last"
    eval_batch_size: int = 32
    train_max_new_tokens: int | None = None
    smooth: float = 0.0
    data: str | None = None
    dtype: str = "float32"
    perturb: str | None = None
    parallel: str = "data"
    device: str | None = None
    device_map: str | None = None
    output: str | None = None
    save_model: bool = False
    zero_shot: bool = True
    extra: dict = field(default_factory=dict)

    def resolved(self) -> TrainConfig:
        from zoobj.tasks import get_task

        c = dataclasses.replace(self)
        if c.objective not in OBJECTIVES:
            raise ConfigError(f"unknown objective {c.objective!r}; choose one of {', '.join(OBJECTIVES)}")
        if c.peft not in PEFT:
            raise ConfigError(f"unknown --peft {c.peft!r}; choose one of {', '.join(PEFT)}")
        if c.rule not in RULES:
            raise ConfigError(f"unknown --rule {c.rule!r}; choose one of {', '.join(RULES)}")
        from zoobj.mezo import PERTURB
        from zoobj.models import resolve_dtype

        low = resolve_dtype(c.dtype) in (torch.bfloat16, torch.float16)
        c.perturb = c.perturb or ("forward" if low else "inplace")  # exact restore where rounding would drift
        if c.perturb not in PERTURB:
            raise ConfigError(f"unknown --perturb {c.perturb!r}; choose one of {', '.join(PERTURB)}")
        if c.parallel not in PARALLEL:
            raise ConfigError(f"unknown --parallel {c.parallel!r}; choose one of {', '.join(PARALLEL)}")
        if c.keep not in KEEP:
            raise ConfigError(f"unknown --keep {c.keep!r}; choose one of {', '.join(KEEP)}")
        if c.keep == "best" and not (c.eval_every and c.dev_limit):
            raise ConfigError("--keep best picks the step with the best dev metric: it needs --eval-every N > 0")
        if c.steps < 1:
            raise ConfigError(f"--steps must be at least 1, got {c.steps}")
        if not (math.isfinite(c.smooth) and c.smooth >= 0):
            raise ConfigError(f"--smooth must be a temperature >= 0 (0: the metric itself), got {c.smooth}")
        if c.batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {c.batch_size}")
        task = get_task(c.task)
        c.metric = c.metric or task.metric
        if c.smooth and (c.objective != "metric" or task.kind != "classification"):
            raise ConfigError(f"--smooth applies to the metric objective of classification tasks; "
                              f"{task.name} is {task.kind}, objective {c.objective}")
        if c.train_max_new_tokens is None and task.kind == "generation":
            # shorter generations while training (answers are short; evaluation keeps the task's length)
            c.train_max_new_tokens = min(getattr(task, "max_new_tokens", 50), 24)
        from zoobj.metrics import get_metric

        get_metric(c.metric)  # a bad name fails here, before any model is loaded
        lr, eps = PAPER_DEFAULTS[c.peft]
        c.lr = lr if c.lr is None else c.lr
        c.eps = eps if c.eps is None else c.eps
        if not (math.isfinite(c.lr) and c.lr >= 0):
            raise ConfigError(f"--lr must be a finite number >= 0, got {c.lr}")
        if not (math.isfinite(c.eps) and c.eps > 0):
            raise ConfigError(f"--eps must be a finite number > 0, got {c.eps}")
        if c.output is None:
            stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
            c.output = str(Path("runs") / f"{task.name}-{c.metric if c.objective == 'metric' else 'ce'}-{stamp}")
        return c


def weights_hash(model) -> str:
    """sha256 over every tensor of the state dict (names, shapes, dtypes, bytes), on
    whatever device the tensors live: the bytes are copied to the host one tensor at a time."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(_host(t).contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _host(t: torch.Tensor) -> torch.Tensor:
    """``t`` in host memory (a copy when it lives on a device), detached: safe for numpy."""
    return t.detach().to("cpu")


def batch_indices(seed: int, step: int, size: int, n_rows: int) -> list[int]:
    """The rows of step ``step``: a function of (seed, step) alone, never of --steps."""
    rng = np.random.default_rng([seed, step])
    return rng.choice(n_rows, size=min(size, n_rows), replace=False).tolist()


def lr_schedule(step: int) -> float:
    """Constant: the paper's MeZO runs use a constant learning rate."""
    return 1.0


class _Best:
    """``--keep best``: the trained tensors at the best dev evaluation so far, copied to
    CPU memory (one copy of the trainable parameters; small with LoRA or prefix)."""

    def __init__(self):
        self.value: float | None = None
        self.steps = 0
        self.tensors: list[torch.Tensor] | None = None

    def offer(self, value: float | None, steps: int, params: list) -> None:
        # ties keep the earlier step
        if value is not None and math.isfinite(value) and (self.value is None or value > self.value):
            self.value, self.steps = value, steps
            self.tensors = [p.detach().to("cpu", copy=True) for p in params]

    def restore(self, params: list) -> None:
        with torch.no_grad():
            for p, t in zip(params, self.tensors):
                p.copy_(t.to(p.device))


@dataclass
class Session:
    """A model made ready for training: trainable tensors in a fixed order, and an optimizer."""

    model: object
    tok: object
    params: list
    optimizer: MeZO


def _device(cfg: TrainConfig, world) -> str:
    if world is not None:
        return str(world.device)
    return cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")


def prepare(cfg: TrainConfig, model=None, tok=None, world=None, recorded: dict | None = None) -> Session:
    """Load the model (unless given), choose the trained tensors and build the optimizer.

    ``recorded``: the config.json of the run being resumed or rebuilt; its trajectory
    is replayed with the noise kernel that made it (compiled and eager agree only to
    float32 rounding), or a ConfigError says why that cannot be done here."""
    from zoobj.models import load_model, trainable_parameters

    if model is None:
        model, tok = load_model(cfg.model, dtype=cfg.dtype, device=_device(cfg, world), device_map=cfg.device_map)
    model, named = trainable_parameters(model, cfg.peft, cfg.train_embeddings, seed=cfg.seed, tok=tok)
    params = [p for _, p in named]
    query = world is not None and cfg.parallel == "query"
    opt = MeZO(params, lr=cfg.lr, eps=cfg.eps, seed=cfg.seed, n=cfg.n, rule=cfg.rule,
               weight_decay=cfg.weight_decay, schedule=lr_schedule, perturb=cfg.perturb or "inplace", model=model,
               shard=(world.rank, world.size) if query else None, exchange=world.exchange_rows if query else None,
               noise=_recorded_noise(recorded, params, cfg.output))
    return Session(model, tok, params, opt)


def _recorded_noise(recorded: dict | None, params: list, run_dir) -> str:
    """The noise kernel a run's trajectory must be replayed with ("auto" for a new run)."""
    if not recorded or recorded.get("noise_backend") not in ("compiled", "eager"):
        return "auto"
    backend, device = recorded["noise_backend"], recorded.get("noise_device")
    here = params[0].device.type
    if backend == "compiled":
        from zoobj.noise import _kernel

        if _kernel._get_compiled(here) is None:
            raise ConfigError(f"run {run_dir} was made with the compiled noise kernel, which cannot run here "
                              f"(ZOOBJ_COMPILE=0, or torch.compile failed on {here}: see the warning above); the "
                              "eager kernel differs in the last float32 bits, so replaying with it would not give "
                              "the run's weights: use a machine where torch.compile works (a C++ compiler for CPU)")
    if device and device != here:
        warnings.warn(f"zoobj: run {run_dir} made its noise on {device}, this replay on {here}: the weights "
                      "agree only to float32 rounding of the noise", RuntimeWarning, stacklevel=3)
    return backend


def _evaluate(session: Session, task, metric, rows, world, keep_predictions: bool = False, **kw) -> dict | None:
    """``evaluate`` on one process, or with the rows sharded across ranks and scored on
    rank 0 (which alone gets the result; the other ranks get None)."""
    from zoobj.objective import predict

    if world is None:
        out = evaluate(session.model, session.tok, task, metric, rows=rows, **kw)
    else:
        mine = predict(session.model, session.tok, task, world.shard(rows), batch_size=kw.get("batch_size", 16))
        preds = world.gather_predictions(mine, len(rows), strings=task.kind == "generation")
        out, failure = None, None
        if world.is_main:
            try:  # the metric runs on rank 0 alone: every rank must hear if it fails
                out = evaluate(session.model, session.tok, task, metric, rows=rows, predictions=preds, **kw)
            except Exception as exc:
                failure = exc
        world.share_failure(failure)
        if not world.is_main:
            return None
    if not keep_predictions:
        out.pop("predictions")
    return out


def _settings(cfg: TrainConfig) -> dict:
    return {k: v for k, v in dataclasses.asdict(cfg).items()
            if k not in ("output", "save_model", "zero_shot", "device", "device_map")}  # placement is per launch


# Settings a resumed run may change: neither alters the trajectory (see resume_config).
RESUMABLE_CHANGES = ("steps", "keep")
# What a setting missing from an older run's config.json was: the default of the version that wrote it.
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}


def _check_same_run(cfg: TrainConfig, saved: dict, out: Path) -> None:
    """Resuming replays the saved trajectory and continues it: every setting that shapes
    the trajectory or its evaluation must be the run's own (``steps`` and ``keep`` may change)."""
    ours = {k: v for k, v in _settings(cfg).items() if k not in RESUMABLE_CHANGES and k != "model"}  # model: by hash
    differ = [k for k, v in ours.items() if (saved[k] if k in saved else _DEFAULTS.get(k)) != v]
    if differ:
        shown = ", ".join(f"{k} {ours[k]!r} (the run's: {saved.get(k, _DEFAULTS.get(k))!r})" for k in differ)
        raise ConfigError(f"{out}: resuming with settings that differ from {out / tj.CONFIG}: {shown}; "
                          "resume with the run's own settings (zoobj.train.load_run_config, or zoobj train --resume)")


def _save_model_dir(session: Session, cfg: TrainConfig, target: Path) -> None:
    """save_pretrained into a temp folder, then rename: the folder is whole or absent."""
    from zoobj.models import merged_for_saving

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        merged_for_saving(session.model).save_pretrained(tmp)
        session.tok.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(cfg: TrainConfig, resume: bool = False, reporter: Callable[[str, dict], None] | None = None,
        model=None, tok=None, world=None) -> dict:
    """Train (or continue) a run; returns the final evaluation. ``reporter(event, info)``
    receives "start", "step", "dev", "done" events for progress display.

    ``world`` (``zoobj.distributed.World``, from torchrun): every rank trains an
    identical replica; only rank 0 writes the run directory and gets the result
    (the other ranks return ``{}``)."""
    from zoobj.tasks import get_task, train_dev

    main = world is None or world.is_main
    report = reporter if reporter and main else (lambda event, info: None)
    cfg = cfg.resolved()
    if world is not None:
        if cfg.parallel == "query" and cfg.n == 1:
            cfg.n = world.size  # one perturbation per rank
        if cfg.parallel == "query" and cfg.n % world.size:
            raise ConfigError(f"--parallel query needs --n to be a multiple of the {world.size} processes, got {cfg.n}")
        if cfg.device_map:
            raise ConfigError("--device-map spreads one model over all visible devices, which torchrun's processes "
                              "would share; use one process with --device-map, or torchrun without it")
        if cfg.parallel == "data" and cfg.batch_size < world.size:
            raise ConfigError(f"--batch-size {cfg.batch_size} is the global batch: it must be at least the "
                              f"{world.size} processes")
    out = Path(cfg.output)
    task = get_task(cfg.task)
    train_rows, dev_rows, note = train_dev(task, cfg.data, seed=cfg.seed)
    eval_rows = task.load(task.eval_split, cfg.data)[: cfg.eval_limit]
    dev_rows = dev_rows[: cfg.dev_limit]

    saved = None
    if resume:  # the run's own settings, checked before anything is loaded
        saved = tj.read_json(out / tj.CONFIG)
        _check_same_run(cfg, saved, out)
    session = prepare(cfg, model, tok, world, recorded=saved)
    base_hash = weights_hash(session.model)
    records: list[dict] = []
    created = False
    failure: Exception | None = None
    try:
        if resume:
            if saved["base_weights_sha256"] != base_hash:
                raise ConfigError(f"{out}: the base model's weights differ from the ones this run started from "
                                  f"({cfg.model}); resume with the same model")
            records = tj.read_trajectory(out / tj.TRAJECTORY)
            if len(records) > cfg.steps:
                raise ConfigError(f"{out} already has {len(records)} steps; pass --steps {len(records)} or more to resume it")
        elif main:
            if out.exists() and any(out.iterdir()):
                raise ConfigError(f"output folder {out} exists and is not empty; choose another --output or --resume it")
            created = not out.exists()
            out.mkdir(parents=True, exist_ok=True)
            tj.write_json(out / tj.CONFIG, {
                **_settings(cfg), "zoobj_version": zoobj.__version__, "base_weights_sha256": base_hash,
                "noise_backend": session.optimizer.noise_backend, "noise_device": session.params[0].device.type,
                "trainable_parameters": sum(p.numel() for p in session.params), "data_note": note,
                "world_size": world.size if world else 1,
            })
    except Exception as exc:
        failure = exc
    if world is not None and world.agree(failure is not None) and failure is None:
        raise ConfigError("another process of this torchrun launch could not start the run (its error is shown there)")
    if failure is not None:
        raise failure
    best = _Best()
    if resume:
        head = 0
        if cfg.keep == "best":  # the best dev point so far: replay to it, hold its weights, replay the rest
            prior = [r for r in tj.read_jsonl(out / tj.LOG) if r.get("event") == "dev" and r["step"] < len(records)]
            if prior:
                top = max(prior, key=lambda r: (r["value"], -r["step"]))
                head = top["step"] + 1
                session.optimizer.replay(records[:head])
                best.offer(top["value"], head, session.params)
        session.optimizer.replay(records[head:])  # back to where the run stopped, bit for bit
        if main and (saved.get("steps"), saved.get("keep", "last")) != (cfg.steps, cfg.keep):
            tj.write_json(out / tj.CONFIG, {**saved, "steps": cfg.steps, "keep": cfg.keep})

    data_world = world if world is not None and cfg.parallel == "data" else None
    log = tj.JsonlWriter(out / tj.LOG) if main else tj.NullWriter()
    traj = tj.JsonlWriter(out / tj.TRAJECTORY) if main else tj.NullWriter()
    start_time = time.time()
    zero = None
    evaluate_kw = {"batch_size": cfg.eval_batch_size}
    try:
        objective = make_objective(cfg.objective, session.model, session.tok, task, cfg.metric,
                                   batch_size=cfg.batch_size, world=data_world,
                                   **({"max_new_tokens": cfg.train_max_new_tokens, "smooth": cfg.smooth}
                                      if cfg.objective == "metric" else {}))
        if note:
            log.append({"event": "note", "message": note})
        if cfg.zero_shot and not resume:
            report("status", {"message": f"zero-shot evaluation on {len(eval_rows)} {task.eval_split} examples ..."})
            zero = _evaluate(session, task, cfg.metric, eval_rows, world, **evaluate_kw)
            if zero is not None:
                log.append({"event": "zero_shot", **zero})
        elif resume and main:
            prior = [r for r in tj.read_jsonl(out / tj.LOG) if r.get("event") == "zero_shot"]
            zero = prior[-1] if prior else None
        report("start", {"cfg": cfg, "start_step": len(records), "zero_shot": zero,
                         "trainable": sum(p.numel() for p in session.params), "note": note})
        opt = session.optimizer

        def dev_point(step: int) -> None:
            """The dev evaluation after step ``step`` (0-based): logged, and offered to --keep best."""
            dev = _evaluate(session, task, cfg.metric, dev_rows, world, batch_size=cfg.eval_batch_size,
                            n_resamples=200)
            if dev is not None:
                log.append({"event": "dev", "step": step, "value": dev["value"], "ci95": dev["ci95"]})
                report("dev", {"step": step, "value": dev["value"]})
            if cfg.keep == "best":
                value = dev["value"] if dev is not None else None
                best.offer(world.broadcast_loss(value) if world is not None else value, step + 1, session.params)

        def dev_due(step: int) -> bool:
            return bool(cfg.eval_every and (step + 1) % cfg.eval_every == 0 and dev_rows)

        if resume and records and dev_due(len(records) - 1) and not _logged_dev(out, len(records) - 1):
            # stopped between a step's trajectory line and its dev evaluation: make that evaluation now,
            # so a resumed run makes the same dev evaluations (and keeps the same step) as one that never stopped
            dev_point(len(records) - 1)
        for step in range(len(records), cfg.steps):
            # sample the (global) batch: a function of (seed, step) only
            batch = [train_rows[i] for i in batch_indices(cfg.seed, step, cfg.batch_size, len(train_rows))]
            # perturb, evaluate l+ and l-, update (the engine restores the weights on any exception)
            t0, sent = time.time(), world.bytes if world else 0
            loss = opt.step(lambda: objective(batch))
            rec = opt.trajectory[-1]
            # log: the trajectory line is the checkpoint; timings go to the log
            traj.append(rec)
            entry = {"event": "step", "step": step, "loss": loss, "grad": rec["grads"][0] if len(rec["grads"]) == 1
                     else float(np.mean(rec["grads"])), "ties": rec["ties"], "skipped": rec["skipped"],
                     "seconds": round(time.time() - t0, 4)}
            if world is not None:
                entry["comm_bytes"] = world.bytes - sent
            log.append(entry)
            report("step", entry)
            # evaluate on dev now and then
            if dev_due(step):
                dev_point(step)
        kept = len(opt.trajectory)
        if cfg.keep == "best" and best.tensors is not None and best.steps < kept:
            best.restore(session.params)  # the final evaluation, --save-model and export see the best dev step
            kept = best.steps
            report("status", {"message": f"keeping step {kept} (best dev {cfg.metric} {best.value:.4f})"})
        report("status", {"message": f"final evaluation on {len(eval_rows)} {task.eval_split} examples ..."})
        final = _evaluate(session, task, cfg.metric, eval_rows, world, keep_predictions=True, **evaluate_kw)
        predictions = final.pop("predictions") if final is not None else None
        records = opt.trajectory
        if main:
            wall = time.time() - start_time
            peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            ties = sum(r["ties"] for r in records) / max(1, sum(len(r["seeds"]) for r in records))
            result = {**final, "zero_shot": zero["value"] if zero else None,
                      "zero_shot_ci95": zero["ci95"] if zero else None, "steps": len(records),
                      "tie_rate": ties, "kept_steps": kept, "best_dev": best.value,
                      "wall_seconds": round(wall, 1), "peak_rss_mib": round(peak_mib),
                      "run_dir": str(out)}
            if world is not None:
                result["world_size"] = world.size
            log.append({"event": "final", **result})
    except Exception:
        if main and not resume and not session.optimizer.trajectory:
            # failed before its first step (e.g. a reward that breaks on the zero-shot evaluation): there is
            # nothing to resume, so leave no run directory behind and the same command can simply be rerun
            traj.close()
            log.close()
            shutil.rmtree(out, ignore_errors=True)
            if not created:
                out.mkdir(parents=True, exist_ok=True)  # the user's empty folder stays
        raise
    finally:
        traj.close()
        log.close()
    if not main:
        return {}
    tj.write_jsonl(out / tj.PREDICTIONS, [{"index": i, "prediction": p.item() if hasattr(p, "item") else p}
                                               for i, p in enumerate(predictions)])
    tj.write_json(out / tj.EVAL, result)
    plot_curve(out)
    if cfg.save_model:
        _save_model_dir(session, cfg, out / "model")
    report("done", result)
    return result


def _logged_dev(out: Path, step: int) -> bool:
    """Whether the run's log holds the dev evaluation after step ``step``."""
    return any(r.get("event") == "dev" and r.get("step") == step for r in tj.read_jsonl(out / tj.LOG))


def load_run_config(run_dir: str | Path) -> TrainConfig:
    saved = tj.read_json(Path(run_dir) / tj.CONFIG)
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in saved.items() if k in names})
    cfg.output = str(run_dir)
    return cfg


def resume_config(run_dir: str | Path, overrides: dict) -> TrainConfig:
    """The run's own settings; ``steps`` and ``keep`` may change (neither alters the
    trajectory: resuming a finished run with ``--keep best`` re-does only its final
    evaluation), any other flag must agree."""
    cfg = load_run_config(run_dir)
    for key, value in overrides.items():
        if value is None or key in ("output", "steps", "keep", "save_model"):  # save_model is per invocation, not saved
            continue
        if getattr(cfg, key) != value:
            raise ConfigError(f"--{key.replace('_', '-')} {value!r} contradicts the run's {getattr(cfg, key)!r} "
                              f"({run_dir}/config.json); leave it out when resuming")
    for key in ("steps", "keep"):
        if overrides.get(key) is not None:
            setattr(cfg, key, overrides[key])
    cfg.save_model = bool(overrides.get("save_model"))
    return cfg


def kept_steps(run_dir: str | Path, n_records: int) -> int:
    """How many trajectory steps the run's result stands for: all of them, or with
    ``--keep best`` those up to the best dev evaluation (as recorded when the run ended)."""
    path = Path(run_dir) / tj.EVAL
    if not path.exists():
        return n_records
    result = tj.read_json(path)
    if result.get("steps") != n_records or not result.get("kept_steps"):
        return n_records  # continued since (or never finished): the trajectory's end
    return int(result["kept_steps"])


def rebuild(run_dir: str | Path) -> tuple[TrainConfig, Session]:
    """The run's trained model in memory: its base model, checked, plus its trajectory
    replayed with the noise kernel the run recorded."""
    cfg = load_run_config(run_dir)
    saved = tj.read_json(Path(run_dir) / tj.CONFIG)
    session = prepare(cfg, recorded=saved)
    if weights_hash(session.model) != saved["base_weights_sha256"]:
        raise ConfigError(f"the base model {cfg.model!r} is not the one run {run_dir} started from")
    records = tj.read_trajectory(Path(run_dir) / tj.TRAJECTORY)
    session.optimizer.replay(records[: kept_steps(run_dir, len(records))])
    session.optimizer.remove_hooks()
    return cfg, session


def export(run_dir: str | Path, target: str | Path) -> Path:
    """Base model + trajectory -> a folder that loads with ``from_pretrained``."""
    cfg, session = rebuild(run_dir)
    _save_model_dir(session, cfg, Path(target))
    return Path(target)


def rolling_ties_and_grad(steps: list[dict], window: int) -> tuple[np.ndarray, list[float]]:
    """Over each run of ``window`` consecutive step records of a log: the share of steps
    with a tie (l+ == l-) and the median |projected gradient|, one value per full window."""
    tie_rate = np.convolve([float(r["ties"] > 0) for r in steps], np.ones(window) / window, mode="valid")
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
    axes[2].set(title=f"tie rate (rolling {window})", xlabel="step", ylim=(-0.05, 1.05))
    axes[3].set(title=f"|projected gradient| (rolling median {window})", xlabel="step")
    fig.tight_layout()
    tmp = run_dir / ".curve.tmp.png"
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, run_dir / tj.CURVE)

"""The training loop: a run from its start (or resume) to its result.

``run`` reads top to bottom: ``open_run`` (a new run directory and its config.json, or
a resumed one: its settings checked, its trajectory replayed), ``begin`` (the objective,
the zero-shot evaluation), ``train_loop`` (sample the batch, step, log, evaluate on dev
now and then), ``finalise`` (the kept step and the final evaluation) and
``write_result``; ``discard_unstarted`` removes a run directory that failed before its
first step. Under torchrun every rank runs all of it on an identical replica; only
rank 0 writes.

A run directory holds ``config.json`` (every resolved setting, the model id and a hash
of the base weights), ``trajectory.jsonl`` (one engine record per step: the
checkpoint), ``log.jsonl`` (losses, dev metrics, timings), ``eval.json`` (final
numbers), ``predictions.jsonl`` (the final evaluation's prediction per example, in the
order of the evaluated rows) and ``curve.png``. No weights unless asked: base model +
trajectory rebuild them (``zoobj.run.export``).

Elsewhere: the settings (``zoobj.run.config``), the model and its optimizer
(``zoobj.run.session``), curve.png (``zoobj.run.plots``), rebuild and export (``zoobj.run.export``).
"""

from __future__ import annotations

import math
import resource
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import zoobj
from zoobj.engine import trajectory as tj
from zoobj.engine.noise import NOISE_VERSION
from zoobj.errors import ConfigError
from zoobj.model.blocks import trained_blocks
from zoobj.model.params import ParamSet
from zoobj.model.tail_probes import PROBE_ROWS
from zoobj.run.config import AUTO, PAPER_DEFAULTS, TrainConfig, check_same_run, recorded_settings
from zoobj.run.export import save_model_dir
from zoobj.run.objective import Objective, evaluate, make_objective
from zoobj.run import trackers
from zoobj.run.plots import plot_curve
from zoobj.run.session import Session, prepare, unit_of, weights_hash


def run(cfg: TrainConfig, resume: bool = False, reporter: Callable[[str, dict], None] | None = None,
        model=None, tok=None, world=None) -> dict:
    """Train (or continue) a run; returns the final evaluation. ``reporter(event, info)``
    receives "start", "step", "dev", "done" events for progress display.

    ``world`` (``zoobj.run.distributed.World``, from torchrun): every rank trains an
    identical replica; only rank 0 writes the run directory and gets the result
    (the other ranks return ``{}``)."""
    began = time.time()  # the wall time counts the model's load too
    main = world is None or world.is_main
    report = reporter if reporter and main else _silent
    cfg = _fit_to_world(cfg.resolved(), world)
    r = open_run(cfg, resume, model, tok, world, report)
    r.started = began
    try:
        objective, zero = begin(r)
        finish_cut_dev_evaluation(r)
        train_loop(r, objective)
        result, predictions = finalise(r, zero, objective)
    except Exception:
        discard_unstarted(r)
        raise
    finally:
        r.close()
    if not main:
        return {}
    write_result(r, result, predictions)
    return result


def train_loop(r: RunState, objective: Objective) -> None:
    """From where the run stands to ``--steps``: sample the batch, step, log, evaluate on dev now and then.

    A step followed by another leaves its update held, written in the next step's first
    pass (``MeZO.step(settle=False)``); before a dev evaluation, the end, or an interruption
    between steps, every held move is written."""
    cfg, opt, world = r.cfg, r.session.optimizer, r.world
    if r.start_step == 0 and dev_due(r, START) and not (r.resume and _logged_dev(r.out, START)):
        dev_evaluation(r, START)  # the model as given: a candidate for --keep best, the curve's first point
    try:
        for step in range(r.start_step, cfg.steps):
            # sample the (global) batch: a function of (seed, step) only
            batch = [r.train_rows[i] for i in batch_indices(cfg.seed, step, cfg.batch_size, len(r.train_rows))]
            # perturb, evaluate l+ and l-, update (the engine restores the weights on any exception)
            t0, sent = time.time(), world.bytes if world else 0
            if objective.reads_weights:
                opt.settle()
            objective.prepare(batch)  # what the step's probes share, from the unperturbed weights
            together = (lambda points: objective.probes(batch, points)) if objective.together else None
            due = dev_due(r, step)
            loss = opt.step(lambda: objective(batch), probes=together, settle=due or step + 1 == cfg.steps)
            # log: the trajectory line is the checkpoint; timings go to the log
            r.traj.append(opt.trajectory[-1])
            entry = _step_entry(step, loss, opt.trajectory[-1], time.time() - t0)
            if world is not None:
                entry["comm_bytes"] = world.bytes - sent
            r.log.append(entry)
            r.report("step", entry)
            # evaluate on dev now and then
            if due:
                dev_evaluation(r, step)
    finally:
        opt.settle()


def _step_entry(step: int, loss: float, rec: dict, seconds: float) -> dict:
    """A step's line in log.jsonl: the mean coefficient over its n directions, how many of
    them tied (l+ == l-) and that share (the run's tie rate is the same share over all
    its directions), and the spread (standard deviation) of its 2n losses -- what a
    metric's jumps look like."""
    grad = rec["grads"][0] if len(rec["grads"]) == 1 else float(np.mean(rec["grads"]))
    losses = [x for x in rec["loss_plus"] + rec["loss_minus"] if x is not None]
    directions = len(rec["seeds"])
    return {"event": "step", "step": step, "loss": loss, "grad": grad, "ties": rec["ties"], "directions": directions,
            "tie_rate": rec["ties"] / directions, "spread": float(np.std(losses)) if losses else None,
            "skipped": rec["skipped"], "seconds": round(seconds, 4)}


def batch_indices(seed: int, step: int, size: int, n_rows: int) -> list[int]:
    """The rows of step ``step``: a function of (seed, step) alone, never of --steps."""
    rng = np.random.default_rng([seed, step])
    return rng.choice(n_rows, size=min(size, n_rows), replace=False).tolist()


def _silent(event: str, info: dict) -> None:
    """The reporter of a run nobody watches, and of every rank but 0."""


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
class RunState:
    """A run under way, on one rank: its settings, model and optimizer, data and
    directory, where its records go (nowhere on ranks other than 0), and the best dev
    step so far (``--keep best``)."""

    cfg: TrainConfig
    session: Session
    task: object
    train_rows: list
    dev_rows: list
    eval_rows: list
    note: str | None
    out: Path
    world: object
    resume: bool
    report: Callable[[str, dict], None]
    calibration: dict | None = None  # --eps / --scale auto: what each calibration found, by setting (a new run)
    start_step: int = 0  # the steps already on disk (a resumed run)
    created: bool = False  # this call made the run directory (a failure before the first step removes it)
    best: _Best = field(default_factory=_Best)
    log: tj.JsonlWriter | tj.NullWriter | trackers.Tee = field(default_factory=tj.NullWriter)
    traj: tj.JsonlWriter | tj.NullWriter = field(default_factory=tj.NullWriter)
    started: float = 0.0  # when run() was called

    @property
    def main(self) -> bool:
        return self.world is None or self.world.is_main

    def close(self) -> None:
        self.traj.close()
        self.log.close()


def _fit_to_world(cfg: TrainConfig, world) -> TrainConfig:
    """Under torchrun: one perturbation per rank with --parallel query, and the settings
    that cannot work across processes refused (before any collective)."""
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
    return cfg


def open_run(cfg: TrainConfig, resume: bool, model, tok, world, report) -> RunState:
    """The run this call starts or continues, on every rank: its data and model; for a
    new run, its directory and config.json (rank 0); for a resumed one, its settings
    checked against config.json, its base weights against the recorded hash, and its
    trajectory replayed. If any rank fails here, every rank stops."""
    from zoobj.tasks import get_task, train_dev

    out = Path(cfg.output)
    task = get_task(cfg.task)
    train_rows, dev_rows, note = train_dev(task, cfg.data, seed=cfg.seed)
    eval_rows = task.load(task.eval_split, cfg.data)[: cfg.eval_limit]
    saved, calibration = None, {}
    if resume:  # the run's own settings, checked before anything is loaded
        saved = tj.read_json(out / tj.CONFIG)
        check_same_run(cfg, saved, out)
        for key in ("eps", "scale"):
            if getattr(cfg, key) == AUTO:  # calibrated when the run began
                setattr(cfg, key, saved[key])

    def calibrate(model, tok, params, param_set):  # --eps / --scale auto, before the optimizer is built
        if cfg.eps == AUTO:
            calibration["eps"] = calibrate_run_eps(cfg, model, tok, params, param_set, task, train_rows, world, report)
        if cfg.scale == AUTO:
            calibration["scale"] = calibrate_run_scale(cfg, model, tok, params, param_set, task, train_rows, world,
                                                       report)

    session = prepare(cfg, model, tok, world, recorded=saved,
                      calibrate=calibrate if AUTO in (cfg.eps, cfg.scale) else None)
    r = RunState(cfg, session, task, train_rows, dev_rows[: cfg.dev_limit], eval_rows, note, out, world, resume, report,
                 calibration=calibration or None)
    base_hash = weights_hash(session.model)
    records: list[dict] = []
    failure: Exception | None = None
    try:
        if resume:
            records = _trajectory_to_resume(r, saved, base_hash)
        elif r.main:
            r.created = _create_run_dir(r, base_hash)
    except Exception as exc:
        failure = exc
    if world is not None and world.agree(failure is not None) and failure is None:
        raise ConfigError("another process of this torchrun launch could not start the run (its error is shown there)")
    if failure is not None:
        raise failure
    if resume:
        _replay(r, saved, records)
    r.log = tj.JsonlWriter(out / tj.LOG) if r.main else tj.NullWriter()
    names = trackers.parse(cfg.report_to) if r.main else []
    if names:  # the same numbers to the experiment trackers (--report-to)
        r.log = trackers.Tee(r.log, trackers.Trackers(names, out, recorded_settings(cfg), cfg.metric))
    r.traj = tj.JsonlWriter(out / tj.TRAJECTORY) if r.main else tj.NullWriter()
    return r


def _create_run_dir(r: RunState, base_hash: str) -> bool:
    """A new run's directory and config.json; whether the directory was made here (an
    empty folder the user made may hold a run)."""
    out, cfg, session = r.out, r.cfg, r.session
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"output folder {out} exists and is not empty; choose another --output or --resume it")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    tj.write_json(out / tj.CONFIG, {
        **recorded_settings(cfg), "zoobj_version": zoobj.__version__, "base_weights_sha256": base_hash,
        "noise_version": NOISE_VERSION,
        "noise_backend": session.optimizer.noise_backend, "noise_device": session.params[0].device.type,
        "passes": session.optimizer.passes,
        "trainable_parameters": sum(p.numel() for p in session.params), "data_note": r.note,
        "trained_blocks": trained_blocks(session.model, session.params),
        "param_set": session.param_set.record(), "unit": session.unit,
        "world_size": r.world.size if r.world else 1,
        **{f"{key}_calibration": found for key, found in (r.calibration or {}).items()},
    })
    return created


def _trajectory_to_resume(r: RunState, saved: dict, base_hash: str) -> list[dict]:
    """The records of a run being resumed, once its base model is known to be the run's own."""
    out, cfg = r.out, r.cfg
    if saved["base_weights_sha256"] != base_hash:
        raise ConfigError(f"{out}: the base model's weights differ from the ones this run started from "
                          f"({cfg.model}); resume with the same model")
    records = tj.read_trajectory(out / tj.TRAJECTORY)
    if len(records) > cfg.steps:
        raise ConfigError(f"{out} already has {len(records)} steps; pass --steps {len(records)} or more to resume it")
    return records


def _replay(r: RunState, saved: dict, records: list[dict]) -> None:
    """Back to where the run stopped, bit for bit; with --keep best the weights of the
    best dev step so far are held on the way. A changed --steps or --keep is recorded."""
    cfg, session, best = r.cfg, r.session, r.best
    head = 0
    if cfg.keep == "best":  # the best dev point so far: replay to it, hold its weights, replay the rest
        prior = [x for x in tj.read_jsonl(r.out / tj.LOG) if x.get("event") == "dev" and x["step"] < len(records)]
        if prior:
            top = max(prior, key=lambda x: (x["value"], -x["step"]))
            head = top["step"] + 1
            session.optimizer.replay(records[:head])
            best.offer(top["value"], head, session.params)
    session.optimizer.replay(records[head:])  # back to where the run stopped, bit for bit
    r.start_step = len(records)
    if r.main and (saved.get("steps"), saved.get("keep", "last")) != (cfg.steps, cfg.keep):
        tj.write_json(r.out / tj.CONFIG, {**saved, "steps": cfg.steps, "keep": cfg.keep})


def _trained_set(r: RunState) -> str:
    """One line: how many parameters train, and in which decoder blocks."""
    count = sum(p.numel() for p in r.session.params)
    where = trained_blocks(r.session.model, r.session.params)
    span = "" if not where else f" in blocks {where[0]}-{where[-1]}" if where == list(range(where[0], where[-1] + 1)) \
        else f" in blocks {', '.join(map(str, where))}"
    return f"training {count:,} parameters ({r.cfg.peft if r.cfg.peft != 'none' else 'full'}){span}"


def begin(r: RunState) -> tuple[Objective, dict | None]:
    """The objective the steps minimise; the zero-shot evaluation (a new run's, or a
    resumed run's from its log); the "start" event."""
    cfg, world = r.cfg, r.world
    objective, entry = _objective(cfg, r.session.model, r.session.tok, r.task, world, r.session.params,
                                  r.session.param_set, notify=lambda e: _log_status(r, e))
    r.report("status", {"message": _trained_set(r)})
    if entry is not None:
        _log_status(r, entry)
    if r.note:
        r.log.append({"event": "note", "message": r.note})
    for key, found in (r.calibration or {}).items():
        r.log.append({"event": f"{key}_auto", **found})
    zero = None
    if cfg.zero_shot and not r.resume:
        r.report("status", {"message": f"zero-shot evaluation on {len(r.eval_rows)} {r.task.eval_split} examples ..."})
        zero = _evaluate(r.session, r.task, cfg.metric, r.eval_rows, world, batch_size=cfg.eval_batch_size)
        if zero is not None:
            r.log.append({"event": "zero_shot", **zero})
    elif r.resume and r.main:
        prior = [x for x in tj.read_jsonl(r.out / tj.LOG) if x.get("event") == "zero_shot"]
        zero = prior[-1] if prior else None
    r.report("start", {"cfg": cfg, "start_step": r.start_step, "zero_shot": zero, "unit": r.session.unit,
                       "trainable": sum(p.numel() for p in r.session.params), "note": r.note})
    return objective, zero


def _log_status(r: RunState, entry: dict) -> None:
    """A log event that the console shows too (a fast path on or off)."""
    r.log.append(entry)
    r.report("status", {"message": entry["message"]})


def _objective(cfg: TrainConfig, model, tok, task, world, params: list, param_set: ParamSet,
               notify: Callable[[dict], None] | None = None) -> tuple[Objective, dict | None]:
    """The loss of a batch of rows: what each probe of a step (and of --eps auto) evaluates;
    and the log event that says which fast path it runs (None: not asked for). With
    ``cfg.shared``, the parameter set's store computes once per batch what the step's
    perturbations cannot change (``ParamSet.fast_path``). ``notify`` hears, once each,
    of a fast path that stops serving the run."""
    data_world = world if world is not None and cfg.parallel == "data" else None
    store, note = None, None
    if cfg.shared:
        def off(why: str) -> None:  # the store met something it cannot serve: plain from here on
            if notify is not None:
                notify({"event": "shared", "on": False,
                        "message": f"shared lower blocks off from here on ({why}): every probe runs the whole model"})

        store, why = param_set.fast_path(model, params, off)
        note = why if store is not None or not why else f"shared lower blocks off ({why}): every probe runs the whole model"
    objective = make_objective(cfg.objective, model, tok, task, cfg.metric, batch_size=cfg.batch_size,
                               world=data_world, shared=store, notify=notify,
                               **({"max_new_tokens": cfg.train_max_new_tokens, "smooth": cfg.smooth}
                                  if cfg.objective == "metric" else {"over": cfg.ce_over}))
    if objective.together and note:
        note += f"; a step's {2 * cfg.n} probes run together, {PROBE_ROWS} rows per forward"
    return objective, ({"event": "shared", "on": store is not None, "message": note} if note else None)


def _calibration_batches(cfg: TrainConfig, model, tok, params: list, param_set: ParamSet, task, train_rows: list,
                         world) -> tuple[Objective, list[list[dict]]]:
    """The run's objective and the batches of its first ``PROBES`` steps, each prepared from
    the unperturbed weights (as before a step): what ``--eps auto`` and ``--scale auto`` probe."""
    from zoobj.engine.calibrate import PROBES

    objective, _ = _objective(cfg, model, tok, task, world, params, param_set)
    batches = [[train_rows[i] for i in batch_indices(cfg.seed, step, cfg.batch_size, len(train_rows))]
               for step in range(PROBES)]
    for b in batches:
        objective.prepare(b)
    return objective, batches


def calibrate_run_eps(cfg: TrainConfig, model, tok, params: list, param_set: ParamSet, task, train_rows: list,
                      world, report) -> dict:
    """``--eps auto``: ``zoobj.engine.calibrate.calibrate_eps`` on the batches of the run's first
    steps, over half-decades from the parameter set's default eps up; sets ``cfg.eps`` and
    returns what was found (config.json's ``eps_calibration``). The weights are never
    written. A metric that no grid value un-ties is one ConfigError naming the levers left."""
    from zoobj.engine.calibrate import MAX_TIE_FRACTION, PROBES, calibrate_eps, eps_grid

    objective, batches = _calibration_batches(cfg, model, tok, params, param_set, task, train_rows, world)
    unit = unit_of(param_set, model, params)  # the grid and the result in the set's units, probed absolute
    grid = eps_grid(PAPER_DEFAULTS[cfg.peft][1])
    report("status", {"message": f"--eps auto: {PROBES} probe directions at up to 3 of eps "
                                 f"{', '.join(f'{e:g}' for e in grid)} ..."})
    cal = calibrate_eps(params, [lambda b=b: objective(b) for b in batches], [e * unit for e in grid], seed=cfg.seed,
                        model=model, max_tie_fraction=MAX_TIE_FRACTION, kind=cfg.noise)
    if unit != 1.0:  # back to the set's units, the eps config.json records and --eps takes
        cal.eps, cal.grid = None if cal.eps is None else float(f"{cal.eps / unit:.6g}"), grid
        for row in cal.tested:
            row["eps"] = float(f"{row['eps'] / unit:.6g}")
    tested = ", ".join(f"{row['eps']:g}: {row['ties']} tied, {row['saturated']} saturated, {row['nonfinite']} "
                       "not finite" for row in cal.tested)
    if cal.eps is None:
        what = "its cross-entropy" if cfg.objective == "ce" else f"{cfg.metric} on a batch of {cfg.batch_size}"
        raise ConfigError(f"--eps auto: no eps from {grid[0]:g} to {grid[-1]:g} changed {what} along at least 3 in "
                          f"4 of {PROBES} probe directions (by eps: {tested}); levers that "
                          "remain: a larger --batch-size, --smooth T, a metric with finer "
                          "steps, or --eps N")
    cfg.eps = cal.eps
    report("status", {"message": f"--eps auto: eps {cal.eps:g} (of {PROBES} probes, by eps: {tested})"})
    return cal.as_dict()


def calibrate_run_scale(cfg: TrainConfig, model, tok, params: list, param_set: ParamSet, task, train_rows: list,
                        world, report) -> dict:
    """``--scale auto``: ``zoobj.engine.calibrate.calibrate_scale`` on the batches of the run's
    first steps, the probes together where the objective runs them so; sets ``cfg.scale``
    and returns what was found (config.json's ``scale_calibration``). The weights are never
    left moved."""
    from zoobj.engine.calibrate import DIRECTIONS, PROBES, SCALES, TARGET_RESPONSE, calibrate_scale

    objective, batches = _calibration_batches(cfg, model, tok, params, param_set, task, train_rows, world)
    report("status", {"message": f"--scale auto: {DIRECTIONS} probe directions on each of {PROBES} batches, factors "
                                 f"{', '.join(f'{k:g}' for k in SCALES)} of lr {cfg.lr:g} and eps {cfg.eps:g} ..."})
    cal = calibrate_scale(params, [lambda b=b: objective(b) for b in batches], cfg.eps * unit_of(param_set, model, params),
                          seed=cfg.seed, model=model, noise="auto", kind=cfg.noise,
                          probes=[(lambda pts, b=b: objective.probes(b, pts)) if objective.together else None
                                  for b in batches])
    cfg.scale = cal.scale
    tested = ", ".join(f"x{row['scale']:g}: {row['response']:.3f}" for row in cal.tested)
    report("status", {"message": f"--scale auto: x{cal.scale:g} (a probe moved the loss by this share of its spread "
                                 f"{cal.spread:.3g} over batches: {tested or 'not measured'}; target {TARGET_RESPONSE:g})"
                                 + (f"; {cal.why}" if cal.why else "")})
    return cal.as_dict()


START = -1  # the "step" of the dev evaluation before the first step (0 steps made)


def dev_due(r: RunState, step: int) -> bool:
    """Whether a dev evaluation follows step ``step`` (0-based): every ``--eval-every``
    steps and, with ``--dev-at-start``, before the first (``START``) and after the last, so
    that --keep best always weighs the model as given against where the run ended."""
    cfg = r.cfg
    if not (cfg.eval_every and r.dev_rows):
        return False
    if step == START:
        return bool(cfg.dev_at_start)
    return (step + 1) % cfg.eval_every == 0 or bool(cfg.dev_at_start and step + 1 == cfg.steps)


def dev_evaluation(r: RunState, step: int) -> None:
    """The dev evaluation after step ``step`` (0-based): logged, and offered to --keep best."""
    cfg, world = r.cfg, r.world
    t0 = time.time()
    dev = _evaluate(r.session, r.task, cfg.metric, r.dev_rows, world, batch_size=cfg.eval_batch_size, n_resamples=200)
    if dev is not None:
        r.log.append({"event": "dev", "step": step, "value": dev["value"], "ci95": dev["ci95"],
                      "seconds": round(time.time() - t0, 2)})
        r.report("dev", {"step": step, "value": dev["value"]})
    if cfg.keep == "best":
        value = dev["value"] if dev is not None else None
        r.best.offer(world.broadcast_loss(value) if world is not None else value, step + 1, r.session.params)


def finish_cut_dev_evaluation(r: RunState) -> None:
    """A resumed run that stopped between a step's trajectory line and its dev evaluation
    makes that evaluation now, so that it makes the same dev evaluations (and keeps the
    same step) as a run that never stopped."""
    last = r.start_step - 1
    if r.resume and r.start_step and dev_due(r, last) and not _logged_dev(r.out, last):
        dev_evaluation(r, last)


def _logged_dev(out: Path, step: int) -> bool:
    """Whether the run's log holds the dev evaluation after step ``step``."""
    return any(x.get("event") == "dev" and x.get("step") == step for x in tj.read_jsonl(out / tj.LOG))


def finalise(r: RunState, zero: dict | None, objective: Objective) -> tuple[dict | None, list | None]:
    """The weights the run keeps (its last step, or with --keep best its best dev step)
    evaluated on the evaluation rows: the result, logged, and the predictions (rank 0;
    ``(None, None)`` on the other ranks). With probes together, ``probe_fallbacks``
    counts the batches (of this call) whose probes ran one at a time."""
    cfg, opt, best = r.cfg, r.session.optimizer, r.best
    kept = len(opt.trajectory)
    if cfg.keep == "best" and best.tensors is not None and best.steps < kept:
        best.restore(r.session.params)  # the final evaluation, --save-model and export see the best dev step
        kept = best.steps
        r.report("status", {"message": f"keeping step {kept} (best dev {cfg.metric} {best.value:.4f})" if kept else
                            f"keeping the model as given: no step beat its dev {cfg.metric} {best.value:.4f}"})
    r.report("status", {"message": f"final evaluation on {len(r.eval_rows)} {r.task.eval_split} examples ..."})
    t0 = time.time()
    final = _evaluate(r.session, r.task, cfg.metric, r.eval_rows, r.world, keep_predictions=True,
                      batch_size=cfg.eval_batch_size)
    if not r.main:
        return None, None
    predictions = final.pop("predictions")
    records = opt.trajectory
    wall = time.time() - r.started
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    ties = sum(x["ties"] for x in records) / max(1, sum(len(x["seeds"]) for x in records))
    result = {**final, "zero_shot": zero["value"] if zero else None,
              "zero_shot_ci95": zero["ci95"] if zero else None,
              **({"zero_shot_predicted": zero["predicted"], "zero_shot_collapsed": zero["collapsed"]}
                 if zero and "predicted" in zero else {}),
              "steps": len(records),
              "tie_rate": ties, "kept_steps": kept, "best_dev": best.value,
              "wall_seconds": round(wall, 1), "eval_seconds": round(time.time() - t0, 4), "peak_rss_mib": round(peak_mib),
              "run_dir": str(r.out)}
    if r.world is not None:
        result["world_size"] = r.world.size
    if objective.together:  # the batches whose probes this call could not run together
        result["probe_fallbacks"] = objective.fallbacks
    r.log.append({"event": "final", **result})
    return result, predictions


def write_result(r: RunState, result: dict, predictions: list) -> None:
    """Rank 0, after the log is closed: predictions.jsonl, eval.json, curve.png, and the
    kept weights with --save-model."""
    tj.write_jsonl(r.out / tj.PREDICTIONS, [{"index": i, "prediction": p.item() if isinstance(p, (np.generic, torch.Tensor)) else p}
                                            for i, p in enumerate(predictions)])
    tj.write_json(r.out / tj.EVAL, result)
    plot_curve(r.out)
    if r.cfg.save_model:
        save_model_dir(r.session, r.out / "model", f"zoobj run `{r.out}` (--save-model): task `{r.cfg.task}`, "
                       f"base model `{r.cfg.model}`, parameter set `{r.session.param_set.name}`.")
    r.report("done", result)


def discard_unstarted(r: RunState) -> None:
    """A new run that failed before its first step (e.g. a reward that breaks on the
    zero-shot evaluation) has nothing to resume: leave no run directory behind, so the
    same command can simply be rerun (an empty folder the user made stays)."""
    if r.main and not r.resume and not r.session.optimizer.trajectory:
        r.close()
        shutil.rmtree(r.out, ignore_errors=True)
        if not r.created:
            r.out.mkdir(parents=True, exist_ok=True)  # the user's empty folder stays


def _evaluate(session: Session, task, metric, rows, world, keep_predictions: bool = False, **kw) -> dict | None:
    """``evaluate`` on one process, or with the rows sharded across ranks and scored on
    rank 0 (which alone gets the result; the other ranks get None)."""
    from zoobj.run.objective import predict

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

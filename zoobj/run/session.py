"""A model made ready for training: the base model (loaded unless given), the trained
tensors in a fixed order and the MeZO optimizer over them (``prepare``), shared by a
run (``zoobj.run.train``) and a rebuild from its trajectory (``zoobj.run.export``); and the
hash of the base weights that ties a run directory to its base model."""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from zoobj.engine.mezo import PASSES, MeZO
from zoobj.engine.noise import NOISE_VERSIONS
from zoobj.errors import ConfigError
from zoobj.model.params import ParamSet, make_param_set
from zoobj.model.template import template_tail
from zoobj.run.config import TrainConfig


@dataclass
class Session:
    """A model made ready for training: trainable tensors in a fixed order, and an optimizer."""

    model: object
    tok: object
    params: list
    optimizer: MeZO
    param_set: ParamSet
    unit: float = 1.0  # what one unit of lr and eps is in the trained tensors (ParamSet.unit)


def unit_of(param_set: ParamSet, model, params: list, recorded: dict | None = None) -> float:
    """``param_set.unit`` (1 where the set has none); a recorded run's own value, and 1 for
    a run made before config.json recorded it (its lr and eps were absolute)."""
    if recorded is not None:
        return float(recorded.get("unit", 1.0))
    unit = getattr(param_set, "unit", None)
    value = float(unit(model, params)) if unit is not None else 1.0
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"parameter set {param_set.name!r}: its unit of lr and eps came out {value}; "
                          "it must be a finite number > 0")
    return value


def lr_schedule(step: int) -> float:
    """Constant: the paper's MeZO runs use a constant learning rate."""
    return 1.0


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


def _device(cfg: TrainConfig, world) -> str:
    if world is not None:
        return str(world.device)
    return cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")


def prepare(cfg: TrainConfig, model=None, tok=None, world=None, recorded: dict | None = None,
            calibrate: Callable[[object, object, list, ParamSet], None] | None = None) -> Session:
    """Load the model (unless given), choose the trained tensors and build the optimizer.

    ``recorded``: the config.json of the run being resumed or rebuilt; its trajectory
    is replayed with the noise kernel that made it (compiled and eager agree only to
    float32 rounding), or a ConfigError says why that cannot be done here.
    ``calibrate(model, tok, params, param_set)``: called once the trained tensors are chosen and
    before the optimizer is built (``--eps auto`` sets ``cfg.eps`` there, ``--scale auto``
    ``cfg.scale``). The optimizer's lr and eps are ``cfg.lr`` and ``cfg.eps`` times the
    parameter set's unit times ``cfg.scale``."""
    from zoobj.model.loading import load_model

    if model is None:
        model, tok = load_model(cfg.model, dtype=cfg.dtype, device=_device(cfg, world), device_map=cfg.device_map)
    param_set = param_set_of(cfg, (recorded or {}).get("param_set"))
    model, named = param_set.attach(model, tok)
    params = [p for _, p in named]
    unit = unit_of(param_set, model, params, recorded)
    if calibrate is not None:
        calibrate(model, tok, params, param_set)
    step = unit * float(cfg.scale if cfg.scale is not None else 1.0)  # the set's unit, times --scale
    query = world is not None and cfg.parallel == "query"
    noise = _recorded_noise(recorded, params, cfg.output)
    try:
        opt = MeZO(params, lr=cfg.lr * step, eps=cfg.eps * step, seed=cfg.seed, n=cfg.n, rule=cfg.rule, shaping=cfg.shaping,
                   weight_decay=cfg.weight_decay, schedule=lr_schedule, perturb=cfg.perturb or "inplace", model=model,
                   shard=(world.rank, world.size) if query else None,
                   exchange=world.exchange_rows if query else None, noise=cfg.noise, noise_backend=noise,
                   passes=_recorded_passes(recorded, cfg.output))
    except RuntimeError as exc:  # MeZO's own check: noise="compiled" where torch.compile cannot run
        if noise != "compiled":
            raise
        here = params[0].device.type
        raise ConfigError(f"run {cfg.output} was made with the compiled noise kernel, which cannot run here "
                          f"(ZOOBJ_COMPILE=0, or torch.compile failed on {here}: see the warning above); the "
                          "eager kernel differs in the last float32 bits, so replaying with it would not give "
                          "the run's weights: use a machine where torch.compile works (a C++ compiler for CPU)") from exc
    return Session(model, tok, params, opt, param_set, unit)


def param_set_of(cfg: TrainConfig, recorded: dict | None = None) -> ParamSet:
    """The run's parameter set. ``recorded``: config.json's ``param_set`` (what the set
    needs to be rebuilt exactly); a template run made before it was recorded finds its
    tail again from the task's template and training rows (``find_tail``)."""

    def find_tail(tok) -> list[int]:
        from zoobj.tasks import get_task

        task = get_task(cfg.task)
        return template_tail(task, tok, task.load("train", cfg.data))

    return make_param_set(cfg.peft, train_embeddings=cfg.train_embeddings, seed=cfg.seed, layers=cfg.layers,
                          find_tail=find_tail, recorded=recorded)


def _recorded_passes(recorded: dict | None, run_dir) -> str:
    """How the run's moves were grouped into passes: "fused" for a new run, "separate" for
    one made before config.json recorded it (the same bits either way; kept as made)."""
    if recorded is None:
        return "fused"
    passes = recorded.get("passes", "separate")
    if passes not in PASSES:
        raise ConfigError(f"run {run_dir} was made with passes {passes!r}, which this zoobj does not have "
                          f"(it has {', '.join(PASSES)}); replay it with the zoobj version that made it "
                          "(config.json: zoobj_version)")
    return passes


def _recorded_noise(recorded: dict | None, params: list, run_dir) -> str:
    """The noise kernel a run's trajectory must be replayed with ("auto" for a new run)."""
    version = (recorded or {}).get("noise_version", 1)  # runs made before the key existed: version 1
    if version not in NOISE_VERSIONS:
        raise ConfigError(f"run {run_dir} was made with noise function version {version}, which this zoobj "
                          f"does not have (it has {', '.join(map(str, NOISE_VERSIONS))}); replay it with the "
                          "zoobj version that made it (config.json: zoobj_version)")
    if not recorded or recorded.get("noise_backend") not in ("compiled", "eager"):
        return "auto"
    backend, device = recorded["noise_backend"], recorded.get("noise_device")
    here = params[0].device.type
    if device and device != here:
        warnings.warn(f"zoobj: run {run_dir} made its noise on {device}, this replay on {here}: the weights "
                      "agree only to float32 rounding of the noise", RuntimeWarning, stacklevel=3)
    return backend

"""Every setting of a run, declared once: ``TrainConfig``.

A field's ``metadata["help"]`` is its command-line help: ``zoobj train`` and
``zoobj compare`` build their options from these fields (``cli_fields``), and the
default shown in ``--help`` is the field's own default (``shown_default``), or, for a
setting resolved later from the task or the parameter set, the ``shown`` rule. A field
without help is a setting of the Python API only. Also here: ``resolved`` (those later
defaults, and the checks of every value), reading a run's ``config.json`` back
(``load_run_config``, ``resume_config``) and the check that a resumed run keeps its
settings (``check_same_run``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import torch

from zoobj.engine import trajectory as tj
from zoobj.engine.mezo import PERTURB, RULES, SHAPINGS
from zoobj.engine.noise import NOISE_KINDS
from zoobj.errors import ConfigError
from zoobj.model.params import PARAM_SETS
from zoobj.run import recipes
from zoobj.run.objective import OBJECTIVES

PEFT = tuple(PARAM_SETS)
PARALLEL = ("data", "query")
KEEP = ("last", "best")
# lr and eps per parameter set, in its tensors' units: the paper's (Malladi et al. 2023,
# Tables 15-16), and zoobj's own for the template tail (docs/results.md, SQuAD)
PAPER_DEFAULTS = {name: (ps.lr, ps.eps) for name, ps in PARAM_SETS.items()}
AUTO = "auto"  # --eps auto
# Generation length while training a generation task, at most (answers are short; evaluation keeps the task's).
TRAIN_MAX_NEW_TOKENS = 24
# Dev rows a run evaluates by default: enough that the steps --keep best chooses between
# differ by more than noise (a 95% interval of about +-0.06 on accuracy near 0.5 at 256
# rows), few enough that a generation task's evaluations stay a small part of its run.
DEV_LIMITS = {"classification": 256, "generation": 64}


def setting(default=dataclasses.MISSING, help: str | None = None, shown: str | None = None, flag: str | None = None,
            cli_type: type | None = None):
    """A TrainConfig field. ``help``: its command-line help (no help: no option);
    ``shown``: what a default of None stands for, resolved later; ``flag``: the
    option's declaration where it is not ``--the-name`` (an on/off pair); ``cli_type``:
    the type the command line reads where it is not the field's (a number or a word)."""
    meta = {k: v for k, v in dict(help=help, shown=shown, flag=flag, cli_type=cli_type).items() if v is not None}
    return field(default=default, metadata=meta)


def _paper(i: int) -> str:
    paper = ", ".join(f"{PAPER_DEFAULTS[k][i]:g} ({k})" for k, ps in PARAM_SETS.items() if ps.paper)
    ours = ", ".join(f"{PAPER_DEFAULTS[k][i]:g} ({k})" for k, ps in PARAM_SETS.items() if not ps.paper)
    return f"the paper's for the parameter set: {paper}; zoobj's {ours}"


@dataclass
class TrainConfig:
    """Every setting of a run. ``None`` means "the default for this task and parameter set".
    A field with help is a command-line option (``setting``); the others (weight_decay,
    eval_batch_size, zero_shot, extra) are set from Python."""

    task: str = setting(help="Task name, task .toml file, or package.module:object.")
    metric: str | None = setting(None, "Metric name, module:function or file.py:function.", shown="the task's")
    objective: str = setting("metric", "metric (optimise the metric itself) or ce (cross-entropy MeZO).")
    ce_over: str | None = setting(None, "What --objective ce normalises over: candidates (a classification task: the "
                                  "gold candidate's share of a softmax over the candidates' scores, as MeZO trained "
                                  "classification) or vocabulary (the gold words' likelihood among all tokens).",
                                  shown="candidates for classification, vocabulary for generation")
    model: str = setting("gemma-3-270m", "Model alias, local directory, .gguf file or Hub id.")
    steps: int | None = setting(None, "Steps in all.", shown="20, or the task's recipe")
    batch_size: int | None = setting(None, "Global batch size.", shown="8, or the task's recipe")
    lr: float | None = setting(None, "Learning rate.", shown=_paper(0))
    eps: float | str | None = setting(None, "Perturbation scale, or auto: before the first step, the smallest value "
                                      "on a half-decade grid from the default up to 100x at which at most 2 of 8 "
                                      "seeded probe directions leave the loss unchanged (recorded in config.json).",
                                      shown=_paper(1), cli_type=str)
    scale: float | str | None = setting(None, "Multiply lr and eps by this, or auto: before the first step, the "
                                        "smallest of 1, 1.5, 2, 3, 4, 6, 8 at which a probe moves the loss by 1/20 of "
                                        "its spread from batch to batch (recorded in config.json): the same settings "
                                        "for a model that answers a perturbation less.",
                                        shown="1, or the default recipe's auto unless --lr or --eps is given",
                                        cli_type=str)
    n: int | None = setting(None, "Perturbations per step (n-SPSA), all evaluated on the same batch.",
                            shown="1, or the task's recipe")
    shaping: str | None = setting(None, "How a step's 2n losses become the update: none ((l+ - l-) / 2 eps, the "
                           "paper's), zscore or rank (losses standardised or ranked within the step: unit-free, "
                           "so --lr is a step length per unit of noise, whatever the metric's jumps).",
                           shown="none, or the task's recipe")
    rule: str = setting("sgd", "Update rule: sgd, momentum or adam.")
    noise: str = setting("rademacher", "Perturbation directions: rademacher (+-1 per element, Spall's SPSA: the "
                         "same estimator, noise passes several times cheaper) or gaussian (z ~ N(0, I), the paper's).")
    peft: str | None = setting(None, "Which parameters train: none (full parameters), lora, prefix, or template "
                                     "(the input vectors of the prompt's closing template words).",
                               shown="none, or the task's recipe")
    layers: str | None = setting(None, "Train only these decoder blocks: top:K (the last K) or A-B (0-based, "
                                 "inclusive); full parameters add the final norm.", shown="all")
    shared: bool = setting(True, "Compute the frozen blocks below the lowest trained one once per step and reuse "
                           "them in every probe (falls back to the plain path, with a log line, where it cannot).",
                           flag="--shared/--no-shared")
    seed: int = setting(0, "Seed of noise and batches.")
    weight_decay: float = 0.0
    train_embeddings: bool = setting(False, "Perturb the token embeddings too.",
                                     flag="--train-embeddings/--freeze-embeddings")
    eval_every: int = setting(10, "Dev evaluation every N steps, 0 = never.")
    eval_limit: int = setting(100, "Final and zero-shot evaluation on the first N examples.")
    dev_limit: int | None = setting(None, "Dev evaluations use the first N dev examples.",
                                    shown=f"{DEV_LIMITS['classification']} for classification, "
                                          f"{DEV_LIMITS['generation']} for generation")
    keep: str | None = setting(None, "last (the weights after the last step) or best (the best dev evaluation, "
                                     "the unchanged model included: needs --eval-every).",
                               shown="best where dev evaluations run, else last")
    dev_at_start: bool = setting(True, "Evaluate dev before the first step and after the last too: with --keep best "
                                       "the model you gave is a candidate, so a run never returns weights worse on dev "
                                       "than it began with.",
                                 flag="--dev-at-start/--no-dev-at-start")
    eval_batch_size: int = 32
    train_max_new_tokens: int | None = setting(None, "Generation length during training (evaluation keeps the task's).",
                                               shown=f"the task's, at most {TRAIN_MAX_NEW_TOKENS}")
    smooth: float | None = setting(None, "Optimise the metric's expectation under softmax(candidate scores / T) "
                                   "instead of the hard metric (fewer l+ == l- ties): over the classes for "
                                   "classification, over the greedy answer before the step and the references for "
                                   "generation; 0 = off.", shown="0, or the task's recipe (metric objective)")
    data: str | None = setting(None, "'hub' or a folder of <split>.jsonl files.", shown="shipped data")
    dtype: str = setting("float32", "float32, bf16 or fp16.")
    perturb: str | None = setting(None, "inplace (the paper's) or forward (exact in any dtype).",
                                  shown="inplace for float32, forward for bf16/fp16")
    parallel: str = setting("data", "Under torchrun: data (shard the batch) or query (one perturbation per process).")
    device: str | None = setting(None, "cpu, cuda, cuda:1 ...", shown="cuda if present")
    device_map: str | None = setting(None, "auto: spread the layers over the visible devices (Accelerate), for a model "
                                           "larger than one device.")
    output: str | None = setting(None, "Run directory.", shown="runs/<task>-<metric>-<time>")
    save_model: bool = setting(False, "Also write the weights into <run dir>/model.")
    report_to: str = setting("none", "Experiment trackers that get the run's numbers: tensorboard, mlflow, wandb "
                                     "(comma-separated; each an optional extra: pip install 'zoobj[mlflow]'), or none.")
    zero_shot: bool = True
    recipe: str | None = None  # set by resolved(): whose recipe filled the unset settings (zoobj.run.recipes)
    extra: dict = field(default_factory=dict)

    def resolved(self) -> TrainConfig:
        from zoobj.tasks import get_task

        c = dataclasses.replace(self)
        _one_of(c.objective, OBJECTIVES, "objective")
        task = get_task(c.task)
        _fill_defaults(c, task)
        _one_of(c.peft, PEFT, "--peft")
        _one_of(c.rule, RULES, "--rule")
        _one_of(c.noise, NOISE_KINDS, "--noise")
        _one_of(c.shaping, SHAPINGS, "--shaping")
        from zoobj.model.loading import resolve_dtype

        low = resolve_dtype(c.dtype) in (torch.bfloat16, torch.float16)
        c.perturb = c.perturb or ("forward" if low else "inplace")  # exact restore where rounding would drift
        _one_of(c.perturb, PERTURB, "--perturb")
        _one_of(c.parallel, PARALLEL, "--parallel")
        if c.dev_limit is None:
            c.dev_limit = DEV_LIMITS.get(task.kind, DEV_LIMITS["classification"])
        if c.keep is None:  # the best dev step wherever there are dev evaluations to choose by
            c.keep = "best" if c.eval_every and c.dev_limit else "last"
        _one_of(c.keep, KEEP, "--keep")
        if c.keep == "best" and not (c.eval_every and c.dev_limit):
            raise ConfigError("--keep best picks the step with the best dev metric: it needs --eval-every N > 0")
        if c.steps < 1:
            raise ConfigError(f"--steps must be at least 1, got {c.steps}")
        if not (math.isfinite(c.smooth) and c.smooth >= 0):
            raise ConfigError(f"--smooth must be a temperature >= 0 (0: the metric itself), got {c.smooth}")
        if c.batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {c.batch_size}")
        c.metric = c.metric or task.metric
        if c.smooth and c.objective != "metric":
            raise ConfigError(f"--smooth applies to the metric objective, not {c.objective}: drop --smooth "
                              f"or use --objective metric")
        if c.train_max_new_tokens is None and task.kind == "generation":
            # shorter generations while training (answers are short; evaluation keeps the task's length)
            c.train_max_new_tokens = min(getattr(task, "max_new_tokens", 50), TRAIN_MAX_NEW_TOKENS)
        from zoobj.metrics import check_fits, get_metric
        from zoobj.run import trackers

        trackers.parse(c.report_to)  # an unknown or uninstalled tracker fails here, before the model loads

        get_metric(c.metric)  # a bad name fails here, before any model is loaded
        check_fits(c.metric, task.kind, task.name)
        _step_settings(c)
        _ce_over(c, task)
        if c.output is None:
            stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
            c.output = str(Path("runs") / f"{_plain(task.name)}-{_plain(c.metric) if c.objective == 'metric' else 'ce'}"
                                          f"-{stamp}")
        return c


# What a setting left unset means where no recipe sets it (or the run leaves the recipe).
DEFAULTS = {"steps": 20, "batch_size": 8, "n": 1, "shaping": "none", "peft": "none", "smooth": 0.0, "scale": 1.0}


def _fill_defaults(c: TrainConfig, task) -> None:
    """Settings left unset (None) take the task's recipe -- its own (``task.recipe``) or
    the default one for its kind (``zoobj.run.recipes``) -- when the run keeps the
    recipe's parameter set (``--peft`` unset or the same), then the defaults above;
    ``smooth`` only for the metric objective, ``scale`` only where neither lr nor eps is
    given (a given lr or eps is the one used). lr and eps left unset after that are the
    paper's for the parameter set (``PAPER_DEFAULTS``). ``recipe`` records whose recipe
    it was (None: none applied; a resumed run's settings are all set already)."""
    if c.recipe is None and any(getattr(c, key) is None for key in recipes.KEYS):
        source, recipe = recipes.recipe_for(task, c.data)
        if recipe and c.peft in (None, recipe.get("peft", "none")):
            c.recipe = source
            for key in recipes.KEYS:
                if getattr(c, key) is None and key in recipe and (key != "smooth" or c.objective == "metric") \
                        and (key != "scale" or (c.lr is None and c.eps is None)):
                    setattr(c, key, recipe[key])
    for key, value in DEFAULTS.items():
        if getattr(c, key) is None:
            setattr(c, key, value)


def _step_settings(c: TrainConfig) -> None:
    """lr, eps and scale: the parameter set's lr and eps where unset (``PAPER_DEFAULTS``),
    each checked."""
    lr, eps = PAPER_DEFAULTS[c.peft]
    c.lr = lr if c.lr is None else c.lr
    c.eps = eps if c.eps is None else _eps_value(c.eps)
    if not (math.isfinite(c.lr) and c.lr >= 0):
        raise ConfigError(f"--lr must be a finite number >= 0, got {c.lr}")
    if c.eps != AUTO and not (math.isfinite(c.eps) and c.eps > 0):
        raise ConfigError(f"--eps must be a finite number > 0 or auto, got {c.eps}")
    c.scale = _eps_value(c.scale, "--scale")
    if c.scale != AUTO and not (math.isfinite(c.scale) and c.scale > 0):
        raise ConfigError(f"--scale must be a finite number > 0 or auto, got {c.scale}")
    if c.scale == AUTO and c.eps == AUTO:
        raise ConfigError("--scale auto and --eps auto each calibrate eps before the first step: choose one")


def _ce_over(c: TrainConfig, task) -> None:
    """What cross-entropy normalises over: checked where given, the task's default for the
    ce objective where not (the metric objective leaves it unset)."""
    from zoobj.run.objective import ce_over_for, check_ce_over

    if c.ce_over is not None:
        check_ce_over(c.ce_over, task)
    elif c.objective == "ce":
        c.ce_over = ce_over_for(task)


def _plain(name: str) -> str:
    """A metric or task name as one folder name: a user function's own name, anything
    but letters, digits, '_', '.' and '-' as '-'.

    >>> _plain("mypkg/rewards.py:strict"), _plain("evaluate:squad#f1"), _plain("f1")
    ('strict', 'squad-f1', 'f1')
    """
    import re

    name = name.removeprefix("evaluate:").rsplit(":", 1)[-1]
    return re.sub(r"[^\w.-]+", "-", name).strip("-.") or "run"


def _eps_value(eps: float | str, flag: str = "--eps") -> float | str:
    """A number, or ``AUTO`` (calibrated before the first step: ``zoobj.engine.calibrate``)."""
    if not isinstance(eps, str):
        return eps
    if eps.strip().lower() == AUTO:
        return AUTO
    try:
        return float(eps)
    except ValueError:
        raise ConfigError(f"{flag} must be a number > 0 or auto, got {eps!r}") from None


def _one_of(value: str, choices: tuple[str, ...], what: str) -> None:
    if value not in choices:
        raise ConfigError(f"unknown {what} {value!r}; choose one of {', '.join(choices)}")


def cli_fields() -> list[dataclasses.Field]:
    """The settings that are command-line options, in TrainConfig's order."""
    return [f for f in dataclasses.fields(TrainConfig) if "help" in f.metadata]


def shown_default(f: dataclasses.Field) -> str | None:
    """What ``--help`` says a setting's default is: the field's own default, the rule
    for one resolved later, the side of an on/off pair that is on by default, or None
    (nothing to show: off unless given).

    >>> every = TrainConfig.__dataclass_fields__["eval_every"]
    >>> every.default, every.metadata["help"], shown_default(every)
    (10, 'Dev evaluation every N steps, 0 = never.', '10')
    >>> shown_default(TrainConfig.__dataclass_fields__["steps"])
    "20, or the task's recipe"
    >>> shown_default(TrainConfig.__dataclass_fields__["train_embeddings"])
    'freeze-embeddings'
    """
    if "shown" in f.metadata:
        return f.metadata["shown"]
    if f.default is dataclasses.MISSING or f.default is None:
        return None
    if isinstance(f.default, bool):
        if "flag" not in f.metadata:
            return None
        on, off = f.metadata["flag"].split("/")
        return (on if f.default else off).lstrip("-")
    return str(f.default)


# Settings of a launch, not of the run: left out of config.json and free to differ on resume.
NOT_RECORDED = ("output", "save_model", "zero_shot", "device", "device_map", "report_to")
# Settings a resumed run may change: neither alters the trajectory (see resume_config).
RESUMABLE_CHANGES = ("steps", "keep")
# What a setting missing from an older run's config.json was: what the version that wrote it
# ran with -- a field's own default, or for a setting resolved later the no-recipe default
# (n 1, shaping none, peft none, no smoothing: the recipes came later), in-place perturbation and
# Gaussian directions (the default until 0.3), the last step kept, no dev evaluation before
# the first step, and 32 dev rows.
BEFORE_RECORDED = {**DEFAULTS, "perturb": "inplace", "noise": "gaussian", "keep": "last", "dev_at_start": False,
                   "dev_limit": 32}
_DEFAULTS = {**{f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING},
             **BEFORE_RECORDED}


def recorded_settings(cfg: TrainConfig) -> dict:
    """The settings config.json records."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_RECORDED}


def check_same_run(cfg: TrainConfig, saved: dict, out: Path) -> None:
    """Resuming replays the saved trajectory and continues it: every setting that shapes
    the trajectory or its evaluation must be the run's own (``steps`` and ``keep`` may change)."""
    ours = {k: v for k, v in recorded_settings(cfg).items()
            if k not in RESUMABLE_CHANGES and k != "model"}  # the model is compared by its weights' hash
    for key in ("eps", "scale"):
        if ours.get(key) == AUTO and f"{key}_calibration" in saved:  # the run calibrated it when it began
            del ours[key]
    differ = [k for k, v in ours.items() if _recorded(saved, k) != v]
    if differ:
        shown = ", ".join(f"{k} {ours[k]!r} (the run's: {_recorded(saved, k)!r})" for k in differ)
        raise ConfigError(f"{out}: resuming with settings that differ from {out / tj.CONFIG}: {shown}; "
                          "resume with the run's own settings (zoobj.run.config.load_run_config, or zoobj train --resume)")


def _recorded(saved: dict, key: str):
    """A run's setting from its config.json; one it predates, as the run was made: a
    cross-entropy run before ``ce_over`` was recorded normalised over the vocabulary."""
    if key in saved:
        return saved[key]
    if key == "ce_over":
        return "vocabulary" if saved.get("objective") == "ce" else None
    return _DEFAULTS.get(key)


def load_run_config(run_dir: str | Path) -> TrainConfig:
    """A run's own settings from its config.json; a setting it predates takes the value
    the run was made with (``BEFORE_RECORDED``), never today's recipe."""
    saved = tj.read_json(Path(run_dir) / tj.CONFIG)
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in saved.items() if k in names})
    for key in (*BEFORE_RECORDED, "ce_over"):  # a run made before the setting was recorded
        if key not in saved:
            setattr(cfg, key, _recorded(saved, key))
    cfg.output = str(run_dir)
    return cfg


def resume_config(run_dir: str | Path, overrides: dict) -> TrainConfig:
    """The run's own settings; ``steps`` and ``keep`` may change (neither alters the
    trajectory: resuming a finished run with ``--keep best`` re-does only its final
    evaluation), any other flag must agree."""
    cfg = load_run_config(run_dir)
    saved = tj.read_json(Path(run_dir) / tj.CONFIG)
    for key, value in overrides.items():
        if value is None or key in ("output", "steps", "keep", "save_model", "report_to"):  # per invocation, not saved
            continue
        if key in ("eps", "scale"):  # the command line gives them as text
            value = _eps_value(value, f"--{key}")
            if value == AUTO and f"{key}_calibration" in saved:
                continue  # the run was made with --eps / --scale auto: what it calibrated stands
        if getattr(cfg, key) != value:
            raise ConfigError(f"--{key.replace('_', '-')} {value!r} contradicts the run's {getattr(cfg, key)!r} "
                              f"({run_dir}/config.json); leave it out when resuming")
    for key in ("steps", "keep"):
        if overrides.get(key) is not None:
            setattr(cfg, key, overrides[key])
    cfg.save_model = bool(overrides.get("save_model"))
    cfg.report_to = overrides.get("report_to") or "none"
    return cfg

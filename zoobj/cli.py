"""The ``zoobj`` command line: parses flags and calls library code, nothing more.

The options of ``zoobj train`` and ``zoobj compare`` are not written out here: they
are built from the settings they set, declared once in ``zoobj.run.config.TrainConfig``
(name, type, help and default; ``setting_options``), so ``--help`` shows the default
the code uses.
"""

from __future__ import annotations

import inspect
import json
import sys
import typing

import typer
from rich.markup import escape

import zoobj
from zoobj.errors import ZoobjError
from zoobj.run import compare
from zoobj.run.config import TrainConfig, cli_fields, shown_default
from zoobj.run.recipes import said

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Fine-tune language models toward any metric with forward passes only (MeZO).",
)


def _option(name: str, kind: type, default, decl: str, help: str, shown: str | None = None) -> inspect.Parameter:
    """A command-line option as typer reads it from a command's signature; ``shown``:
    the default its help ends with, ``[default: ...]``."""
    help = escape(help)  # rich markup would swallow brackets: 'zoobj[mlflow]', '[default: ...]'
    if shown is not None:
        help += " " + escape(f"[default: {shown}]")
    option = typer.Option(default, decl, help=help, show_default=False)
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind)


def setting_options(names: typing.Sequence[str] | None = None, required: typing.Sequence[str] = (),
                    shown: dict | None = None, help: dict | None = None) -> list[inspect.Parameter]:
    """An option for each TrainConfig setting that has help (those in ``names`` only, in
    that order), its help ending with the default the code uses. A value not given is
    None, so that a resumed run can tell a given flag from a default (an on-switch such
    as --save-model is off); ``required`` options have none. A command's own defaults
    (``shown``) and help texts (``help``) win over TrainConfig's."""
    fields = {f.name: f for f in cli_fields()}
    hints = typing.get_type_hints(TrainConfig)
    shown, help = shown or {}, help or {}
    options = []
    for name in names or fields:
        f = fields[name]
        kind = f.metadata.get("cli_type") or next(  # int | None -> int
            t for t in (*typing.get_args(hints[name]), hints[name]) if t is not type(None))
        default = ... if name in required else (f.default if kind is bool and "flag" not in f.metadata else None)
        options.append(_option(name, kind, default, f.metadata.get("flag", "--" + name.replace("_", "-")),
                               help.get(name, f.metadata["help"]),
                               shown=None if name in required else shown.get(name, shown_default(f))))
    return options


def _with_options(*params: inspect.Parameter):
    """Give a command the options ``params``: typer reads them from the command's
    signature, and the command takes them as keyword arguments."""

    def attach(command):
        command.__signature__ = inspect.Signature(params)
        return command

    return attach


@app.callback(invoke_without_command=True)
def _root(version: bool = typer.Option(False, "--version", help="Print the version and exit.")) -> None:
    if version:
        typer.echo(f"zoobj {zoobj.__version__}")
        raise typer.Exit()


@app.command("version")
def version_cmd() -> None:
    """Print the version."""
    typer.echo(f"zoobj {zoobj.__version__}")


@app.command("eval")
def eval_cmd(
    task: str = typer.Option(None, "--task", help="Task name, task .toml file, or package.module:object (default: the run's)."),
    metric: str = typer.Option(None, "--metric", help="Metric name(s), comma-separated, or module:function (default: the task's)."),
    run: str = typer.Option(None, "--run", help="Evaluate the trained model of this run directory (base model + trajectory)."),
    model: str = typer.Option(TrainConfig.model, "--model", help="Model alias, local directory, .gguf file or Hub id."),
    split: str = typer.Option(None, "--split", help="Split to evaluate (default: the task's evaluation split)."),
    limit: int = typer.Option(None, "--limit", help="Evaluate the first N examples only."),
    data: str = typer.Option(None, "--data", help="'hub' or a folder of <split>.jsonl files (default: shipped data)."),
    batch_size: int = typer.Option(16, "--batch-size"),
    dtype: str = typer.Option(TrainConfig.dtype, "--dtype", help="float32, bf16 or fp16."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
    calibrate: bool = typer.Option(False, "--calibrate", help="Contextual calibration (classification): divide "
                                   "out the model's class prior on content-free inputs (Zhao et al. 2021)."),
) -> None:
    """Zero-shot (or any saved model's) metric on a split, with a 95% bootstrap interval."""
    from zoobj.model.loading import load_model
    from zoobj.run.objective import evaluate
    from zoobj.tasks import get_task

    run_cfg = None
    if run:
        from zoobj.run.config import load_run_config

        run_cfg = load_run_config(run)
        task = task or run_cfg.task
    if task is None:
        raise ZoobjError("--task is required (or --run DIR)")
    t = get_task(task)
    names = [x.strip() for x in (metric or (run_cfg.metric if run_cfg else None) or t.metric).split(",") if x.strip()]
    from zoobj.metrics import check_fits, get_metric

    fns = {name: get_metric(name) for name in names}  # fail on a bad name before loading the model
    for name in names:
        check_fits(name, t.kind, t.name)
    if run_cfg:
        from zoobj.run.export import rebuild

        _, session = rebuild(run)
        m, tok, model = session.model, session.tok, f"{run_cfg.model} + {run}"
    else:
        m, tok = load_model(model, dtype=dtype)
    from zoobj.run.objective import predict

    rows = t.load(split or t.eval_split, data)
    rows = rows[:limit] if limit else rows
    preds = predict(m, tok, t, rows, batch_size=batch_size, calibrate=calibrate)  # once, however many metrics
    results = []
    for name, fn in fns.items():
        r = evaluate(m, tok, t, fn, split=split, rows=rows, predictions=preds)
        r.pop("predictions")
        r.update(metric=name, model=model, **({"calibrated": True} if calibrate else {}))
        results.append(r)
    _print_evaluations(results, f"{t.name} · {results[0]['split']} · {model}{' · calibrated' if calibrate else ''}",
                       as_json)


def _print_evaluations(results: list[dict], title: str, as_json: bool) -> None:
    """``zoobj eval``'s output: one JSON object per metric, or a table."""
    if as_json:
        for r in results:
            typer.echo(json.dumps(r))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in ("metric", "n", "value", "95% CI"):
        table.add_column(col)
    for r in results:
        low, high = r["ci95"]
        table.add_row(r["metric"], str(r["n"]), f"{r['value']:.4f}", f"[{low:.4f}, {high:.4f}]")
    Console().print(table)
    if "predicted" in results[0]:  # the same predictions for every metric
        r = results[0]
        print(f"predicted classes: {_classes(r['predicted'], r['n'])}; labels: {_classes(r['labels'], r['n'])}")
        note = collapse_note(r, "the model")
        if note:
            print(note)


def _in_units(unit: float) -> str:
    """How lr and eps read where the parameter set has units of its own (the template tail)."""
    return "" if unit == 1.0 else f"(x the tail vectors' RMS {unit:.4g}) "


def _classes(counts: dict, n: int, top: int = 4) -> str:
    """``great 491, terrible 9`` (the most frequent first; the rest as ``+k more``)."""
    shown = [f"{name} {c}" for name, c in list(counts.items())[:top]]
    return ", ".join(shown) + (f", +{len(counts) - top} more" if len(counts) > top else "") + f" (of {n})"


def collapse_note(r: dict, which: str) -> str | None:
    """One plain line when one class takes most of an evaluation's predictions."""
    top = r.get("collapsed")
    if top is None:
        return None
    n, count = r["n"], r["predicted"][top]
    return (f"note: {which} puts {count} of {n} predictions ({count / n:.0%}) in one class, {top!r}, which is "
            f"{r['labels'].get(top, 0) / n:.0%} of the labels; always answering the most frequent label would "
            f"score {r['majority_label_share']:.4f} accuracy. The template tail with --smooth T (the default "
            "recipe for classification) moves the classes' scores from such a start, more --steps further; "
            "zoobj eval --calibrate measures the cheapest fix")


def _err_console():
    from rich.console import Console

    return Console(stderr=True, soft_wrap=True)


def _count(n: int) -> str:
    """Trainable parameters for the run's header line: ``100.3M`` for a model, ``1,920`` for a template tail.

    >>> _count(100_300_000), _count(368_640), _count(1920)
    ('100.3M', '0.37M', '1,920')
    """
    if n >= 10_000_000:
        return f"{n / 1e6:.1f}M"
    return f"{n / 1e6:.2f}M" if n >= 100_000 else f"{n:,}"


PROGRESS_FIELDS = ("Progress fields: loss = the step's mean of l+ and l- (for the metric objective, minus the "
                   "metric); g = the step's projected gradient (its coefficient, averaged over its directions); "
                   "tied = the share of directions so far whose l+ == l- (nothing moved along them); spread = the "
                   "standard deviation of the step's 2n losses; s/step and ETA from the steps of this process.")


def _clock(seconds: float) -> str:
    """``h:mm:ss``.

    >>> _clock(3725.2)
    '1:02:05'
    """
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class _Progress:
    """Progress on stderr: rich's live bar in a terminal; elsewhere (a log file, nohup, a
    cluster job) one plain line per step. Both show the step, loss, projected gradient,
    tie rate, spread, seconds per step and ETA (``PROGRESS_FIELDS``)."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = _err_console()
        self.live = self.console.is_terminal
        self.bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                            TimeElapsedColumn(), console=self.console, transient=False)
        self.task_id = None
        self.ties = self.directions = self.seen = 0
        self.t0 = self.total = self.done = None

    def _say(self, text: str) -> None:
        (self.bar.console if self.task_id is not None and self.live else self.console).print(text, highlight=False)

    def __call__(self, event: str, info: dict) -> None:
        import time

        if event == "status":
            self._say(info["message"])
        elif event == "start":
            self._start(info)
            self.t0, self.total, self.done = time.time(), info["cfg"].steps, info["start_step"]
            if self.live:
                self.bar.start()
                self.task_id = self.bar.add_task("train", total=self.total, completed=self.done,
                                                 info="(the first step's numbers and ETA come after it)")
        elif event == "step":
            self.seen, self.done = self.seen + 1, self.done + 1
            self.ties += info["ties"]
            self.directions += info.get("directions", 1)
            per = (time.time() - self.t0) / self.seen
            fields = (f"loss {info['loss']:.4f}  g {info['grad']:+.3g}  tied {self.ties / self.directions:.0%}  "
                      f"spread {info.get('spread') or 0:.3g}  {per:.1f} s/step  ETA {_clock(per * (self.total - self.done))}")
            if self.live:
                self.bar.update(self.task_id, advance=1, info=fields)
            else:
                self._say(f"step {self.done}/{self.total}  {fields}")
        elif event == "dev":
            from zoobj.engine.trajectory import shown_step

            at = shown_step(info)
            self._say(f"step {at}: dev {info['value']:.4f}" if at else f"before the first step: dev {info['value']:.4f}")
        elif event == "done":
            self.stop()

    def _start(self, info: dict) -> None:
        cfg = info["cfg"]
        self.console.print(f"[bold]zoobj[/] {cfg.task} · objective {cfg.objective}"
                           f"{' (' + cfg.metric + ')' if cfg.objective == 'metric' else ''} · model {cfg.model} · "
                           f"{_count(info['trainable'])} trainable ({cfg.peft}) · lr {cfg.lr:g} eps {cfg.eps:g} "
                           f"{_in_units(info.get('unit', 1.0))}"
                           f"{f'(x{cfg.scale:g}: --scale) ' if cfg.scale not in (None, 1) else ''}"
                           f"· batch {cfg.batch_size}"
                           f"{f' · population {cfg.n} ({cfg.shaping})' if (cfg.n or 1) > 1 else ''}"
                           f"{f' · smooth {cfg.smooth:g}' if cfg.smooth else ''}"
                           f"{f' · {said(cfg.recipe)}' if cfg.recipe else ''}", highlight=False)
        self.console.print(f"run dir {cfg.output}", highlight=False, soft_wrap=True)  # whole, to copy from a log
        if info.get("note"):
            self.console.print(f"note: {info['note']}", highlight=False)
        if info.get("zero_shot"):
            z = info["zero_shot"]
            self.console.print(f"zero-shot {cfg.metric}: {z['value']:.4f} (n={z['n']})", highlight=False)

    def stop(self) -> None:
        if self.task_id is not None:
            self.bar.stop()
            self.task_id = None


def _levers(cfg) -> str:
    """What a run that did not move could try next, leaving out what it already used."""
    out = ["more --steps"]
    if cfg is not None and cfg.scale not in (None, 1, 1.0):
        chosen = "auto's choice, in config.json" if isinstance(cfg.scale, str) else f"x{cfg.scale:g}"
        out.append(f"a larger --scale (this run's: {chosen})")
    elif cfg is None or cfg.eps != "auto":
        out.append("--eps auto (the smallest eps that unties)")
    if cfg is None or (cfg.n or 1) == 1:
        out.append("a population (--n 8 --shaping zscore)")
    if cfg is None or (cfg.objective == "metric" and not cfg.smooth):
        out.append("--smooth T")
    if cfg is None or cfg.batch_size < 32:
        out.append("a larger --batch-size")
    return ", ".join(out[:-1]) + " or " + out[-1]


def _summary(result: dict, metric: str, cfg=None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="zoobj train: summary")
    table.add_column("")
    table.add_column("value")
    z = result.get("zero_shot")
    low, high = result["ci95"]
    table.add_row(f"final {metric} ({result['split']}, n={result['n']})", f"{result['value']:.4f}  [{low:.4f}, {high:.4f}]")
    if z is not None:
        zl, zh = result["zero_shot_ci95"]
        table.add_row(f"zero-shot {metric}", f"{z:.4f}  [{zl:.4f}, {zh:.4f}]")
    kept = result.get("kept_steps", result["steps"])
    table.add_row("steps", str(result["steps"]) if kept == result["steps"] else
                  f"{result['steps']} (kept step {kept}: best dev {metric} {result['best_dev']:.4f})" if kept else
                  f"{result['steps']} (kept none: the model as given, dev {metric} {result['best_dev']:.4f})")
    table.add_row("tie rate (l+ == l-)", f"{result['tie_rate']:.1%}")
    if "predicted" in result:  # a classification task: where the predictions went
        if result.get("zero_shot_predicted"):
            table.add_row("predicted classes, zero-shot", _classes(result["zero_shot_predicted"], result["n"]))
        table.add_row("predicted classes, final", _classes(result["predicted"], result["n"]))
        table.add_row("labels", _classes(result["labels"], result["n"]))
    if result.get("probe_fallbacks"):
        table.add_row("batches with probes one at a time", str(result["probe_fallbacks"]))
    table.add_row("wall time", f"{result['wall_seconds']:.0f} s")
    table.add_row("peak memory (RSS)", f"{result['peak_rss_mib']} MiB")
    Console().print(table)
    print(f"run dir: {result['run_dir']}")  # whole, on its own line: a log's width never cuts it
    if result["steps"] and result["tie_rate"] >= 1.0:
        print(f"note: every probe tied (l+ == l- along every direction): the weights never moved. Levers: {_levers(cfg)}")
    zero_note = collapse_note({**result, "collapsed": result.get("zero_shot_collapsed"),
                               "predicted": result.get("zero_shot_predicted") or {}}, "the model as given")
    for note in (zero_note, collapse_note(result, "the final model")):
        if note:
            print(note)
    if result["steps"] and kept == 0:
        print(f"note: no step beat the model you gave on dev ({metric} {result['best_dev']:.4f} before the first "
              f"step), so the result is that model, unchanged. Levers: {_levers(cfg)}")
    line = f"{metric}: {result['value']:.4f} after {result['steps']} step{'s' if result['steps'] != 1 else ''}"
    if result["steps"] and kept == 0:
        line += " (none kept)"
    if z is not None:
        line += f" (zero-shot {metric}: {z:.4f})"
    print(line)


PLACEMENT = ("device", "device_map")  # where a launch runs: set on the run, never compared with a resumed run's


@app.command("train", epilog=PROGRESS_FIELDS)
@_with_options(*setting_options(), _option("resume", str, None, "--resume",
                                           "Continue the run in this directory (to --steps in all)."))
def train_cmd(**flags) -> None:
    """Fine-tune with MeZO toward a metric (or cross-entropy); writes a run directory."""
    from zoobj.run.config import resume_config
    from zoobj.run.train import run

    resume, save_model = flags.pop("resume"), flags.pop("save_model")
    placement = {k: v for k in PLACEMENT if (v := flags.pop(k)) is not None}
    given = {k: v for k, v in flags.items() if v is not None}  # a flag left out stays the run's (or the default)
    if resume:
        cfg = resume_config(resume, {**given, "save_model": save_model})
    else:
        if "task" not in given:
            raise ZoobjError("--task is required (see zoobj list for the tasks)")
        # resolved now, so that an interrupted run can name its directory (the default one too)
        cfg = TrainConfig(**given, save_model=save_model).resolved()
    for key, value in placement.items():
        setattr(cfg, key, value)
    from zoobj.run import distributed

    world = distributed.from_env()
    main = world is None or world.is_main
    progress = _Progress()
    try:
        result = run(cfg, resume=bool(resume), reporter=progress, world=world)
        distributed.close(world, together=True)
    except KeyboardInterrupt:
        progress.stop()
        if main:
            done = _steps_on_disk(cfg.output)
            launcher = "torchrun ... -m zoobj train" if world else "zoobj train"
            print(f"zoobj: interrupted after {done} complete steps; weights were restored and the records are on disk. "
                  f"Resume with: {launcher} --resume {cfg.output}", file=sys.stderr)
        sys.exit(130)
    except ZoobjError as exc:
        progress.stop()
        if world is None:
            raise
        # torchrun stops every worker once one exits: each rank prints its line first, then they leave together
        print(f"zoobj: error: {exc}", file=sys.stderr, flush=True)
        distributed.settle(world)
        sys.exit(2)
    except BaseException:
        progress.stop()
        raise
    finally:
        distributed.close(world)
    if main:
        _summary(result, cfg.metric or result["metric"], cfg)


def _steps_on_disk(run_dir) -> int:
    from pathlib import Path

    path = Path(run_dir) / "trajectory.jsonl"
    return sum(1 for line in path.read_text().splitlines() if line.strip()) if path.exists() else 0


@app.command("export")
def export_cmd(
    run_dir: str = typer.Argument(..., help="A run directory written by zoobj train."),
    output: str = typer.Option(..., "--output", help="Folder to write the model and tokenizer into."),
) -> None:
    """Rebuild a run's weights from base model + trajectory and save them (safetensors)."""
    from zoobj.model.params import PARAM_SETS
    from zoobj.run.config import load_run_config
    from zoobj.run.export import export

    path = export(run_dir, output)
    if PARAM_SETS[load_run_config(run_dir).peft].plain:
        typer.echo(f"saved {path} (loads with from_pretrained and zoobj eval --model {path}; how to prompt it: "
                   f"{path / 'README.md'})")
    else:
        typer.echo(f"saved {path}: a peft adapter, not a plain transformers model (load it with "
                   f"peft.AutoPeftModelForCausalLM or zoobj eval --model {path}; see {path / 'README.md'})")


@app.command("compare")
@_with_options(*setting_options(
    ("task", *compare.SETTINGS, "output"), required=("task",),
    shown={**compare.DEFAULTS, "output": "runs/compare-<task>-<metric>-<time>"},
    help={"keep": "last or best (each arm keeps its best dev step; needs --eval-every).",
          "output": "Folder for report.md, compare.png and the two runs."}),
    _option("ce_lr", float, None, "--ce-lr", "Learning rate of the cross-entropy arm.", shown="--lr"))
def compare_cmd(**flags) -> None:
    """Zero-shot vs MeZO cross-entropy vs MeZO on the metric: same seed, same budget."""
    report = compare.compare(**flags, reporter_factory=_Progress)
    typer.echo(report.read_text())
    typer.echo(f"written: {report} and {report.parent / 'compare.png'}")


@app.command("list")
def list_cmd() -> None:
    """Tasks, metrics and model aliases."""
    from rich.console import Console
    from rich.table import Table

    from zoobj.metrics import list_metrics
    from zoobj.model.loading import ALIASES
    from zoobj.tasks import TASKS

    table = Table(title="zoobj")
    table.add_column("kind")
    table.add_column("name")
    table.add_column("about")
    for name, t in TASKS.items():
        table.add_row("task", name, f"{t.kind}, default metric {t.metric}, evaluates on {t.eval_split}")
    for name in list_metrics():
        table.add_row("metric", name, "")
    for name, a in ALIASES.items():
        table.add_row("model", name, a.description)
    Console().print(table)
    typer.echo("Also: --task path/to/task.toml or package.module:object; --metric module:function or file.py:function "
               "or evaluate:NAME; --model a local directory, a .gguf file or a Hub id.")


def main() -> None:
    import signal

    debug = "--debug" in sys.argv
    if debug:
        sys.argv.remove("--debug")

    def _term(signum, frame):  # a cluster preemption is handled like Ctrl-C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _term)
    import warnings

    shown = warnings.showwarning
    warnings.showwarning = _one_line_warning(shown)
    try:
        app(standalone_mode=False)
    except ZoobjError as exc:
        if debug:
            raise
        print(f"zoobj: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("zoobj: interrupted", file=sys.stderr)
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as exc:
        if _is_a(exc, "ClickException"):  # a usage error (typer may bring its own copy of click): one line, exit 2
            ctx = getattr(exc, "ctx", None)
            where = ctx.command_path if ctx is not None else "zoobj"
            print(f"zoobj: error: {exc.format_message()} ({where} --help lists what it takes)", file=sys.stderr)
            sys.exit(2)
        if _is_a(exc, "Abort"):
            print("zoobj: aborted", file=sys.stderr)
            sys.exit(130)
        if debug:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"zoobj: internal error: {type(exc).__name__}: {first} (run again with --debug for the traceback)",
              file=sys.stderr)
        sys.exit(1)
    finally:
        warnings.showwarning = shown


def _is_a(exc: BaseException, name: str) -> bool:
    """Whether ``exc`` is click's exception ``name``, from click or from typer's copy of it."""
    return any(c.__name__ == name and c.__module__.split(".")[0] in ("click", "typer") for c in type(exc).__mro__)


def _one_line_warning(default):
    """zoobj's own warnings as one line, ``zoobj: warning: ...``; anyone else's as Python shows them."""
    from pathlib import Path

    package = Path(zoobj.__file__).resolve().parent

    def show(message, category, filename, lineno, file=None, line=None):
        if not Path(filename).resolve().is_relative_to(package):
            return default(message, category, filename, lineno, file, line)
        text = " ".join(str(message).split()).removeprefix("zoobj: ")
        print(f"zoobj: warning: {text}", file=file or sys.stderr)

    return show


if __name__ == "__main__":
    main()

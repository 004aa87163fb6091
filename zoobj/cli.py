"""The ``zoobj`` command line: parses flags and calls library code, nothing more."""

from __future__ import annotations

import json
import sys

import typer

import zoobj
from zoobj.errors import ZoobjError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Fine-tune language models toward any metric with forward passes only (MeZO).",
)


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
    task: str = typer.Option(None, "--task", help="Task name, task .toml file, or package.module:object [default: the run's]."),
    metric: str = typer.Option(None, "--metric", help="Metric name(s), comma-separated, or module:function (default: the task's)."),
    run: str = typer.Option(None, "--run", help="Evaluate the trained model of this run directory (base model + trajectory)."),
    model: str = typer.Option("gemma-3-270m", "--model", help="Model alias, local directory, .gguf file or Hub id."),
    split: str = typer.Option(None, "--split", help="Split to evaluate (default: the task's evaluation split)."),
    limit: int = typer.Option(None, "--limit", help="Evaluate the first N examples only."),
    data: str = typer.Option(None, "--data", help="'hub' or a folder of <split>.jsonl files (default: shipped data)."),
    batch_size: int = typer.Option(16, "--batch-size"),
    dtype: str = typer.Option("float32", "--dtype", help="float32, bf16 or fp16."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
) -> None:
    """Zero-shot (or any saved model's) metric on a split, with a 95% bootstrap interval."""
    from zoobj.models import load_model
    from zoobj.objective import evaluate
    from zoobj.tasks import get_task

    run_cfg = None
    if run:
        from zoobj.train import load_run_config

        run_cfg = load_run_config(run)
        task = task or run_cfg.task
    if task is None:
        raise ZoobjError("--task is required (or --run DIR)")
    t = get_task(task)
    names = [x.strip() for x in (metric or (run_cfg.metric if run_cfg else None) or t.metric).split(",") if x.strip()]
    from zoobj.metrics import get_metric

    fns = {name: get_metric(name) for name in names}  # fail on a bad name before loading the model
    if run_cfg:
        from zoobj.train import rebuild

        _, session = rebuild(run)
        m, tok, model = session.model, session.tok, f"{run_cfg.model} + {run}"
    else:
        m, tok = load_model(model, dtype=dtype)
    from zoobj.objective import predict

    rows = t.load(split or t.eval_split, data)
    rows = rows[:limit] if limit else rows
    preds = predict(m, tok, t, rows, batch_size=batch_size)  # once, however many metrics
    results = []
    for name, fn in fns.items():
        r = evaluate(m, tok, t, fn, split=split, rows=rows, predictions=preds)
        r.pop("predictions")
        r.update(metric=name, model=model)
        results.append(r)
    if as_json:
        for r in results:
            typer.echo(json.dumps(r))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{t.name} · {results[0]['split']} · {model}")
    for col in ("metric", "n", "value", "95% CI"):
        table.add_column(col)
    for r in results:
        low, high = r["ci95"]
        table.add_row(r["metric"], str(r["n"]), f"{r['value']:.4f}", f"[{low:.4f}, {high:.4f}]")
    Console().print(table)


def _err_console():
    from rich.console import Console

    return Console(stderr=True, soft_wrap=True)


class _Progress:
    """Rich live bar on stderr: step, loss, projected gradient, tie rate, steps/s, ETA."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.console = _err_console()
        self.bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=self.console,
                            transient=False)
        self.task_id = None
        self.ties = self.seen = 0
        self.t0 = None

    def __call__(self, event: str, info: dict) -> None:
        import time

        if event == "status":
            (self.bar.console if self.task_id is not None else self.console).print(info["message"])
        elif event == "start":
            cfg = info["cfg"]
            self.console.print(f"[bold]zoobj[/] {cfg.task} · objective {cfg.objective}"
                               f"{' (' + cfg.metric + ')' if cfg.objective == 'metric' else ''} · model {cfg.model} · "
                               f"{info['trainable'] / 1e6:.1f}M trainable ({cfg.peft}) · lr {cfg.lr:g} eps {cfg.eps:g} "
                               f"· batch {cfg.batch_size} · run dir {cfg.output}")
            if info.get("note"):
                self.console.print(f"note: {info['note']}")
            if info.get("zero_shot"):
                z = info["zero_shot"]
                self.console.print(f"zero-shot {cfg.metric}: {z['value']:.4f} (n={z['n']})")
            self.bar.start()
            self.task_id = self.bar.add_task("train", total=cfg.steps, completed=info["start_step"], info="")
            self.t0, self.start = time.time(), info["start_step"]
        elif event == "step":
            self.seen += 1
            self.ties += info["ties"] > 0
            rate = self.seen / max(1e-9, time.time() - self.t0)
            self.bar.update(self.task_id, advance=1, info=(
                f"loss {info['loss']:.4f} g {info['grad']:+.3g} ties {self.ties / self.seen:.0%} {rate:.2f} step/s"))
        elif event == "dev":
            from zoobj.trajectory import shown_step

            self.bar.console.print(f"step {shown_step(info)}: dev {info['value']:.4f}")
        elif event == "done":
            self.bar.stop()

    def stop(self) -> None:
        if self.task_id is not None:
            self.bar.stop()


def _summary(result: dict, metric: str) -> None:
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
                  f"{result['steps']} (kept step {kept}: best dev {metric} {result['best_dev']:.4f})")
    table.add_row("tie rate (l+ == l-)", f"{result['tie_rate']:.1%}")
    table.add_row("wall time", f"{result['wall_seconds']:.0f} s")
    table.add_row("peak memory (RSS)", f"{result['peak_rss_mib']} MiB")
    table.add_row("run dir", result["run_dir"])
    Console().print(table)
    line = f"{metric}: {result['value']:.4f} after {result['steps']} steps"
    if z is not None:
        line += f" (zero-shot {metric}: {z:.4f})"
    print(line)


@app.command("train")
def train_cmd(
    task: str = typer.Option(None, "--task", help="Task name, task .toml file, or package.module:object."),
    metric: str = typer.Option(None, "--metric", help="Metric name, module:function or file.py:function (default: the task's)."),
    objective: str = typer.Option(None, "--objective", help="metric (optimise the metric itself) or ce (cross-entropy MeZO)."),
    model: str = typer.Option(None, "--model", help="Model alias, local directory, .gguf file or Hub id [default: gemma-3-270m]."),
    steps: int = typer.Option(None, "--steps", help="Steps in all [default: 20]."),
    batch_size: int = typer.Option(None, "--batch-size", help="Global batch size [default: 8]."),
    lr: float = typer.Option(None, "--lr", help="Learning rate [default: the paper's for the parameter set]."),
    eps: float = typer.Option(None, "--eps", help="Perturbation scale [default: the paper's for the parameter set]."),
    n: int = typer.Option(None, "--n", help="Perturbations per step (n-SPSA) [default: 1]."),
    rule: str = typer.Option(None, "--rule", help="sgd, momentum or adam [default: sgd]."),
    peft: str = typer.Option(None, "--peft", help="none (full parameters) or lora [default: none]."),
    seed: int = typer.Option(None, "--seed", help="Seed of noise and batches [default: 0]."),
    eval_every: int = typer.Option(None, "--eval-every", help="Dev evaluation every N steps, 0 = never [default: 10]."),
    eval_limit: int = typer.Option(None, "--eval-limit", help="Final and zero-shot evaluation on the first N examples [default: 100]."),
    dev_limit: int = typer.Option(None, "--dev-limit", help="Dev evaluations use the first N dev examples [default: 32]."),
    keep: str = typer.Option(None, "--keep", help="last (the weights after the last step) or best (the step with the "
                             "best dev metric; needs --eval-every) [default: last]."),
    train_max_new_tokens: int = typer.Option(None, "--train-max-new-tokens", help="Generation length during training (evaluation keeps the task's)."),
    smooth: float = typer.Option(None, "--smooth", help="Classification: optimise the metric's expectation under "
                                 "softmax(candidate scores / T) instead of the hard metric (fewer l+ == l- ties) [default: 0, off]."),
    train_embeddings: bool = typer.Option(None, "--train-embeddings/--freeze-embeddings", help="Perturb the token embeddings too [default: frozen]."),
    data: str = typer.Option(None, "--data", help="'hub' or a folder of <split>.jsonl files [default: shipped data]."),
    dtype: str = typer.Option(None, "--dtype", help="float32, bf16 or fp16 [default: float32]."),
    perturb: str = typer.Option(None, "--perturb", help="inplace (the paper's) or forward (exact in any dtype) "
                                "[default: inplace for float32, forward for bf16/fp16]."),
    parallel: str = typer.Option(None, "--parallel", help="Under torchrun: data (shard the batch) or query "
                                 "(one perturbation per process) [default: data]."),
    device: str = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... [default: cuda if present]."),
    device_map: str = typer.Option(None, "--device-map", help="auto: spread the layers over the visible devices "
                                   "(Accelerate), for a model larger than one device."),
    output: str = typer.Option(None, "--output", help="Run directory [default: runs/<task>-<metric>-<time>]."),
    resume: str = typer.Option(None, "--resume", help="Continue the run in this directory (to --steps in all)."),
    save_model: bool = typer.Option(False, "--save-model", help="Also write the weights into <run dir>/model."),
) -> None:
    """Fine-tune with MeZO toward a metric (or cross-entropy); writes a run directory."""
    from zoobj.train import TrainConfig, resume_config, run

    given = {k: v for k, v in dict(
        task=task, metric=metric, objective=objective, model=model, steps=steps, batch_size=batch_size, lr=lr,
        eps=eps, n=n, rule=rule, peft=peft, seed=seed, eval_every=eval_every, eval_limit=eval_limit,
        dev_limit=dev_limit, keep=keep, train_max_new_tokens=train_max_new_tokens, smooth=smooth, train_embeddings=train_embeddings, data=data,
        dtype=dtype, perturb=perturb, parallel=parallel, output=output).items() if v is not None}
    placement = {k: v for k, v in dict(device=device, device_map=device_map).items() if v is not None}
    if resume:
        cfg = resume_config(resume, {**given, "save_model": save_model})
    else:
        if task is None:
            raise ZoobjError("--task is required (see zoobj list for the tasks)")
        cfg = TrainConfig(**given, save_model=save_model)
    for key, value in placement.items():
        setattr(cfg, key, value)
    from zoobj import distributed

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
    except BaseException:
        progress.stop()
        raise
    finally:
        distributed.close(world)
    if main:
        _summary(result, cfg.metric or result["metric"])


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
    from zoobj.train import export

    path = export(run_dir, output)
    typer.echo(f"saved {path} (loads with from_pretrained and zoobj eval --model {path})")


@app.command("compare")
def compare_cmd(
    task: str = typer.Option(..., "--task"),
    metric: str = typer.Option(None, "--metric"),
    model: str = typer.Option("gemma-3-270m", "--model"),
    steps: int = typer.Option(20, "--steps"),
    batch_size: int = typer.Option(8, "--batch-size"),
    lr: float = typer.Option(None, "--lr"),
    ce_lr: float = typer.Option(None, "--ce-lr", help="Learning rate of the cross-entropy arm [default: --lr]."),
    eps: float = typer.Option(None, "--eps"),
    n: int = typer.Option(1, "--n"),
    peft: str = typer.Option("none", "--peft"),
    seed: int = typer.Option(0, "--seed"),
    eval_limit: int = typer.Option(100, "--eval-limit"),
    eval_every: int = typer.Option(0, "--eval-every"),
    dev_limit: int = typer.Option(32, "--dev-limit"),
    keep: str = typer.Option("last", "--keep", help="last or best (each arm keeps its best dev step; needs --eval-every)."),
    train_max_new_tokens: int = typer.Option(None, "--train-max-new-tokens"),
    output: str = typer.Option(None, "--output", help="Folder for report.md, compare.png and the two runs."),
) -> None:
    """Zero-shot vs MeZO cross-entropy vs MeZO on the metric: same seed, same budget."""
    from zoobj.compare import compare

    report = compare(task=task, metric=metric, model=model, steps=steps, batch_size=batch_size, lr=lr, ce_lr=ce_lr,
                     eps=eps, n=n, peft=peft, seed=seed, eval_limit=eval_limit, eval_every=eval_every,
                     dev_limit=dev_limit, keep=keep, train_max_new_tokens=train_max_new_tokens, output=output, reporter_factory=_Progress)
    typer.echo(report.read_text())
    typer.echo(f"written: {report} and {report.parent / 'compare.png'}")


@app.command("list")
def list_cmd() -> None:
    """Tasks, metrics and model aliases."""
    from rich.console import Console
    from rich.table import Table

    from zoobj.metrics import list_metrics
    from zoobj.models import ALIASES
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
        import click

        if isinstance(exc, click.exceptions.ClickException):  # usage errors: exit 2
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Abort):
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

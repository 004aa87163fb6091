"""The command line on a tiny model saved to a temp folder."""

import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import zoobj
from tests.tiny import tiny_gemma, tiny_tokenizer
from zoobj.cli import main


def cli(*args):
    """Run the CLI in-process; returns the exit code."""
    old = sys.argv
    sys.argv = ["zoobj", *map(str, args)]
    try:
        main()
        return 0
    except SystemExit as exc:
        return exc.code
    finally:
        sys.argv = old


def zoobj_subprocess(*args):
    env = {**os.environ, "COLUMNS": "60", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "zoobj", *map(str, args)], capture_output=True, text=True, env=env)


def test_console_entry_prints_version():
    out = zoobj_subprocess("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"zoobj {zoobj.__version__}"


COMMON = ["--task", "sst2", "--batch-size", "4", "--eval-limit", "8", "--eval-every", "3", "--lr", "1e-3", "--eps", "1e-2"]


def test_train_writes_the_five_files_and_export_round_trips(model_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    # --keep last: the export below must hold trained weights (the model as given may win dev here)
    assert cli("train", *COMMON, "--model", model_dir, "--steps", "4", "--keep", "last", "--output", run_dir) == 0
    names = sorted(p.name for p in run_dir.iterdir())
    assert names == ["config.json", "curve.png", "eval.json", "log.jsonl", "predictions.jsonl", "trajectory.jsonl"]
    lines = (run_dir / "trajectory.jsonl").read_text().splitlines()
    assert len(lines) == 4 and [json.loads(x)["step"] for x in lines] == [0, 1, 2, 3]
    config = json.loads((run_dir / "config.json").read_text())
    assert config["model"] == model_dir and len(config["base_weights_sha256"]) == 64 and config["lr"] == 1e-3
    final = json.loads((run_dir / "eval.json").read_text())
    preds = [json.loads(x) for x in (run_dir / "predictions.jsonl").read_text().splitlines()]
    from zoobj.tasks import get_task

    sst2 = get_task("sst2")
    golds = [sst2.reference(r) for r in sst2.load("validation")[:8]]
    assert [p["index"] for p in preds] == list(range(8))
    assert sum(p["prediction"] == g for p, g in zip(preds, golds)) / 8 == final["value"]
    out = capsys.readouterr().out
    assert any("zero-shot accuracy" in line and f"{final['zero_shot']:.4f}" in line for line in out.splitlines())

    exported = tmp_path / "exported"
    assert cli("export", run_dir, "--output", exported) == 0
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    trained = AutoModelForCausalLM.from_pretrained(exported)
    assert any(not torch.equal(a, b) for a, b in zip(base.parameters(), trained.parameters()))
    capsys.readouterr()
    assert cli("eval", "--task", "sst2", "--model", exported, "--limit", "8", "--json") == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["value"] == final["value"] and result["n"] == 8
    assert cli("eval", "--run", run_dir, "--limit", "8", "--json") == 0  # base model + trajectory, in memory
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["value"] == final["value"]
    assert set(result) >= {"task", "metric", "split", "n", "value", "ci95"}


def test_resume_continues_exactly(model_dir, tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert cli("train", *COMMON, "--model", model_dir, "--steps", "6", "--output", whole) == 0
    assert cli("train", *COMMON, "--model", model_dir, "--steps", "3", "--output", split) == 0
    assert cli("train", "--resume", split, "--steps", "6") == 0
    a = (whole / "trajectory.jsonl").read_text().splitlines()
    b = (split / "trajectory.jsonl").read_text().splitlines()
    assert len(a) == 6 and a == b


def test_resume_refuses_a_contradicting_flag(model_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert cli("train", *COMMON, "--model", model_dir, "--steps", "1", "--output", run_dir) == 0
    assert cli("train", "--resume", run_dir, "--steps", "2", "--lr", "0.5") == 2
    assert "contradicts" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, needle, choices",
    [
        (["--task", "nope"], "unknown task 'nope'", "sst2"),
        (["--task", "sst2", "--metric", "nope"], "unknown metric 'nope'", "accuracy"),
        (["--task", "sst2", "--model", "/no/such/dir"], "/no/such/dir", "gemma-3-270m"),
    ],
)
def test_bad_names_exit_2_with_one_line(args, needle, choices):
    out = zoobj_subprocess("train", *args, "--steps", "1")
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert needle in lines[0] and choices in lines[0] and "Traceback" not in out.stderr
    assert len(lines[0]) > 60  # not hard-wrapped at the terminal width


def test_list_shows_tasks_metrics_and_models(capsys):
    assert cli("list") == 0
    out = capsys.readouterr().out
    for name in ("squad", "sst2", "copa", "f1", "accuracy", "gemma-3-270m"):
        assert name in out


REWARD = """
import os
import re
CALLS = [0]

def acc(predictions, references):
    if len(predictions) == 4:  # training batches only (evaluations use 8 or 32 rows)
        CALLS[0] += 1
        if CALLS[0] == int(os.environ.get("ZOOBJ_TEST_STOP_AT", "0")):
            raise KeyboardInterrupt
    return sum(p == r for p, r in zip(predictions, references)) / len(predictions)
"""


def test_ctrl_c_mid_step_keeps_complete_records_and_resume_matches(model_dir, tmp_path, monkeypatch, capsys):
    reward = tmp_path / "reward.py"
    reward.write_text(REWARD)
    args = [*COMMON, "--model", model_dir, "--metric", f"{reward}:acc", "--eval-every", "0"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert cli("train", *args, "--steps", "5", "--output", whole) == 0
    monkeypatch.setenv("ZOOBJ_TEST_STOP_AT", "6")  # the second closure call of step 2
    assert cli("train", *args, "--steps", "5", "--output", cut) == 130
    err = capsys.readouterr().err
    assert f"Resume with: zoobj train --resume {cut}" in err and "after 2 complete steps" in err
    assert len((cut / "trajectory.jsonl").read_text().splitlines()) == 2
    monkeypatch.delenv("ZOOBJ_TEST_STOP_AT")
    assert cli("train", "--resume", cut, "--steps", "5") == 0
    assert (cut / "trajectory.jsonl").read_text() == (whole / "trajectory.jsonl").read_text()
    assert json.loads((cut / "eval.json").read_text())["value"] == json.loads((whole / "eval.json").read_text())["value"]


def test_resume_and_export_refuse_a_different_base_model(tmp_path, capsys):
    model_path = tmp_path / "model"
    tok = tiny_tokenizer()
    tiny_gemma(len(tok), seed=0).save_pretrained(model_path)
    tok.save_pretrained(model_path)
    run_dir = tmp_path / "run"
    assert cli("train", *COMMON, "--model", model_path, "--steps", "1", "--output", run_dir) == 0
    tiny_gemma(len(tok), seed=1).save_pretrained(model_path)  # the base model changed underneath
    capsys.readouterr()
    assert cli("train", "--resume", run_dir, "--steps", "2") == 2
    assert "differ" in capsys.readouterr().err
    assert cli("export", run_dir, "--output", tmp_path / "out") == 2
    assert "not the one" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert len((run_dir / "trajectory.jsonl").read_text().splitlines()) == 1


def test_keep_best_evaluates_saves_and_exports_the_best_dev_step(model_dir, tmp_path, capsys):
    run_dir = tmp_path / "best"
    args = ["--task", "sst2", "--batch-size", "4", "--eval-limit", "8", "--eval-every", "1", "--dev-limit", "8",
            "--lr", "5e-2", "--eps", "1e-2", "--model", model_dir, "--no-dev-at-start", "--keep", "best"]
    # (the model as given ties this run's best dev step; the test after this one keeps it)
    assert cli("train", *args, "--steps", "6", "--output", run_dir, "--save-model") == 0
    dev = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]
    dev = [r for r in dev if r.get("event") == "dev"]
    final = json.loads((run_dir / "eval.json").read_text())
    top = max(dev, key=lambda r: (r["value"], -r["step"]))  # the first of the best
    assert final["kept_steps"] == top["step"] + 1 and final["best_dev"] == top["value"] and final["steps"] == 6
    assert final["kept_steps"] < 6  # this seed's dev curve peaks early: the kept weights are not the last ones
    assert [r["step"] for r in dev] == [0, 1, 2, 3, 4, 5]  # after each step
    assert all(r["seconds"] > 0 for r in dev) and 0 < final["eval_seconds"] <= final["wall_seconds"]
    assert f"kept step {final['kept_steps']}" in capsys.readouterr().out

    from transformers import AutoModelForCausalLM

    from zoobj.engine import trajectory as tj
    from zoobj.run.config import load_run_config
    from zoobj.run.session import prepare

    records = tj.read_trajectory(run_dir / "trajectory.jsonl")
    at = {}
    for k in (final["kept_steps"], 6):
        session = prepare(load_run_config(run_dir))
        session.optimizer.replay(records[:k])
        at[k] = [p.detach().clone() for p in session.model.parameters()]
    saved = list(AutoModelForCausalLM.from_pretrained(run_dir / "model").parameters())
    assert all(torch.equal(a, b) for a, b in zip(saved, at[final["kept_steps"]]))
    assert any(not torch.equal(a, b) for a, b in zip(saved, at[6]))
    assert cli("export", run_dir, "--output", tmp_path / "exported") == 0
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "exported").parameters()
    assert all(torch.equal(a, b) for a, b in zip(exported, saved))
    capsys.readouterr()
    assert cli("eval", "--run", run_dir, "--limit", "8", "--json") == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["value"] == final["value"]

    # stopped after 3 steps and resumed: the same best step, the same result
    split = tmp_path / "split"
    assert cli("train", *args, "--steps", "3", "--output", split) == 0
    assert cli("train", "--resume", split, "--steps", "6") == 0
    again = json.loads((split / "eval.json").read_text())
    assert (again["kept_steps"], again["best_dev"], again["value"]) == (final["kept_steps"], final["best_dev"], final["value"])

    # trained keeping the last step, then re-finalised with --keep best: nothing retrained, the same result
    later = tmp_path / "later"
    assert cli("train", *args[:-2], "--keep", "last", "--steps", "6", "--output", later) == 0
    assert json.loads((later / "eval.json").read_text())["kept_steps"] == 6
    assert cli("train", "--resume", later, "--steps", "6", "--keep", "best") == 0
    third = json.loads((later / "eval.json").read_text())
    assert (third["kept_steps"], third["value"]) == (final["kept_steps"], final["value"])
    assert json.loads((later / "config.json").read_text())["keep"] == "best"
    assert (later / "trajectory.jsonl").read_text() == (run_dir / "trajectory.jsonl").read_text()


def test_a_run_whose_steps_never_beat_the_model_as_given_returns_that_model(model_dir, tmp_path, capsys, monkeypatch):
    """By default (dev evaluations on) the model as given is evaluated on dev before the
    first step and kept unless a step beats it: here every dev evaluation after a step
    reads lower, so the run keeps none of its steps -- the final evaluation, eval --run
    and export all give the base model -- and the summary says so in words."""
    import zoobj.run.train as train_module
    from zoobj.model.loading import load_model

    real = train_module._evaluate
    dev_values = iter([0.6, 0.5, 0.55, 0.4])  # before the first step, then after steps 2, 4, 6

    def evaluate(session, task, metric, rows, world, keep_predictions=False, **kw):
        got = real(session, task, metric, rows, world, keep_predictions=keep_predictions, **kw)
        if kw.get("n_resamples") == 200:  # a dev evaluation
            got["value"] = next(dev_values)
        return got

    monkeypatch.setattr(train_module, "_evaluate", evaluate)
    run_dir = tmp_path / "run"
    assert cli("train", "--task", "sst2", "--steps", "6", "--batch-size", "4", "--eval-every", "2", "--dev-limit", "8",
               "--eval-limit", "8", "--lr", "5e-2", "--eps", "1e-2", "--model", model_dir, "--output", run_dir) == 0
    out = capsys.readouterr().out
    final = json.loads((run_dir / "eval.json").read_text())
    assert (final["kept_steps"], final["best_dev"], final["steps"]) == (0, 0.6, 6)
    assert "kept none: the model as given" in out and "no step beat the model you gave on dev" in out
    assert json.loads((run_dir / "config.json").read_text())["keep"] == "best"  # the default, with dev evaluations
    base, tok = load_model(model_dir)
    from zoobj.run.objective import evaluate as plain_evaluate
    from zoobj.tasks import get_task

    task = get_task("sst2")
    want = plain_evaluate(base, tok, task, limit=8)
    assert final["value"] == want["value"]
    assert [json.loads(x)["prediction"] for x in (run_dir / "predictions.jsonl").read_text().splitlines()] == \
        want["predictions"]
    assert cli("export", run_dir, "--output", tmp_path / "exported") == 0
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "exported")
    assert all(torch.equal(a, b) for a, b in zip(exported.parameters(), base.parameters()))
    assert "0 of 6 steps kept" in (tmp_path / "exported" / "README.md").read_text()


def test_a_run_shorter_than_its_dev_interval_still_weighs_its_last_step(model_dir, tmp_path):
    """3 steps, dev every 10 (the default): dev before the first step and after the last,
    so --keep best chooses between the model as given and where the run ended."""
    run_dir = tmp_path / "short"
    assert cli("train", "--task", "sst2", "--steps", "3", "--batch-size", "4", "--eval-limit", "4", "--dev-limit", "8",
               "--lr", "5e-2", "--eps", "1e-2", "--model", model_dir, "--output", run_dir) == 0
    dev = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in dev if r.get("event") == "dev"] == [-1, 2]


def test_by_default_a_run_keeps_its_best_dev_step_chosen_on_enough_rows():
    from zoobj.run.config import DEV_LIMITS, TrainConfig

    c = TrainConfig(task="sst2").resolved()
    assert (c.keep, c.dev_limit, c.dev_at_start) == ("best", DEV_LIMITS["classification"], True)
    assert TrainConfig(task="squad").resolved().dev_limit == DEV_LIMITS["generation"]
    assert TrainConfig(task="sst2", eval_every=0).resolved().keep == "last"  # nothing to choose by
    assert TrainConfig(task="sst2", keep="last", dev_limit=8).resolved().keep == "last"  # a flag wins


def test_keep_best_needs_dev_evaluations(model_dir, tmp_path, capsys):
    assert cli("train", *COMMON[:6], "--eval-every", "0", "--model", model_dir, "--keep", "best",
               "--output", tmp_path / "r") == 2
    err = capsys.readouterr().err
    assert "--keep best" in err and "--eval-every" in err and not (tmp_path / "r").exists()
    assert cli("train", *COMMON, "--model", model_dir, "--keep", "first", "--output", tmp_path / "r") == 2
    assert "unknown --keep 'first'" in capsys.readouterr().err


def _help(*command):
    from typer.testing import CliRunner

    from tests.test_golden import help_options
    from zoobj.cli import app

    result = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"})
    assert result.exit_code == 0, result.output
    return help_options(result.output.replace(" *  --", "    --"))  # a required option's mark


def test_help_shows_the_defaults_and_choices_of_train_config():
    from zoobj.engine.mezo import PERTURB, RULES
    from zoobj.run.config import KEEP, PARALLEL, PEFT, TrainConfig, cli_fields
    from zoobj.run.objective import OBJECTIVES

    shown = _help("train")
    from zoobj.run.config import DEFAULTS

    assert "[default: 20, or the task's recipe]" in shown["--steps"] and DEFAULTS["steps"] == 20
    for f in cli_fields():  # every setting with a value of its own shows that value
        flag = f.metadata.get("flag", "--" + f.name.replace("_", "-")).split("/")[0]
        assert flag in shown, flag
        if f.default not in (None, dataclasses.MISSING) and not isinstance(f.default, bool):
            assert f"[default: {f.default}]" in shown[flag], (flag, shown[flag])
    assert "[default: freeze-embeddings]" in shown["--train-embeddings"]
    assert ("[default: the paper's for the parameter set: 1e-06 (none), 0.0001 (lora), 0.01 (prefix); "
            "zoobj's 0.2 (template)]") in shown["--lr"]
    for flag, choices in {"--peft": PEFT, "--rule": RULES, "--keep": KEEP, "--parallel": PARALLEL,
                          "--objective": OBJECTIVES, "--perturb": PERTURB}.items():
        assert all(re.search(rf"\b{c}\b", shown[flag]) for c in choices), (flag, choices, shown[flag])
    compared = _help("compare")  # the same settings and defaults: each arm is the run zoobj train makes
    assert "[default: 20, or the task's recipe]" in compared["--steps"] and "[default: 10]" in compared["--eval-every"]
    assert "[default: --lr]" in compared["--ce-lr"] and "[required]" in compared["--task"]


def test_a_default_changed_in_train_config_is_the_one_help_shows(monkeypatch):
    import typer
    from typer.testing import CliRunner

    from zoobj.cli import _with_options, setting_options
    from zoobj.run.config import TrainConfig

    monkeypatch.setattr(TrainConfig.__dataclass_fields__["eval_every"], "default", 50)
    app = typer.Typer()

    @app.command()
    @_with_options(*setting_options(("eval_every", "eval_limit")))
    def command(**flags):
        typer.echo(json.dumps(flags))

    out = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}).output
    assert "[default: 50]" in out and "[default: 100]" in out
    given = CliRunner().invoke(app, ["--eval-every", "3"])
    assert json.loads(given.output) == {"eval_every": 3, "eval_limit": None}  # a flag left out stays None (resume)


def test_compare_gives_both_arms_the_shared_settings_and_its_own_defaults(tmp_path, monkeypatch, capsys):
    from zoobj.model import loading as models
    from zoobj.run import compare
    from zoobj.run import objective
    from zoobj.run.config import TrainConfig

    arms = []

    def fake_run(cfg, reporter=None):
        arms.append(cfg)
        return {"value": 0.6, "ci95": [0.5, 0.7], "steps": cfg.steps, "tie_rate": 0.1, "wall_seconds": 1.0}

    monkeypatch.setattr(models, "load_model", lambda name: (name, None))
    monkeypatch.setattr(objective, "evaluate", lambda *a, **k: {"value": 0.5, "ci95": [0.4, 0.6], "n": 8,
                                                                "split": "validation"})
    monkeypatch.setattr(compare, "run", fake_run)
    monkeypatch.setattr(compare, "_plot", lambda *a: None)
    assert cli("compare", "--task", "sst2", "--steps", "3", "--lr", "1e-3", "--ce-lr", "1e-2", "--output", tmp_path) == 0
    shared = dict(task="sst2", metric="accuracy", steps=3, zero_shot=False)
    # both arms get the settings resolved once (the task's recipe and the defaults filled in)
    assert arms == [TrainConfig(objective="ce", lr=1e-2, output=str(tmp_path / "ce"), **shared).resolved(),
                    TrainConfig(objective="metric", lr=1e-3, output=str(tmp_path / "metric"), **shared).resolved()]
    report = (tmp_path / "report.md").read_text()
    assert "3 steps, batch 8, seed 0, parameters: none" in report
    assert "| zero-shot, calibrated |" in report  # the cheapest fix, beside the trained arms
    # every pair said in words: the fakes' arms (0.6 [0.5, 0.7]) against zero-shot (0.5 [0.4, 0.6]) overlap
    assert "- MeZO (accuracy) is 10.0 points above zero-shot: within the intervals" in report
    assert "- MeZO (accuracy) is level with MeZO (cross-entropy): within the intervals" in report


@pytest.mark.default_recipe
def test_compare_arms_share_the_default_recipe_but_its_smoothing(tmp_path, monkeypatch):
    """Under the default recipe both arms train the same tail with the same population, lr
    and eps (z-scored losses: unit-free); smoothing is the metric's, so the CE arm has none."""
    from zoobj.model import loading as models
    from zoobj.run import compare, objective

    arms = []
    monkeypatch.setattr(models, "load_model", lambda name: (name, None))
    monkeypatch.setattr(objective, "evaluate", lambda *a, **k: {"value": 0.5, "ci95": [0.4, 0.6], "n": 8,
                                                                "split": "validation"})
    monkeypatch.setattr(compare, "run", lambda cfg, reporter=None: arms.append(cfg) or {
        "value": 0.6, "ci95": [0.5, 0.7], "steps": cfg.steps, "wall_seconds": 1.0})
    monkeypatch.setattr(compare, "_plot", lambda *a: None)
    assert cli("compare", "--task", "rte", "--output", tmp_path) == 0
    ce, metric = arms
    same = ("peft", "n", "shaping", "lr", "eps", "scale", "steps", "batch_size", "seed", "eval_every", "keep", "recipe")
    assert [getattr(ce, k) for k in same] == [getattr(metric, k) for k in same]
    assert (metric.peft, metric.n, metric.recipe, metric.keep) == ("template", 8, "default classification", "best")
    assert (ce.objective, ce.smooth, metric.objective, metric.smooth) == ("ce", 0.0, "metric", 1.0)
    assert ("population 8 (zscore), lr 0.2, eps 0.2, scale auto for both arms, the metric smoothed (T = 1)"
            ", cross-entropy over the candidates (default classification recipe)") in (tmp_path / "report.md").read_text()


def test_ctrl_c_in_a_run_without_output_names_the_default_run_directory(model_dir, tmp_path, monkeypatch, capsys):
    from zoobj.run import train

    def interrupted(cfg, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "run", interrupted)
    monkeypatch.chdir(tmp_path)
    assert cli("train", "--task", "sst2", "--model", model_dir, "--steps", "2") == 130
    err = capsys.readouterr().err
    assert "Resume with: zoobj train --resume runs/sst2-accuracy-" in err and "internal error" not in err


def test_export_of_a_prefix_run_says_it_is_a_peft_adapter(model_dir, tmp_path, capsys):
    """Prefix tuning has no plain-transformers form: export says so in its one line and in
    the model card, and writes the peft adapter it is."""
    run_dir, exported = tmp_path / "run", tmp_path / "exported"
    assert cli("train", "--task", "sst2", "--model", model_dir, "--peft", "prefix", "--steps", "1",
               "--batch-size", "2", "--eval-limit", "2", "--eval-every", "0", "--output", run_dir) == 0
    capsys.readouterr()
    assert cli("export", run_dir, "--output", exported) == 0
    said = capsys.readouterr().out
    assert "a peft adapter, not a plain transformers model" in said and len(said.strip().splitlines()) == 1
    assert (exported / "adapter_config.json").is_file()
    assert "no plain-transformers form" in (exported / "README.md").read_text()


@pytest.mark.parametrize("args, said", [
    (["train", "--task", "sst2", "--lr", "abc"], "Invalid value for '--lr'"),
    (["train", "--tsak", "sst2"], "No such option: --tsak (Possible options: --scale, --task)"),
    (["trian"], "No such command 'trian'. Did you mean 'train'?"),
    (["export", "RUN"], "Missing option '--output'"),
])
def test_a_usage_mistake_is_one_error_line_and_status_2(args, said, capsys):
    """click's own usage errors (a bad value, a misspelt option or command, a missing
    option) read like every other user mistake: ``zoobj: error: ...``, status 2."""
    assert cli(*args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("zoobj: error: ") and said in err[0] and "--help" in err[0]


@pytest.mark.parametrize("args, said", [
    (["train", "--task", "sst2", "--metric", "f1"], "use accuracy or macro_f1"),
    (["eval", "--task", "sst2", "--metric", "accuracy,em"], "use accuracy or macro_f1"),
    (["train", "--task", "squad", "--metric", "macro_f1"], "use f1, exact_match or accuracy"),
])
def test_a_metric_for_the_other_kind_of_task_is_refused_before_loading(args, said, capsys):
    """--metric f1 on a classification task (was: an internal TypeError) names the metrics
    that fit, before any model is loaded."""
    assert cli(*args, "--model", "/nonexistent/model") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("zoobj: error: --metric ") and said in err[0]


def test_progress_in_a_log_file_is_one_line_per_step_and_the_tie_rates_agree(model_dir, tmp_path, capsys):
    """Output sent to a file (no terminal): one plain line per step with the step, loss,
    tie rate, seconds per step and ETA; the tie rate is one number everywhere -- the last
    progress line, log.jsonl's per-step shares, the curve's definition and the summary."""
    from zoobj.engine import trajectory as tj
    from zoobj.run.plots import rolling_ties_and_grad

    run_dir = tmp_path / "run"
    assert cli("train", "--task", "sst2", "--model", model_dir, "--steps", "4", "--batch-size", "2", "--n", "3",
               "--eval-limit", "2", "--eval-every", "0", "--output", run_dir) == 0
    captured = capsys.readouterr()
    lines = [x for x in captured.err.splitlines() if x.startswith("step ")]
    assert [x.split()[1] for x in lines] == ["1/4", "2/4", "3/4", "4/4"]
    assert all(re.search(r"loss -?[\d.]+ .*tied \d+% .* s/step  ETA \d+:\d\d:\d\d$", x) for x in lines)
    steps = [x for x in tj.read_jsonl(run_dir / tj.LOG) if x.get("event") == "step"]
    assert all(x["directions"] == 3 and x["tie_rate"] == x["ties"] / 3 for x in steps)
    result = json.loads((run_dir / tj.EVAL).read_text())
    assert result["tie_rate"] == sum(x["ties"] for x in steps) / 12
    assert lines[-1].split("tied ")[1].startswith(f"{result['tie_rate']:.0%}")
    rolling, _ = rolling_ties_and_grad(steps, 4)
    assert rolling.tolist() == [result["tie_rate"]]
    assert "tie rate (l+ == l-)" in captured.out and f"run dir: {run_dir}" in captured.out
    assert ("every probe tied" in captured.out) == (result["tie_rate"] >= 1.0)  # the levers, when nothing moved


def test_a_file_path_metric_names_a_flat_run_directory(tmp_path):
    from pathlib import Path

    from zoobj.run.config import TrainConfig

    (tmp_path / "rw.py").write_text("def strict(prediction, reference):\n    return float(prediction == reference)\n")
    out = Path(TrainConfig(task="sst2", metric=f"{tmp_path}/rw.py:strict").resolved().output)
    assert out.parent == Path("runs") and out.name.startswith("sst2-strict-") and ":" not in out.name


def test_a_misspelt_model_alias_is_named_at_once(capsys):
    assert cli("eval", "--task", "sst2", "--model", "gemma3-270m") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"zoobj: error: unknown model 'gemma3-270m'; did you mean gemma-3-270m? (aliases: "
                   "gemma-3-270m, smollm2-135m; a Hub id is owner/name and needs the network)"]


def test_export_never_overwrites_and_writes_what_others_can_read(model_dir, tmp_path, capsys):
    run_dir, exported = tmp_path / "run", tmp_path / "exported"
    assert cli("train", "--task", "sst2", "--model", model_dir, "--steps", "1", "--batch-size", "2",
               "--eval-limit", "2", "--eval-every", "0", "--output", run_dir) == 0
    exported.mkdir()
    (exported / "mine.txt").write_text("keep me")
    capsys.readouterr()
    assert cli("export", run_dir, "--output", exported) == 2
    assert "exists and is not empty" in capsys.readouterr().err and (exported / "mine.txt").read_text() == "keep me"
    fresh = tmp_path / "fresh"
    old = os.umask(0o022)
    try:
        assert cli("export", run_dir, "--output", fresh) == 0
    finally:
        os.umask(old)
    assert fresh.stat().st_mode & 0o777 == 0o755
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in fresh.iterdir() if p.is_file())


@pytest.mark.parametrize("tracker", ["tensorboard", "mlflow", "wandb"])
def test_report_to_sends_the_logs_numbers_to_the_tracker(model_dir, tmp_path, monkeypatch, tracker):
    """--report-to (the Trainer's names): the settings as hyperparameters, the step, dev and
    final numbers, all offline -- TensorBoard event files, an MLflow file store, W&B offline."""
    from zoobj.engine import trajectory as tj

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = tmp_path / "run"
    assert cli("train", "--task", "sst2", "--model", model_dir, "--steps", "3", "--batch-size", "2", "--eval-limit",
               "2", "--eval-every", "2", "--dev-limit", "2", "--report-to", tracker, "--output", run_dir) == 0
    losses = [x["loss"] for x in tj.read_jsonl(run_dir / tj.LOG) if x.get("event") == "step"]
    final = json.loads((run_dir / tj.EVAL).read_text())
    if tracker == "tensorboard":
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(run_dir / "tensorboard"))
        events.Reload()
        assert [e.value for e in events.Scalars("train/loss")] == pytest.approx(losses)
        assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3]
        assert [e.step for e in events.Scalars("dev/accuracy")] == [0, 2, 3]  # as given, after step 2, at the end
        assert events.Scalars("eval/accuracy")[0].value == pytest.approx(final["value"])
    elif tracker == "mlflow":
        import mlflow

        client = mlflow.tracking.MlflowClient((run_dir / "mlruns").resolve().as_uri())
        (run,) = client.search_runs([client.get_experiment_by_name("zoobj").experiment_id])
        history = client.get_metric_history(run.info.run_id, "train/loss")
        assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(losses)
        assert run.data.params["task"] == "sst2" and run.data.params["batch_size"] == "2"
        assert run.data.metrics["eval/accuracy"] == pytest.approx(final["value"])
    else:
        (offline,) = (run_dir / "wandb").glob("offline-run-*")
        (records,) = offline.glob("*.wandb")  # the run's records, kept offline (wandb sync sends them later)
        data = records.read_bytes()
        assert all(key in data for key in (b"train/loss", b"dev/accuracy", b"eval/accuracy", b"sst2", b"batch_size"))


def test_a_tracker_that_is_not_installed_or_unknown_is_one_line(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    assert cli("train", "--task", "sst2", "--report-to", "mlflow") == 2
    assert capsys.readouterr().err.strip() == ("zoobj: error: --report-to mlflow needs the mlflow package: "
                                               "pip install 'zoobj[mlflow]'")
    assert cli("train", "--task", "sst2", "--report-to", "comet") == 2
    assert "unknown --report-to 'comet'; choose from none, tensorboard, mlflow, wandb" in capsys.readouterr().err

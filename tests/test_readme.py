"""The README's examples run as written: its reward file and commands, and its task file,
on a tiny model (the flags that make them short are appended, never changed), by the
``zoobj`` command as a user's installed script runs it (the current folder not on the
import path)."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
# the installed console script: no '' (the current folder) on sys.path, unlike python -m
SCRIPT = ("import sys; sys.path[:] = [p for p in sys.path if p not in ('', '.')]; sys.argv[0] = 'zoobj'; "
          "from zoobj.cli import main; main()")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "ZOOBJ_COMPILE": "0"}
SHORT = ["--steps", "1", "--batch-size", "2", "--eval-limit", "2", "--eval-every", "0", "--train-max-new-tokens", "2"]


def block(after: str, lang: str) -> str:
    """The first ```lang block after the line that starts with ``after``."""
    start = README.index(after)
    m = re.search(rf"```{lang}\n(.*?)```", README[start:], flags=re.S)
    return m.group(1)


def zoobj(args, cwd):
    return subprocess.run([sys.executable, "-c", SCRIPT, *args], capture_output=True, text=True, env=ENV, cwd=cwd,
                          timeout=600)


def test_the_reward_example_runs_as_written(model_dir, tmp_path):
    code = block("## A reward of your own", "python")
    path = code.splitlines()[0].removeprefix("# ").split()[0]
    assert path == "mypkg/rewards.py"
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text("")
    (tmp_path / path).write_text(code)
    commands = [line for line in block("## A reward of your own", "bash").splitlines() if line.startswith("zoobj ")]
    assert len(commands) == 2
    for i, command in enumerate(commands):
        args = shlex.split(command)[1:] + ["--model", model_dir, "--output", f"run{i}", *SHORT]
        out = zoobj(args, tmp_path)
        assert out.returncode == 0, out.stderr[-2000:]
        result = json.loads((tmp_path / f"run{i}" / "eval.json").read_text())
        assert result["steps"] == 1 and 0.0 <= result["value"] <= 1.0


def test_the_task_file_example_runs_as_written(model_dir, tmp_path):
    toml = block("## A task of your own", "toml")
    (tmp_path / "task.toml").write_text(toml)
    rows = [{"text": f"match {i} report" if i % 2 else f"election {i} news", "label": i % 2} for i in range(12)]
    for name in ("train.jsonl", "test.jsonl"):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = zoobj(["train", "--task", "task.toml", "--model", model_dir, "--output", "run", *SHORT[:-2]], tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["task"] == "mytask"


def test_a_module_outside_the_folder_and_the_path_is_one_line_saying_where_to_run(tmp_path):
    out = zoobj(["train", "--task", "sst2", "--metric", "mypkg.rewards:polite"], tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "zoobj: error: metric 'mypkg.rewards:polite': cannot import mypkg.rewards (ModuleNotFoundError: No module "
        "named 'mypkg'); run zoobj in the folder that holds it, install it (pip install -e .), or add its folder to "
        "PYTHONPATH"]


@pytest.mark.parametrize("placed", ["cwd", "nowhere"])
def test_a_package_in_the_current_folder_is_found_without_a_path(tmp_path, monkeypatch, placed):
    from zoobj.errors import ConfigError
    from zoobj.metrics import get_metric

    name = f"herepkg_{placed}"  # a name no earlier import has cached
    if placed == "cwd":
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("")
        (tmp_path / name / "rw.py").write_text("def one(prediction, reference):\n    return 1.0\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    if placed == "cwd":
        assert get_metric(f"{name}.rw:one")(["a"], ["b"]) == 1.0
    else:
        with pytest.raises(ConfigError, match="run zoobj in the folder that holds it"):
            get_metric(f"{name}.rw:one")


def test_the_python_task_example_runs_as_written(model_dir, tmp_path):
    docs = (Path(__file__).resolve().parent.parent / "docs" / "api.md").read_text()
    start = docs.index("## Tasks in Python")
    code = re.search(r"```python\n(.*?)```", docs[start:], flags=re.S).group(1)
    command = re.search(r"```bash\n(zoobj [^\n#]*)", docs[start:]).group(1).strip()
    assert code.startswith("# mytasks.py") and command == "zoobj train --task mytasks:topic"
    (tmp_path / "mytasks.py").write_text(code)
    rows = [{"text": f"match {i} report" if i % 2 else f"election {i} news", "label": i % 2} for i in range(12)]
    for name in ("train.jsonl", "validation.jsonl"):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = zoobj(shlex.split(command)[1:] + ["--model", model_dir, "--output", "run", *SHORT[:-2]], tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["task"] == "topic"


@pytest.mark.parametrize("args", [["--quick"], ["--task", "squad"]])
def test_the_results_commands_run_on_a_slice(model_dir, tmp_path, args):
    """docs/results.md's bench/results.py commands, on a tiny model and a few rows (was:
    --quick stopped with a TypeError at the forward-pass count)."""
    bench = Path(__file__).resolve().parent.parent / "bench" / "results.py"
    out = subprocess.run([sys.executable, str(bench), *args, "--slice", "--model", model_dir, "--out", str(tmp_path)],
                         capture_output=True, text=True, env=ENV, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| zero-shot |" in out.stdout and "| MeZO-metric |" in out.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    task = "sst2" if args == ["--quick"] else "squad"
    assert set(results[task]) == {"zero-shot", "ce", "metric"}
    assert results[task]["metric"]["forward_passes"] == 2 * 8 * 1  # a population of 8, one step
    assert f"{task} metric: 1 steps, 16 training forward passes" in out.stdout
    if task == "sst2":  # the table's settings, not the default recipe's: full parameters, CE over the vocabulary
        configs = {arm: json.loads(next(tmp_path.rglob(f"{arm}/config.json")).read_text()) for arm in ("ce", "metric")}
        assert configs["ce"]["peft"] == configs["metric"]["peft"] == "none"
        assert configs["ce"]["ce_over"] == "vocabulary"

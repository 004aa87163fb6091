"""The default model, as a user gets it: the installed ``zoobj`` command with no --model.

The one test here that loads real weights. The first run on a machine converts the
GGUF file once to a safetensors cache (about a minute); later runs load it in seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ZOOBJ = Path(sys.executable).with_name("zoobj")


def zoobj(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the installed package, as a user runs it
    return subprocess.run([str(ZOOBJ), *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    assert ZOOBJ.exists(), f"no zoobj entry point next to {sys.executable}: install with pip install -e '.[dev]'"
    run_dir = tmp_path_factory.mktemp("default") / "run"
    proc = zoobj("train", "--task", "squad", "--metric", "f1", "--steps", "2", "--batch-size", "2",
                 "--eval-limit", "3", "--eval-every", "0", "--output", str(run_dir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, proc


def test_zoobj_train_with_the_default_model_runs_to_its_summary(trained):
    run_dir, proc = trained
    assert "f1: " in proc.stdout and "after 2 steps" in proc.stdout
    config = json.loads((run_dir / "config.json").read_text())
    assert config["model"] == "gemma-3-270m" and config["peft"] == "template"  # SQuAD's recipe
    assert config["n"] == 8 and config["shaping"] == "zscore"
    assert config["trainable_parameters"] == 3 * 640  # "\nAnswer:" in the real model's width, not a tiny one
    assert len((run_dir / "trajectory.jsonl").read_text().splitlines()) == 2
    result = json.loads((run_dir / "eval.json").read_text())
    assert result["n"] == 3 and 0.0 <= result["value"] <= 1.0 and result["zero_shot"] is not None


def test_zoobj_eval_rebuilds_the_run_and_reproduces_its_number(trained):
    run_dir, _ = trained
    proc = zoobj("eval", "--run", str(run_dir), "--limit", "3", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    want = json.loads((run_dir / "eval.json").read_text())
    assert got["n"] == 3
    assert got["value"] == pytest.approx(want["value"], abs=1e-9)

"""Reliability: what a user sees for bad input, a run killed at a random step, security
checks on the source, and property tests of the metrics and the loaders.

The bad-input rows and the fault test drive ``python -m zoobj`` in subprocesses on a
tiny model saved to a temp folder. The subprocesses run with one thread and the eager
noise kernel (``ZOOBJ_COMPILE=0``): both keep them fast on a small, busy machine, and
every run of a comparison uses the same settings, which bit-identity needs.
"""

from __future__ import annotations

import ast
import inspect
import json
import os
import random
import shutil
import signal
import string
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import zoobj
from tests.tiny import tiny_gemma, tiny_tokenizer

ENV = {**os.environ, "COLUMNS": "60", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "ZOOBJ_COMPILE": "0"}
# the fault-test settings: sst2, full parameters, batch 4, a small evaluation, no dev evaluations
TRAIN = ["--task", "sst2", "--peft", "none", "--batch-size", "4", "--eval-limit", "8", "--eval-every", "0",
         "--lr", "1e-3", "--eps", "1e-2"]
STEPS = 8


def zoobj_run(*args, cwd=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "zoobj", *map(str, args)], capture_output=True, text=True, env=ENV,
                          cwd=cwd, timeout=timeout)


def stderr_lines(out) -> list[str]:
    return [line for line in out.stderr.splitlines() if line.strip()]


def assert_one_error_line(out, code=2, *needles, alone=True) -> str:
    """Exit ``code``; the error is one line (the last; the only one when ``alone``); no traceback."""
    lines = stderr_lines(out)
    assert out.returncode == code, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    if alone:
        assert len(lines) == 1, out.stderr
    prefix = "zoobj: error: " if code == 2 else "zoobj: internal error: "
    assert lines[-1].startswith(prefix) and sum("error:" in line for line in lines) == 1, out.stderr
    for needle in needles:
        assert needle in lines[-1], lines[-1]
    return lines[-1]


def records(path: Path) -> list[dict]:
    text = path.read_text()
    assert text == "" or text.endswith("\n"), "a half-written last line"
    return [json.loads(line) for line in text.splitlines()]


def tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(model_dir) / "model.safetensors"))


def assert_same_tensors(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


@pytest.fixture(scope="module")
def reference(model_dir, tmp_path_factory):
    """An uninterrupted 8-step run with its weights saved (--save-model) and exported."""
    root = tmp_path_factory.mktemp("reference")
    run_dir, exported = root / "run", root / "exported"
    out = zoobj_run("train", *TRAIN, "--model", model_dir, "--steps", STEPS, "--save-model", "--output", run_dir)
    assert out.returncode == 0, out.stderr
    out = zoobj_run("export", run_dir, "--output", exported)
    assert out.returncode == 0, out.stderr
    assert len(records(run_dir / "trajectory.jsonl")) == STEPS
    return run_dir, exported


# ============================================================================ bad input

REWARDS = '''
import math

NOT_A_FUNCTION = 3
CALLS = [0]


def boom(prediction, reference):
    CALLS[0] += 1
    if CALLS[0] == 3:
        raise ValueError("cannot score this")
    return 1.0


def nan(prediction, reference):
    return math.nan


def words(prediction, reference):
    return "great"


def nothing(prompts, completions, **columns):
    return [None] * len(completions)
'''

TOPICS_TOML = '''name = "topics"
data_files = {{ train = "topics_train.jsonl", validation = "topics_val.jsonl" }}
template = "{{text}}\\nTopic:"
choices = [" world", " sports"]
{extra}
'''


def write_jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def shipped_rows(split: str, n: int) -> list[dict]:
    lines = (Path(zoobj.__file__).parent / "data" / "sst2" / f"{split}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines[:n]]


def make_inputs(root: Path) -> None:
    """The broken inputs of the matrix, written into ``root`` (commands run there)."""
    (root / "rewards.py").write_text(REWARDS)
    train, validation = shipped_rows("train", 40), shipped_rows("validation", 10)
    write_jsonl(root / "badjson" / "train.jsonl", train)
    write_jsonl(root / "badjson" / "validation.jsonl", validation)
    lines = (root / "badjson" / "train.jsonl").read_text().splitlines(keepends=True)
    lines[6] = lines[6][:40] + "\n"  # line 7 cut short
    (root / "badjson" / "train.jsonl").write_text("".join(lines))
    missing = [dict(row) for row in train]
    del missing[2]["sentence"]
    write_jsonl(root / "nofield" / "train.jsonl", missing)
    write_jsonl(root / "nofield" / "validation.jsonl", validation)
    write_jsonl(root / "emptysplit" / "train.jsonl", train)
    (root / "emptysplit" / "validation.jsonl").write_text("")
    topics = [{"text": f"news item {i}", "label": i % 2} for i in range(20)]
    topics[4]["label"] = 2  # two choices: there is no choice 2
    write_jsonl(root / "topics_train.jsonl", topics)
    write_jsonl(root / "topics_val.jsonl", [{"text": f"item {i}", "label": i % 2} for i in range(6)])
    (root / "typo.toml").write_text(TOPICS_TOML.format(extra='lable_field = "label"'))
    (root / "range.toml").write_text(TOPICS_TOML.format(extra=""))


# (row id, the input as a reader would describe it, zoobj train flags, strings the one error line must contain)
BEFORE_TRAINING = [
    ("unknown-task", "--task nope", ["--task", "nope"], ["unknown task 'nope'", "sst2"]),
    ("unknown-metric", "--metric nope", ["--task", "sst2", "--metric", "nope"], ["unknown metric 'nope'", "accuracy"]),
    ("unknown-model", "--model ./no-such-model", ["--task", "sst2", "--model", "./no-such-model"],
     ["'./no-such-model' does not exist", "gemma-3-270m"]),
    ("metric-not-callable", "--metric rewards.py:NOT_A_FUNCTION (an int)",
     ["--task", "sst2", "--metric", "rewards.py:NOT_A_FUNCTION"], ["NOT_A_FUNCTION", "not a function"]),
    ("malformed-jsonl", "--data badjson (line 7 of train.jsonl cut short)", ["--task", "sst2", "--data", "badjson"],
     ["badjson/train.jsonl:7: invalid JSON"]),
    ("missing-field", "--data nofield (row 3 has no 'sentence')", ["--task", "sst2", "--data", "nofield"],
     ["nofield/train.jsonl: row 3: missing field 'sentence'"]),
    ("empty-split", "--data emptysplit (empty validation.jsonl)", ["--task", "sst2", "--data", "emptysplit"],
     ["emptysplit/validation.jsonl", "empty"]),
    ("toml-unknown-key", "--task typo.toml (lable_field = ...)", ["--task", "typo.toml"],
     ["typo.toml: unknown key 'lable_field'", "label_field"]),
    ("toml-missing-choice", "--task range.toml (label 2, two choices)", ["--task", "range.toml"],
     ["topics_train.jsonl: row 5: label 2 is out of range for 2 choices"]),
    ("steps-0", "--steps 0", ["--task", "sst2", "--steps", "0"], ["--steps must be at least 1, got 0"]),
    ("negative-lr", "--lr -1e-3", ["--task", "sst2", "--lr", "-1e-3"], ["--lr must be a finite number >= 0"]),
    ("eps-0", "--eps 0", ["--task", "sst2", "--eps", "0"], ["--eps must be a finite number > 0"]),
    ("keep-best-no-dev", "--keep best --eval-every 0", ["--task", "sst2", "--keep", "best", "--eval-every", "0"],
     ["--keep best picks the step with the best dev metric: it needs --eval-every N > 0"]),
    ("smooth-ce", "--objective ce --smooth 1", ["--task", "squad", "--objective", "ce", "--smooth", "1"],
     ["--smooth applies to the metric objective, not ce"]),
    ("smooth-negative", "--smooth -1", ["--task", "sst2", "--smooth", "-1"], ["--smooth must be a temperature >= 0"]),
    ("query-alone", "--parallel ring", ["--task", "sst2", "--parallel", "ring"], ["unknown --parallel 'ring'"]),
    ("perturb-unknown", "--perturb sideways", ["--task", "sst2", "--perturb", "sideways"],
     ["unknown --perturb 'sideways'", "inplace, forward"]),
]

# Rewards that break on the zero-shot evaluation: the model is loaded and the run
# directory written, so the failure cleans it up (nothing to resume).
BROKEN_REWARDS = [
    ("reward-raises", "--metric rewards.py:boom (raises on its 3rd example)", ["--metric", "rewards.py:boom"],
     ["reward 'rewards.py:boom' raised ValueError: cannot score this on example 2"]),
    ("reward-nan", "--metric rewards.py:nan (returns NaN)", ["--metric", "rewards.py:nan"],
     ["reward 'rewards.py:nan' returned nan on example 0; return a finite number"]),
    ("reward-none-trl", "--metric rewards.py:nothing (TRL form, None everywhere)", ["--metric", "rewards.py:nothing"],
     ["reward 'rewards.py:nothing' returned None for all 8 examples"]),
    ("reward-string", "--metric rewards.py:words (returns \"great\")", ["--metric", "rewards.py:words"],
     ["reward 'rewards.py:words' returned 'great' (str) on example 0; return a number"]),
]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    make_inputs(root)
    return root


@pytest.mark.parametrize("row, described, args, needles", BEFORE_TRAINING, ids=[r[0] for r in BEFORE_TRAINING])
def test_bad_input_before_training_is_one_line_exit_2_and_writes_nothing(row, described, args, needles, inputs,
                                                                           model_dir):
    run_dir = inputs / f"run-{row}"
    model = [] if "--model" in args else ["--model", model_dir]
    out = zoobj_run("train", *args, *model, "--output", run_dir.name, cwd=inputs)
    assert_one_error_line(out, 2, *needles)
    assert not run_dir.exists()


@pytest.mark.parametrize("row, described, args, needles", BROKEN_REWARDS, ids=[r[0] for r in BROKEN_REWARDS])
def test_broken_reward_names_reward_and_example_and_leaves_no_run_dir(row, described, args, needles, inputs,
                                                                      model_dir):
    run_dir = inputs / f"run-{row}"
    out = zoobj_run("train", *TRAIN, *args, "--model", model_dir, "--steps", "2", "--output", run_dir.name, cwd=inputs)
    # before the error only the status lines: what trains, then the zero-shot evaluation
    assert_one_error_line(out, 2, *needles, alone=False)
    assert stderr_lines(out)[:-1] == ["training 18,784 parameters (full) in blocks 0-1",
                                      "zero-shot evaluation on 8 validation examples ..."]
    assert not run_dir.exists()  # failed before its first step: nothing to resume, nothing left behind
    if row == "reward-raises":  # the same --output works once the reward is fixed
        fixed = zoobj_run("train", *TRAIN, "--model", model_dir, "--steps", "1", "--output", run_dir.name, cwd=inputs)
        assert fixed.returncode == 0, fixed.stderr


def test_a_broken_run_keeps_a_users_empty_output_folder(inputs, model_dir):
    run_dir = inputs / "empty-folder"
    run_dir.mkdir()
    out = zoobj_run("train", *TRAIN, "--metric", "rewards.py:nan", "--model", model_dir, "--steps", "1",
                    "--output", run_dir.name, cwd=inputs)
    assert out.returncode == 2 and run_dir.is_dir() and not any(run_dir.iterdir())


LATE = '''
CALLS = [0]


def late(prediction, reference):
    """Accuracy, until the 23rd call of this instance: example 2 of l- at step 2 when
    training (the training objective loads its own instance, 4 examples per call)."""
    CALLS[0] += 1
    if CALLS[0] == 23 and BREAK:
        raise ValueError("broke mid-training")
    return float(prediction == reference)


BREAK = True
'''


def test_reward_breaking_mid_training_keeps_complete_records_and_resumes_exactly(model_dir, reference, tmp_path):
    (tmp_path / "late.py").write_text(LATE)
    run_dir = tmp_path / "run"
    out = zoobj_run("train", *TRAIN, "--metric", "late.py:late", "--model", model_dir, "--steps", STEPS,
                    "--output", run_dir.name, cwd=tmp_path)
    assert_one_error_line(out, 2, "reward 'late.py:late' raised ValueError: broke mid-training on example 2",
                          alone=False)
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.json", "log.jsonl", "trajectory.jsonl"]
    recs = records(run_dir / "trajectory.jsonl")  # complete lines only
    assert [r["step"] for r in recs] == [0, 1]
    assert records(run_dir / "trajectory.jsonl") == records(reference[0] / "trajectory.jsonl")[:2]
    json.loads((run_dir / "config.json").read_text())
    records(run_dir / "log.jsonl")
    # fix the reward and resume: the path of an uninterrupted run (the reward is accuracy)
    (tmp_path / "late.py").write_text(LATE.replace("BREAK = True", "BREAK = False"))
    out = zoobj_run("train", "--resume", run_dir.name, "--steps", STEPS, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert (run_dir / "trajectory.jsonl").read_text() == (reference[0] / "trajectory.jsonl").read_text()


def test_reward_breaking_mid_step_restores_the_weights(tmp_path):
    """In process: after the error the model holds the weights of the two complete steps.

    Restoring is a third noise pass (+eps z, -2 eps z, then +eps z back), not a copy, so it
    lands on the start of the step up to float32 rounding (about 1e-8 here); bit for bit it
    is what the same three passes give on the replayed weights. The files are exact: base
    + trajectory rebuild the complete steps bit for bit (the resume test above)."""
    from zoobj.engine.mezo import MeZO
    from zoobj.errors import RewardError
    from zoobj.run.session import lr_schedule
    from zoobj.run.train import TrainConfig, run

    torch.set_num_threads(1)
    (tmp_path / "late.py").write_text(LATE)
    tok = tiny_tokenizer()
    model = tiny_gemma(len(tok))
    cfg = TrainConfig(task="sst2", metric=f"{tmp_path / 'late.py'}:late", steps=STEPS, batch_size=4, eval_limit=8,
                      eval_every=0, lr=1e-3, eps=1e-2, output=str(tmp_path / "run"))
    with pytest.raises(RewardError, match="on example 2"):
        run(cfg, model=model, tok=tok)
    recs = records(tmp_path / "run" / "trajectory.jsonl")
    assert len(recs) == 2

    def trained(m):  # what zoobj trains by default: everything but the token embeddings
        return [(n, p) for n, p in m.named_parameters() if n != "model.embed_tokens.weight"]

    fresh = tiny_gemma(len(tok))
    opt = MeZO([p for _, p in trained(fresh)], lr=1e-3, eps=1e-2, seed=0, schedule=lr_schedule)
    opt.replay(recs)  # base + the two complete steps
    for (name, a), (_, b) in zip(trained(model), trained(fresh)):
        assert torch.allclose(a, b, rtol=0, atol=1e-6), name
    calls = []

    def breaks_on_l_minus():
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("as the reward did")
        return 0.0

    with pytest.raises(ValueError):
        opt.step(breaks_on_l_minus)  # the same three passes of step 2
    for (name, a), (_, b) in zip(trained(model), trained(fresh)):
        assert torch.equal(a, b), name


def test_corrupted_trajectory_line_is_refused_on_resume_naming_file_and_line(reference, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference[0], run_dir)
    shutil.rmtree(run_dir / "model")
    lines = (run_dir / "trajectory.jsonl").read_text().splitlines(keepends=True)
    lines[2] = lines[2][:30] + "\n"  # line 3 of 8 damaged
    (run_dir / "trajectory.jsonl").write_text("".join(lines))
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    out = zoobj_run("train", "--resume", run_dir.name, "--steps", STEPS + 2, cwd=tmp_path)
    assert_one_error_line(out, 2, "run/trajectory.jsonl:3: damaged record in the middle of the file",
                          "restore the file or start a new run")
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before  # nothing touched


def test_truncated_last_trajectory_line_is_dropped_with_a_warning_and_the_run_continues(reference, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference[0], run_dir)
    shutil.rmtree(run_dir / "model")
    lines = (run_dir / "trajectory.jsonl").read_text().splitlines(keepends=True)
    (run_dir / "trajectory.jsonl").write_text("".join(lines[:4]) + lines[4][:50])  # killed writing step 4
    out = zoobj_run("train", "--resume", run_dir.name, "--steps", STEPS, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    warned = [line for line in stderr_lines(out) if "warning" in line]
    assert warned == ["zoobj: warning: run/trajectory.jsonl:5: dropping a truncated last line "
                      "(the run was killed mid-write)"], out.stderr
    assert (run_dir / "trajectory.jsonl").read_text() == (reference[0] / "trajectory.jsonl").read_text()


def test_debug_shows_the_traceback(inputs):
    out = zoobj_run("--debug", "train", "--task", "sst2", "--steps", "0", cwd=inputs)
    assert out.returncode == 1
    assert "Traceback (most recent call last)" in out.stderr
    assert out.stderr.strip().splitlines()[-1] == "zoobj.errors.ConfigError: --steps must be at least 1, got 0"


BROKEN_TASK = '''
from zoobj.tasks import get_task

SST2 = get_task("sst2")


class Broken:
    name, kind, metric, eval_split = "broken", "classification", "accuracy", "validation"

    def load(self, split, data=None):
        raise RuntimeError("a bug in the task code")

    def __getattr__(self, name):
        return getattr(SST2, name)


broken = Broken()
'''


def test_internal_error_is_one_line_exit_1(tmp_path):
    (tmp_path / "brokentask.py").write_text(BROKEN_TASK)
    env_path = f"{tmp_path}{os.pathsep}{ENV.get('PYTHONPATH', '')}"
    out = subprocess.run([sys.executable, "-m", "zoobj", "train", "--task", "brokentask:broken", "--output", "run"],
                         capture_output=True, text=True, env={**ENV, "PYTHONPATH": env_path}, cwd=tmp_path)
    line = assert_one_error_line(out, 1, "RuntimeError: a bug in the task code", "--debug")
    assert line == ("zoobj: internal error: RuntimeError: a bug in the task code "
                    "(run again with --debug for the traceback)")
    assert not (tmp_path / "run").exists()


# ============================================================================ fault injection

KILL_SEED = 20261129


def kill_at(args, run_dir: Path, lines: int, timeout: float = 120) -> int:
    """Start a training run, SIGKILL it once its trajectory has ``lines`` lines; the lines on disk then."""
    log = open(run_dir.parent / f"{run_dir.name}.stderr", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "zoobj", *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=log, env=ENV)
    path, deadline = run_dir / "trajectory.jsonl", time.time() + timeout
    try:
        while True:
            if path.exists() and path.read_bytes().count(b"\n") >= lines:
                proc.send_signal(signal.SIGKILL)
                break
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"the run ended (status {proc.returncode}) before step {lines}: {log.read()}")
            if time.time() > deadline:
                pytest.fail(f"no {lines} trajectory lines after {timeout} s")
            time.sleep(0.005)
    finally:
        proc.kill()
        proc.wait()
        log.close()
    assert proc.returncode == -signal.SIGKILL
    return path.read_bytes().count(b"\n")


def test_sigkill_at_random_steps_then_resume_is_bit_identical(model_dir, reference, tmp_path):
    """A run SIGKILLed once its trajectory has k lines (k drawn from a seeded RNG), then
    resumed with ``--resume DIR --steps 8``, ends with the very trajectory.jsonl and eval
    numbers of an uninterrupted run, and the same weights bit for bit: the noise kernel
    is deterministic (a counter-based hash, no RNG state) and replaying the k records
    repeats the same in-place passes (+eps z, -2 eps z, then restore-and-update) on the
    same base weights that live training made, with the same rounded gradients. Checked
    two ways: the resumed process's own weights (--save-model) against the uninterrupted
    run's, and ``zoobj export`` (base + trajectory) of both runs."""
    ref_dir, ref_export = reference
    ref_weights = tensors(ref_dir / "model")
    assert_same_tensors(tensors(ref_export), ref_weights)  # replay == live training
    ref_traj = (ref_dir / "trajectory.jsonl").read_text()
    ref_eval = json.loads((ref_dir / "eval.json").read_text())
    rng = random.Random(KILL_SEED)
    for trial in range(1):  # one cut point a suite run (three CLI processes: ~20 s on 2 cores); KILL_SEED draws it
        k = rng.randint(1, STEPS - 1)
        run_dir = tmp_path / f"cut{trial}"
        on_disk = kill_at(["train", *TRAIN, "--model", model_dir, "--steps", STEPS, "--output", run_dir], run_dir, k)
        assert k <= on_disk < STEPS
        assert ref_traj.startswith((run_dir / "trajectory.jsonl").read_text())  # complete records, the same ones
        out = zoobj_run("train", "--resume", run_dir, "--steps", STEPS, "--save-model")
        assert out.returncode == 0, out.stderr
        assert (run_dir / "trajectory.jsonl").read_text() == ref_traj
        resumed_eval = json.loads((run_dir / "eval.json").read_text())
        assert (resumed_eval["value"], resumed_eval["steps"]) == (ref_eval["value"], ref_eval["steps"])
        assert_same_tensors(tensors(run_dir / "model"), ref_weights)
        out = zoobj_run("export", run_dir, "--output", tmp_path / f"export{trial}")
        assert out.returncode == 0, out.stderr
        assert_same_tensors(tensors(tmp_path / f"export{trial}"), ref_weights)


TEMPLATE_RUN = ["--task", "squad", "--metric", "f1", "--peft", "template", "--n", "4", "--shaping", "zscore",
                "--lr", "0.5", "--eps", "0.5", "--batch-size", "2", "--eval-limit", "3", "--eval-every", "0",
                "--train-max-new-tokens", "3", "--steps", "6"]


def test_sigkill_of_a_template_population_run_with_probes_together_then_resume(model_dir, tmp_path):
    """A template-tail run with a population of 4 whose probes run together, SIGKILLed at
    random steps and resumed, ends with the uninterrupted run's trajectory and numbers."""
    whole = tmp_path / "whole"
    out = zoobj_run("train", *TEMPLATE_RUN, "--model", model_dir, "--output", whole)
    assert out.returncode == 0, out.stderr
    log = [json.loads(x) for x in (whole / "log.jsonl").read_text().splitlines()]
    assert any("probes run together" in x.get("message", "") for x in log)  # the path under test ran
    ref_traj, ref_eval = (whole / "trajectory.jsonl").read_text(), json.loads((whole / "eval.json").read_text())
    rng = random.Random(KILL_SEED + 1)
    for trial in range(1):  # one cut point a suite run (two CLI processes), drawn from KILL_SEED + 1
        k = rng.randint(1, 5)
        run_dir = tmp_path / f"cut{trial}"
        on_disk = kill_at(["train", *TEMPLATE_RUN, "--model", model_dir, "--output", run_dir], run_dir, k)
        assert k <= on_disk < 6 and ref_traj.startswith((run_dir / "trajectory.jsonl").read_text())
        out = zoobj_run("train", "--resume", run_dir, "--steps", "6")
        assert out.returncode == 0, out.stderr
        assert (run_dir / "trajectory.jsonl").read_text() == ref_traj
        resumed = json.loads((run_dir / "eval.json").read_text())
        assert (resumed["value"], resumed["steps"]) == (ref_eval["value"], ref_eval["steps"])


# ============================================================================ security

SOURCE = Path(zoobj.__file__).resolve().parent
PY_FILES = sorted(SOURCE.rglob("*.py"))


def test_source_is_found():
    assert len(PY_FILES) > 20 and SOURCE / "run" / "train.py" in PY_FILES


def test_no_pickle_import_anywhere_in_zoobj():
    for path in PY_FILES:
        text = path.read_text()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            assert not any(n.split(".")[0] in ("pickle", "cPickle", "_pickle", "dill", "cloudpickle") for n in names), \
                f"{path}:{node.lineno} imports {names}"
        assert "import pickle" not in text and "__import__(\"pickle\")" not in text, path


def test_every_torch_load_passes_weights_only_true():
    for path in PY_FILES:
        text = path.read_text()
        found = 0
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                found += 1
                keywords = {kw.arg: kw.value for kw in node.keywords}
                value = keywords.get("weights_only")
                assert isinstance(value, ast.Constant) and value.value is True, \
                    f"{path}:{node.lineno}: torch.load without weights_only=True"
        assert text.count("torch.load(") == found, f"{path}: a torch.load( the parser did not see"


def test_trust_remote_code_defaults_to_false():
    from zoobj.model.loading import load_model

    assert inspect.signature(load_model).parameters["trust_remote_code"].default is False
    for path in PY_FILES:  # and no call in zoobj turns it on
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.keyword) and node.arg == "trust_remote_code":
                assert not (isinstance(node.value, ast.Constant) and node.value.value is True), f"{path}:{node.lineno}"


# ============================================================================ properties

PROPS = settings(max_examples=75, deadline=None, suppress_health_check=[HealthCheck.too_slow])
words = st.text(alphabet=string.ascii_letters + string.digits + string.punctuation + " \t\néßİ", max_size=30)
answers = words | st.text(max_size=30)


@PROPS
@given(answers, st.lists(answers, min_size=1, max_size=3))
def test_builtin_text_metrics_stay_in_unit_interval(prediction, golds):
    from zoobj.metrics import exact_match, f1

    for metric in (f1, exact_match):
        assert 0.0 <= metric([prediction], [golds]) <= 1.0


@PROPS
@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 4)), min_size=1, max_size=20))
def test_builtin_class_metrics_stay_in_unit_interval_and_accuracy_of_truth_is_one(pairs):
    from zoobj.metrics import accuracy, macro_f1

    predictions, references = [p for p, _ in pairs], [r for _, r in pairs]
    for metric in (accuracy, macro_f1):
        assert 0.0 <= metric(predictions, references) <= 1.0
    assert accuracy(references, references) == 1.0
    assert macro_f1(references, references) == 1.0


@PROPS
@given(answers)
def test_normalize_answer_is_idempotent(text):
    from zoobj.metrics import normalize_answer

    once = normalize_answer(text)
    assert normalize_answer(once) == once


@PROPS
@given(answers, answers)
def test_squad_f1_is_symmetric(a, b):
    from zoobj.metrics import squad_f1

    assert squad_f1(a, [b]) == squad_f1(b, [a])


@PROPS
@given(answers, st.lists(answers, min_size=1, max_size=3))
def test_exact_match_implies_f1_one(prediction, golds):
    """Except where the answers normalise to nothing: see the next test."""
    from zoobj.metrics import normalize_answer, squad_exact_match, squad_f1

    if squad_exact_match(prediction, golds) == 1.0 and normalize_answer(prediction):
        assert squad_f1(prediction, golds) == 1.0


def test_answers_that_normalise_to_nothing_match_exactly_with_f1_zero():
    """The official SQuAD v1.1 script's behaviour, kept: "The" vs "a" both normalise to ""
    (articles removed), so exact match is 1 while token F1 (no common tokens) is 0."""
    from zoobj.metrics import squad_exact_match, squad_f1

    assert (squad_exact_match("The", ["a"]), squad_f1("The", ["a"])) == (1.0, 0.0)


json_leaf = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
             | st.text(max_size=8))
json_values = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=8)
extra_columns = st.dictionaries(st.text(max_size=6).filter(lambda k: k not in ("text", "label")), json_values,
                                max_size=3)
row_strategy = st.builds(lambda base, extra: {**extra, **base},
                         st.fixed_dictionaries({}, optional={"text": st.one_of(st.none(), st.text(max_size=12)),
                                                             "label": st.integers(0, 1)}),
                         extra_columns)

LOADER_TOML = '''data_files = { train = "train.jsonl", validation = "train.jsonl" }
template = "{text} Topic:"
choices = [" world", " sports"]
'''


@PROPS
@given(st.lists(row_strategy, min_size=1, max_size=6), st.booleans())
def test_toml_task_loader_returns_the_rows_as_written_or_names_the_missing_field(rows, ascii_only):
    from zoobj.errors import DataError
    from zoobj.tasks import load_task_file

    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        (folder / "task.toml").write_text(LOADER_TOML)
        (folder / "train.jsonl").write_text("".join(json.dumps(r, ensure_ascii=ascii_only, allow_nan=False) + "\n"
                                                    for r in rows), encoding="utf-8")
        task = load_task_file(folder / "task.toml")
        expected = [{k: v for k, v in row.items() if v is not None} for row in rows]  # null = absent
        bad = next((i for i, row in enumerate(expected) if not {"text", "label"} <= set(row)), None)
        if bad is None:
            assert task.load("train") == expected
            loaded = task.load("train")
            assert [json.dumps(r, sort_keys=True) for r in loaded] == [json.dumps(r, sort_keys=True) for r in expected]
        else:
            with pytest.raises(DataError) as err:
                task.load("train")
            field = "text" if "text" not in expected[bad] else "label"
            assert str(err.value) == f"{folder / 'train.jsonl'}: row {bad + 1}: missing field '{field}'"


trajectory_records = st.lists(
    st.fixed_dictionaries({
        "seeds": st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=2),
        "grads": st.lists(st.floats(allow_nan=False, allow_infinity=False, width=32), min_size=1, max_size=2),
        "lr": st.sampled_from([1e-6, 1e-3]),
        "loss_plus": st.lists(st.none() | st.floats(-10, 10), min_size=1, max_size=2),
        "loss_minus": st.lists(st.none() | st.floats(-10, 10), min_size=1, max_size=2),
        "ties": st.integers(0, 2),
        "skipped": st.booleans(),
    }), max_size=6)


@PROPS
@given(trajectory_records, st.data())
def test_trajectory_cut_at_any_byte_reads_as_a_prefix(recs, data):
    from zoobj.engine import trajectory as tj

    recs = [{"step": i, **r} for i, r in enumerate(recs)]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "trajectory.jsonl"
        writer = tj.JsonlWriter(path)
        for r in recs:
            writer.append(r)
        writer.close()
        whole = path.read_bytes()
        cut = data.draw(st.integers(0, len(whole)), label="cut")
        path.write_bytes(whole[:cut])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            got = tj.read_trajectory(path)
        kept = whole[:cut]
        assert got == recs[: kept.count(b"\n")]  # the records whose newline made it to disk
        assert path.read_bytes() == kept[: kept.rfind(b"\n") + 1]  # and the partial line is cut from the file
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert tj.read_trajectory(path) == got  # reading again agrees, with no warning


"""Data-parallel and query-parallel MeZO: two CPU processes under torchrun (gloo)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from zoobj.engine import trajectory as tj
from zoobj.model.loading import load_model
from zoobj.run.train import TrainConfig, run

BASE = dict(task="sst2", steps=5, batch_size=4, lr=1e-3, eps=1e-2, eval_limit=8, eval_every=0, dev_limit=4)
SETTINGS = {
    "data-ce": dict(BASE, objective="ce"),
    "data-accuracy": dict(BASE, objective="metric", eps=5e-2),
    "query": dict(BASE, objective="ce", parallel="query", n=2),
    "query-rank": dict(BASE, objective="ce", parallel="query", n=4, shaping="rank", lr=1e-2),
}
ROOT = Path(__file__).resolve().parent.parent


def failure(proc) -> str:
    """The lines that say what went wrong in a torchrun launch, then the tail."""
    lines = proc.stderr.splitlines()
    keys = ("Error", "error", "terminate", "what()", "Signal", "Traceback")
    return "\n".join([x for x in lines if any(k in x for k in keys)][-20:] + lines[-30:])


@pytest.fixture(scope="module")
def launched(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ZOOBJ_DIST_BACKEND": "gloo"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(ROOT / "tests" / "dist_worker.py"), model_dir, str(out), json.dumps(SETTINGS)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, failure(proc)
    return out


def single(model_dir, tmp_path, mode, **change):
    model, tok = load_model(model_dir)
    cfg = TrainConfig(model=model_dir, output=str(tmp_path / mode), **{**SETTINGS[mode], **change})
    run(cfg, model=model, tok=tok)
    return model.state_dict(), tj.read_trajectory(tmp_path / mode / tj.TRAJECTORY)


def weights(out, mode, rank):
    return load_file(str(out / f"weights-{mode}-{rank}.safetensors"))


@pytest.mark.parametrize("mode", ["data-ce", "data-accuracy"])
def test_data_parallel_ranks_agree_bitwise_and_match_one_process(launched, model_dir, tmp_path, mode):
    w0, w1 = weights(launched, mode, 0), weights(launched, mode, 1)
    assert all(torch.equal(w0[k], w1[k]) for k in w0)  # no weight traffic, still identical
    ref, ref_records = single(model_dir, tmp_path, mode)
    moved = max(float((ref[k] - load_model(model_dir)[0].state_dict()[k]).abs().max()) for k in w0)
    assert moved > 1e-6 or mode == "data-accuracy"  # the CE run really trained
    for k in w0:
        torch.testing.assert_close(w0[k], ref[k], rtol=1e-5, atol=1e-5)
    records = tj.read_trajectory(launched / f"run-{mode}" / tj.TRAJECTORY)
    assert [r["seeds"] for r in records] == [r["seeds"] for r in ref_records]
    for r, q in zip(records, ref_records):
        assert r["grads"] == pytest.approx(q["grads"], rel=1e-4, abs=1e-4)
        assert r["ties"] == q["ties"]


def test_the_run_directory_is_written_once_by_rank_0(launched):
    for mode in SETTINGS:
        run_dir = launched / f"run-{mode}"
        assert len(tj.read_trajectory(run_dir / tj.TRAJECTORY)) == 5
        steps = [r for r in tj.read_jsonl(run_dir / tj.LOG) if r.get("event") == "step"]
        assert [r["step"] for r in steps] == list(range(5))
        assert tj.read_json(run_dir / tj.CONFIG)["world_size"] == 2
        assert all(0 < r["comm_bytes"] < 1000 for r in steps)  # a few scalars, not weights
        assert json.loads((launched / f"result-{mode}-1.json").read_text())["result"] == {}
        assert json.loads((launched / f"result-{mode}-0.json").read_text())["result"]["world_size"] == 2


@pytest.mark.parametrize("mode,n", [("query", 2), ("query-rank", 4)])
def test_query_parallel_matches_one_process_n_spsa(launched, model_dir, tmp_path, mode, n):
    w0, w1 = weights(launched, mode, 0), weights(launched, mode, 1)
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    ref, ref_records = single(model_dir, tmp_path, mode)  # one process: n-SPSA, shaped over all 2n losses
    for k in w0:
        torch.testing.assert_close(w0[k], ref[k], rtol=1e-5, atol=1e-5)
    records = tj.read_trajectory(launched / f"run-{mode}" / tj.TRAJECTORY)
    assert all(len(r["seeds"]) == n for r in records)
    assert [r["seeds"] for r in records] == [r["seeds"] for r in ref_records]
    for r, q in zip(records, ref_records):
        assert r["grads"] == pytest.approx(q["grads"], rel=1e-4, abs=1e-4)


def test_the_command_line_under_torchrun_prints_one_summary_and_writes_one_run(model_dir, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ZOOBJ_DIST_BACKEND": "gloo", "COLUMNS": "80"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "zoobj",
         "train", "--model", model_dir, "--task", "sst2", "--objective", "ce", "--steps", "2", "--batch-size", "4",
         "--eval-limit", "6", "--eval-every", "0", "--output", str(out)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, failure(proc)
    assert proc.stdout.count("after 2 steps") == 1  # rank 0 alone prints the summary
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "curve.png", "eval.json", "log.jsonl",
                                                     "predictions.jsonl", "trajectory.jsonl"]
    assert json.loads((out / "eval.json").read_text())["n"] == 6  # 3 rows per rank, scored together
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 6  # in row order, gathered on rank 0


def test_gpu_benchmark_script_runs_on_cpu_in_quick_mode():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_step.py"), "--device", "cpu", "--quick"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    ratios = [last["step_over_two_forwards_inplace"], last["step_over_two_forwards_forward"]]
    assert all(math.isfinite(r) and r > 0 for r in ratios)  # timings: a loaded machine may put either side first


@pytest.mark.parametrize("change,needle", [
    (dict(parallel="query", n=3), "multiple of the 2 processes"),
    (dict(batch_size=1), "global batch: it must be at least the 2 processes"),
    (dict(device_map="auto"), "--device-map spreads one model"),
    (dict(parallel="ring"), "unknown --parallel 'ring'"),
])
def test_settings_that_cannot_work_across_processes_are_refused_before_any_collective(model_dir, tmp_path, change,
                                                                                        needle):
    from zoobj.errors import ConfigError
    from zoobj.run.distributed import World

    world = World(rank=0, size=2, backend="gloo", device=torch.device("cpu"))  # no process group: nothing may talk
    cfg = TrainConfig(model=model_dir, output=str(tmp_path / "run"), **{**SETTINGS["data-ce"], **change})
    with pytest.raises(ConfigError, match=needle):
        run(cfg, world=world)
    assert not (tmp_path / "run").exists()


def test_a_reward_failing_on_rank_0_in_an_evaluation_stops_every_rank_with_the_same_line(model_dir, tmp_path):
    reward = tmp_path / "rewards.py"
    reward.write_text("def boom(prediction, reference):\n    raise ValueError('kaboom')\n")
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ZOOBJ_DIST_BACKEND": "gloo", "COLUMNS": "200"}
    proc = subprocess.run(  # the reward runs on rank 0 alone, first in the zero-shot evaluation
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "zoobj",
         "train", "--model", model_dir, "--task", "sst2", "--metric", f"{reward}:boom", "--steps", "2",
         "--batch-size", "4", "--eval-limit", "6", "--eval-every", "0", "--output", str(out)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("zoobj:")]
    assert len(errors) == 2 and errors[0] == errors[1], failure(proc)  # one line per rank, the same line
    assert errors[0].startswith("zoobj: error: ") and "kaboom" in errors[0] and "boom" in errors[0]
    assert not out.exists()  # failed before its first step: nothing left behind

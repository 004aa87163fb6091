"""Golden outputs recorded before the engine and the training loop were reshaped: the
trajectories of fixed-seed runs (every update rule, both perturbation modes, n-SPSA,
decay, a skipped step, the sharded path, the training loop) and ``zoobj train --help``.
A reshaping must reproduce them; the help text may gain information, never lose it.

Record again (only for an intended change of behaviour):
``python -m tests.test_golden``.
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch

from zoobj.engine.mezo import MeZO, decay_groups

GOLDEN = Path(__file__).resolve().parent / "golden"
STEPS = 5


def _model() -> torch.nn.Module:
    """A small MLP whose weights are a formula (the same on every machine, no RNG)."""
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    with torch.no_grad():
        for j, p in enumerate(model.parameters()):
            p.copy_(0.5 * torch.sin(torch.arange(p.numel(), dtype=torch.float32) * 0.37 + j).view_as(p))
    return model


X = torch.cos(torch.arange(24, dtype=torch.float32)).view(4, 6)
Y = torch.sin(torch.arange(12, dtype=torch.float32) * 0.5).view(4, 3)

ENGINE = {
    "sgd-inplace": dict(rule="sgd"),
    "sgd-inplace-n3": dict(rule="sgd", n=3),
    "sgd-inplace-decay": dict(rule="sgd", weight_decay=0.1, groups=True),
    "momentum-inplace": dict(rule="momentum", n=2),
    "adam-inplace": dict(rule="adam"),
    "sgd-forward": dict(rule="sgd", perturb="forward"),
    "momentum-forward": dict(rule="momentum", perturb="forward"),
    "adam-forward": dict(rule="adam", perturb="forward", n=2),
    "sgd-skip-nonfinite": dict(rule="sgd", nan_at=3),
    "sgd-shard-1-of-1": dict(rule="sgd", n=2, shard=True),
}


def engine_run(name: str) -> dict:
    spec = dict(ENGINE[name])
    model = _model()
    groups, nan_at, shard = spec.pop("groups", False), spec.pop("nan_at", None), spec.pop("shard", False)
    params = decay_groups(model.named_parameters(), spec.pop("weight_decay")) if groups else model.parameters()
    extra = dict(shard=(0, 1), exchange=lambda rows: rows) if shard else {}
    # recorded with Gaussian directions, the default then (the default is now rademacher)
    opt = MeZO(params, lr=0.05, eps=1e-2, seed=3, model=model, noise="gaussian", **spec, **extra)
    calls = [0]

    def loss():
        calls[0] += 1
        if nan_at is not None and calls[0] == 2 * nan_at + 1:
            return float("nan")
        with torch.no_grad():
            return float(((model(X) - Y) ** 2).mean())

    for _ in range(STEPS):
        opt.step(loss)
    return {"trajectory": opt.trajectory,
            "weights": [float(v) for p in model.parameters() for v in p.detach().reshape(-1)]}


TRAIN = {
    "train-ce": dict(objective="ce"),
    "train-accuracy-keep-best": dict(objective="metric", eps=5e-2, eval_every=2, dev_limit=8, keep="best"),
    "train-lora-adam": dict(objective="ce", peft="lora", rule="adam", lr=1e-2),
}


def train_run(name: str, model_dir: str, out: Path) -> dict:
    from zoobj.engine import trajectory as tj
    from zoobj.run.train import TrainConfig, run

    # recorded with Gaussian directions, the default then, before the dev evaluation at the start existed, and
    # with cross-entropy over the vocabulary (a classification task's default became the candidates)
    settings = dict(steps=4, batch_size=4, lr=1e-3, eps=1e-2, eval_limit=8, eval_every=0, dev_limit=4,
                    noise="gaussian", dev_at_start=False)
    if TRAIN[name]["objective"] == "ce":
        settings["ce_over"] = "vocabulary"
    cfg = TrainConfig(task="sst2", model=model_dir, output=str(out), **{**settings, **TRAIN[name]})
    result = run(cfg)
    events = [(r["event"], r.get("step")) for r in tj.read_jsonl(out / tj.LOG)]
    return {"trajectory": tj.read_trajectory(out / tj.TRAJECTORY), "events": events,
            "result": {k: result[k] for k in ("value", "n", "zero_shot", "steps", "kept_steps", "tie_rate")}}


def _close(a, b, rel=1e-5, abs_=1e-7) -> bool:
    if a is None or b is None:
        return a is b
    return math.isclose(a, b, rel_tol=rel, abs_tol=abs_)


def assert_same_trajectory(got: list[dict], want: list[dict], rel: float) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert list(g) == list(w)  # the record's keys, in order
        assert (g["step"], g["seeds"], g["lr"], g["ties"], g["skipped"]) == (
            w["step"], w["seeds"], w["lr"], w["ties"], w["skipped"])
        for key in ("grads", "loss_plus", "loss_minus"):
            assert all(_close(a, b, rel) for a, b in zip(g[key], w[key], strict=True)), (key, g, w)


def _golden(name: str):
    return json.loads((GOLDEN / f"{name}.json").read_text())


@pytest.mark.parametrize("name", list(ENGINE))
def test_engine_trajectories_match_the_golden_ones(name):
    got, want = engine_run(name), _golden(name)
    assert_same_trajectory(got["trajectory"], want["trajectory"], rel=1e-5)
    assert all(_close(a, b, 1e-5, 1e-6) for a, b in zip(got["weights"], want["weights"], strict=True))


@pytest.mark.parametrize("name", list(TRAIN))
def test_training_loop_matches_the_golden_run(name, model_dir, tmp_path):
    got, want = train_run(name, model_dir, tmp_path / name), _golden(name)
    # a model's float32 sums are ordered by the CPU's vector width: recorded on an AVX-512
    # machine, the cross-entropy run's projected gradients differ by 2e-4 (relative) on AVX2
    assert_same_trajectory(got["trajectory"], want["trajectory"], rel=1e-3)
    assert [tuple(e) for e in want["events"]] == got["events"]
    for key, value in want["result"].items():
        assert _close(got["result"][key], value, 1e-6, 1e-9), key


def train_help() -> str:
    from typer.testing import CliRunner

    from zoobj.cli import app

    result = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"})
    assert result.exit_code == 0, result.output
    return result.output


def help_options(text: str) -> dict[str, str]:
    """``--flag`` -> its help text (whitespace and table borders folded away)."""
    options: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        line = line.strip(" │╭╮╰╯─|")
        m = re.match(r"^(--[a-z0-9-]+)(?:/--[a-z0-9-]+)?\s+(?:[A-Z]+\s+)?(.*)$", line)
        if m:
            current = m.group(1)
            options[current] = m.group(2).strip()
        elif current and line:
            options[current] += " " + line.strip()
    return {k: re.sub(r"\s+", " ", v).strip() for k, v in options.items()}


def test_train_help_keeps_every_option_and_default_of_the_golden_help():
    want, got = help_options((GOLDEN / "train_help.txt").read_text()), help_options(train_help())
    assert want and set(want) <= set(got), set(want) - set(got)
    for flag, text in want.items():
        for default in re.findall(r"\[default: [^\]]+\]", text):
            assert default in got[flag], (flag, default, got[flag])
        words = set(re.findall(r"[a-z0-9]+", text.lower())) - {"default"}
        missing = words - set(re.findall(r"[a-z0-9]+", got[flag].lower()))
        assert not missing, (flag, missing, got[flag])


def record(model_dir: str) -> None:  # pragma: no cover - run by hand
    import tempfile

    GOLDEN.mkdir(exist_ok=True)
    for name in ENGINE:
        (GOLDEN / f"{name}.json").write_text(json.dumps(engine_run(name)) + "\n")
    with tempfile.TemporaryDirectory() as tmp:
        for name in TRAIN:
            (GOLDEN / f"{name}.json").write_text(json.dumps(train_run(name, model_dir, Path(tmp) / name)) + "\n")
    (GOLDEN / "train_help.txt").write_text(train_help())


if __name__ == "__main__":  # pragma: no cover
    import tempfile

    from tests.tiny import tiny_gemma, tiny_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tok = tiny_tokenizer()
        tiny_gemma(len(tok)).save_pretrained(tmp)
        tok.save_pretrained(tmp)
        record(tmp)
    print(f"recorded into {GOLDEN}", file=sys.stderr)

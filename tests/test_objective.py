"""Objectives on a tiny model: any metric as the loss, through forward passes only."""

from dataclasses import dataclass

import pytest
import torch

from tests.tiny import tiny_gemma, tiny_tokenizer
from zoobj import MeZO
from zoobj.errors import ConfigError, RewardError
from zoobj.metrics import get_metric
from zoobj.objective import ce_objective, evaluate, make_objective, metric_objective, predict


@dataclass(frozen=True)
class Toy:
    """Separable by the last word: colours are 'great', places 'terrible'."""

    name: str = "toy"
    kind: str = "classification"
    metric: str = "accuracy"
    eval_split: str = "validation"
    length_normalize: bool = True

    def prompt(self, row):
        return "It was " + row["w"]

    def choices(self, row):
        return [" great", " terrible"]

    def label(self, row):
        return row["label"]

    reference = label

    def target(self, row):
        return self.choices(row)[row["label"]]

    def load(self, split, data=None):
        return ROWS


ROWS = [{"w": w, "label": 0} for w in ("red", "blue", "green", "one")] + [
    {"w": w, "label": 1} for w in ("dog", "mat", "park", "two")
]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def accuracy_of(model, tok, task):
    return get_metric("accuracy")(predict(model, tok, task, ROWS), [r["label"] for r in ROWS])


def test_mezo_on_accuracy_raises_training_accuracy(tok):
    model = tiny_gemma(len(tok), seed=0)
    task = Toy()
    before = {n: p.clone() for n, p in model.named_parameters()}
    start = accuracy_of(model, tok, task)
    objective = metric_objective(model, tok, task, "accuracy")
    opt = MeZO(model.parameters(), lr=1.0, eps=0.5, seed=0)
    for _ in range(100):
        opt.step(lambda: objective(ROWS))
    end = accuracy_of(model, tok, task)
    assert end > start and end >= 0.875
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    ties = sum(r["ties"] for r in opt.trajectory)
    assert 0 < ties < 100  # a discrete metric ties on some steps, not on all


def test_ce_objective_falls_under_mezo(tok):
    model = tiny_gemma(len(tok), seed=1)
    objective = ce_objective(model, tok, Toy())
    start = objective(ROWS)
    opt = MeZO(model.parameters(), lr=1e-2, eps=1e-3, seed=0)
    for _ in range(60):
        opt.step(lambda: objective(ROWS))
    assert objective(ROWS) < start - 0.2


def test_user_reward_is_the_loss(tok, tmp_path):
    model = tiny_gemma(len(tok), seed=0)
    (tmp_path / "rw.py").write_text("def always_one(prediction, reference):\n    return 1.0\n")
    objective = metric_objective(model, tok, Toy(), f"{tmp_path}/rw.py:always_one")
    assert objective(ROWS) == -1.0


def test_reward_that_raises_names_itself_and_restores_weights(tok, tmp_path):
    model = tiny_gemma(len(tok), seed=0)
    (tmp_path / "bad.py").write_text(
        "def flaky(prediction, reference):\n    if reference == 1:\n        raise ZeroDivisionError('odd one')\n    return 1.0\n"
    )
    objective = metric_objective(model, tok, Toy(), f"{tmp_path}/bad.py:flaky")
    before = [p.clone() for p in model.parameters()]
    opt = MeZO(model.parameters(), lr=1.0, eps=0.5)
    with pytest.raises(RewardError, match=r"flaky.*ZeroDivisionError.*example 4"):
        opt.step(lambda: objective(ROWS))
    for p, b in zip(model.parameters(), before):
        torch.testing.assert_close(p, b, rtol=1e-5, atol=1e-6)


def test_evaluate_reports_value_and_interval(tok):
    model = tiny_gemma(len(tok), seed=0)
    result = evaluate(model, tok, Toy(), limit=6)
    assert result["n"] == 6 and result["metric"] == "accuracy" and result["split"] == "validation"
    low, high = result["ci95"]
    assert 0 <= low <= result["value"] <= high <= 1
    assert result["value"] == get_metric("accuracy")(result["predictions"], [r["label"] for r in ROWS[:6]])


def test_unknown_objective(tok):
    with pytest.raises(ConfigError, match="metric, ce"):
        make_objective("mse", None, tok, Toy(), "accuracy")


def test_smoothed_accuracy_tends_to_accuracy_and_is_between_0_and_1(tok):
    from zoobj.objective import expected_metric

    model = tiny_gemma(len(tok), seed=0)
    task = Toy()
    hard = -metric_objective(model, tok, task, "accuracy")(ROWS)
    total, counted = expected_metric(model, tok, task, get_metric("accuracy"), ROWS, temperature=1e-6)
    assert counted == len(ROWS) and total / counted == pytest.approx(hard)
    soft = -metric_objective(model, tok, task, "accuracy", smooth=1.0)(ROWS)
    assert 0 < soft < 1 and soft != hard


def test_smoothing_removes_the_ties_that_stall_a_hard_metric(tok):
    """The same small steps: the hard metric ties on most of them, its smoothed form on none."""
    runs = {}
    for smooth in (0.0, 1.0):
        model = tiny_gemma(len(tok), seed=0)
        objective = metric_objective(model, tok, Toy(), "accuracy", smooth=smooth)
        opt = MeZO(model.parameters(), lr=1e-2, eps=1e-2, seed=0)
        for _ in range(20):
            opt.step(lambda: objective(ROWS))
        runs[smooth] = sum(r["ties"] for r in opt.trajectory)
    assert runs[0.0] >= 10 and runs[1.0] == 0


def test_smoothing_is_refused_where_it_cannot_apply(tok):
    model = tiny_gemma(len(tok), seed=0)
    with pytest.raises(ConfigError, match="mean over examples"):
        metric_objective(model, tok, Toy(), "macro_f1", smooth=1.0)(ROWS)

    @dataclass(frozen=True)
    class Gen(Toy):
        kind: str = "generation"

    with pytest.raises(ConfigError, match="classification tasks"):
        metric_objective(model, tok, Gen(), "f1", smooth=1.0)

"""Objectives on a tiny model: any metric as the loss, through forward passes only."""

from dataclasses import dataclass

import pytest
import torch

from tests.tiny import tiny_gemma, tiny_tokenizer
from zoobj import MeZO
from zoobj.errors import ConfigError, RewardError
from zoobj.metrics import get_metric
from zoobj.run.objective import ce_objective, evaluate, make_objective, metric_objective, predict


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
    from zoobj.run.objective import expected_metric

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

    squad, rows = squad_rows(2)
    with pytest.raises(ConfigError, match="mean over examples"):
        metric_objective(model, tok, squad, "macro_f1", smooth=1.0, max_new_tokens=2)(rows)


# ----------------------------------------------------------------------------- --smooth for generation


def squad_rows(n):
    from zoobj.tasks import get_task

    task = get_task("squad")
    return task, task.load("train")[:n]


def squad_model(tok, seed=0):
    return tiny_gemma(len(tok), seed=seed, sliding_window=4096)  # SQuAD prompts are long in a 400-token vocabulary


def test_smoothed_generation_weighs_the_greedy_answer_against_the_references(tok):
    from zoobj.metrics import squad_f1

    task, rows = squad_rows(4)
    model = squad_model(tok)
    objective = metric_objective(model, tok, task, "f1", smooth=1.0, max_new_tokens=3)
    answers = objective.prepare(rows)
    greedy = predict(model, tok, task, rows, max_new_tokens=3)
    for i, row in enumerate(rows):
        refs = task.reference(row)
        mine = answers.texts[i][: answers.count[i]]
        assert mine[0] == greedy[i].strip() and set(mine[1:]) <= set(refs)
        assert answers.value[i, 0] == pytest.approx(squad_f1(greedy[i], refs))
        assert all(v == 1.0 for v in answers.value[i, 1: answers.count[i]])
        assert all(c.startswith(" ") and c.endswith(task.stop) for c in answers.continuations[i])
    loss = objective(rows)
    hard = metric_objective(model, tok, task, "f1", max_new_tokens=3)(rows)
    assert -1.0 <= loss <= hard <= 0.0  # the references score 1, so the expectation is above the greedy F1
    assert loss < hard  # the references get some probability


def test_smoothed_generation_keeps_its_answer_set_through_the_probes(tok):
    """The probes of a step score the answer set prepared before them, whatever they do to
    the greedy answers; the next step's prepare takes the new ones."""
    task, rows = squad_rows(3)
    model = squad_model(tok, seed=1)
    objective = metric_objective(model, tok, task, "f1", smooth=1.0, max_new_tokens=3)
    before = objective.prepare(rows)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    moved = predict(model, tok, task, rows, max_new_tokens=3)
    assert moved != [t[0] for t in before.texts]  # the perturbation changed some greedy answer
    objective(rows)
    assert [t[0] for t in objective.prepare(rows).texts] == [m.strip() or t[0] for m, t in zip(moved, before.texts)]


def test_smoothing_a_generation_metric_removes_its_ties_and_improves_it(tok):
    """Small steps on a generation metric: F1 of the greedy answers ties on every one, its
    expectation over the answer set on none, and falls under MeZO."""
    task, rows = squad_rows(4)
    ties, start, end = {}, None, None
    for smooth in (0.0, 1.0):
        model = squad_model(tok, seed=2)
        objective = metric_objective(model, tok, task, "f1", smooth=smooth, max_new_tokens=3)
        opt = MeZO(model.parameters(), lr=1e-3, eps=1e-3, seed=0)
        if smooth:
            start = objective(rows)
        for _ in range(15):
            if smooth:
                objective.prepare(rows)
            opt.step(lambda: objective(rows))
        ties[smooth] = sum(r["ties"] for r in opt.trajectory)
        if smooth:
            objective.prepare(rows)
            end = objective(rows)
    assert ties[0.0] == 15 and ties[1.0] == 0
    assert end < start - 0.02


TRL_REWARDS = '''
def reward_len(completions, **kwargs):  # from TRL's documentation: answers near 20 characters
    return [-abs(20 - len(completion)) for completion in completions]


def mentions_an_answer(prompts, completions, answers, **kwargs):  # a dataset column by its own name
    seen.append((list(prompts), list(completions)))
    return [None if not c else float(any(a.lower() in c.lower() for a in gold)) for c, gold in zip(completions, answers)]


seen = []
'''


def test_rewards_written_for_trl_work_unchanged(tok, tmp_path):
    """A reward in TRL's GRPOTrainer style gets text completions (the candidates' words on a
    classification task), the prompts, and the data's columns by their own names; None
    leaves an example out."""
    from zoobj.tasks import get_task

    (tmp_path / "trl_rewards.py").write_text(TRL_REWARDS)
    model = tiny_gemma(len(tok), seed=0)
    squad = get_task("squad")
    rows = squad.load("train")[:3]
    value = metric_objective(model, tok, squad, f"{tmp_path}/trl_rewards.py:reward_len", max_new_tokens=4)(rows)
    assert value > 0  # minus a mean of -|20 - len|: a real number from the reward
    fn = get_metric(f"{tmp_path}/trl_rewards.py:mentions_an_answer")
    out = evaluate(model, tok, squad, fn, rows=rows, n_resamples=10)
    import sys

    module = next(m for name, m in sys.modules.items() if name.startswith("_zoobj_reward_trl_rewards"))
    prompts, completions = module.seen[0]
    assert prompts == [squad.prompt(r) for r in rows] and all(isinstance(c, str) for c in completions)
    assert 0.0 <= out["value"] <= 1.0

    sst2 = get_task("sst2")
    rows = sst2.load("validation")[:4]
    module.seen.clear()
    length = get_metric(f"{tmp_path}/trl_rewards.py:reward_len")
    assert metric_objective(model, tok, sst2, length)(rows) > 0
    out = evaluate(model, tok, sst2, length, rows=rows, n_resamples=10)
    assert all(isinstance(p, int) for p in out["predictions"])  # the predictions themselves stay class indices
    words = [sst2.choices(r)[p].strip() for r, p in zip(rows, out["predictions"])]
    assert set(words) <= {"great", "terrible"}
    assert out["value"] == pytest.approx(sum(-abs(20 - len(w)) for w in words) / len(words))  # read as the words
    # smoothed, the reward reads every candidate's words too: E[-|20 - len|] between the two words' values
    soft = -metric_objective(model, tok, sst2, length, smooth=1.0)(rows)
    assert -abs(20 - len("great")) < soft < -abs(20 - len("terrible"))


def test_cross_entropy_over_the_candidates_is_the_gold_classs_share_and_old_runs_keep_the_vocabulary(tmp_path):
    """--objective ce on a classification task: minus the log of the gold candidate's share
    of a softmax over the candidates' scores (MeZO's train_as_classification); over the
    vocabulary on request and for generation; a run recorded before the setting existed
    was over the vocabulary."""
    import json
    import math

    from tests.tiny import tiny_gemma, tiny_tokenizer
    from zoobj.errors import ConfigError
    from zoobj.model import inference
    from zoobj.run.config import TrainConfig, check_same_run, load_run_config
    from zoobj.run.objective import ce_objective
    from zoobj.tasks import get_task

    tok = tiny_tokenizer()
    model = tiny_gemma(len(tok), seed=1)
    task = get_task("sst2")
    rows = task.load("train")[:6]
    scores = inference.score_candidates(model, tok, [task.prompt(r) for r in rows], [task.choices(r) for r in rows])
    want = sum(-(s[task.reference(r)] - math.log(sum(math.exp(x) for x in s))) for s, r in zip(scores, rows)) / len(rows)
    assert ce_objective(model, tok, task)(rows) == pytest.approx(want, rel=1e-5)
    vocabulary = ce_objective(model, tok, task, over="vocabulary")(rows)
    assert vocabulary != pytest.approx(want, rel=1e-3)  # the gold words' NLL among every token: another number
    with pytest.raises(ConfigError, match="--ce-over candidates needs a classification task"):
        ce_objective(model, tok, get_task("squad"), over="candidates")
    assert TrainConfig(task="sst2", objective="ce").resolved().ce_over == "candidates"
    assert TrainConfig(task="squad", objective="ce").resolved().ce_over == "vocabulary"
    assert TrainConfig(task="sst2").resolved().ce_over is None  # the metric objective: not used
    with pytest.raises(ConfigError, match="--ce-over candidates needs a classification task"):
        TrainConfig(task="squad", objective="ce", ce_over="candidates").resolved()  # before any model loads
    with pytest.raises(ConfigError, match="unknown --ce-over 'words'; choose one of candidates, vocabulary"):
        TrainConfig(task="sst2", objective="ce", ce_over="words").resolved()
    old = {**{k: v for k, v in vars(TrainConfig(task="sst2", objective="ce").resolved()).items()}}
    del old["ce_over"]
    (tmp_path / "config.json").write_text(json.dumps(old))
    assert load_run_config(tmp_path).ce_over == "vocabulary"
    with pytest.raises(ConfigError, match="ce_over 'candidates' \\(the run's: 'vocabulary'\\)"):
        check_same_run(TrainConfig(task="sst2", objective="ce").resolved(), old, tmp_path)

"""Metrics: SQuAD scoring, classification, the registry, user rewards, evaluate, bootstrap."""

import math
import sys
import types

import numpy as np
import pytest

from zoobj.errors import ConfigError, DataError, RewardError
from zoobj.metrics import (
    METRICS,
    bootstrap_ci,
    get_metric,
    list_metrics,
    normalize_answer,
    per_example_scores,
    reward,
    squad_exact_match,
    squad_f1,
)

# --- SQuAD v1.1 -------------------------------------------------------------------


def test_f1_partial_overlap_hand_worked():
    # 3 common tokens; P = 3/3, R = 3/4 -> F1 = 2 * 3/4 / (7/4) = 6/7
    assert get_metric("f1")(["Denmark and Norway"], [["Denmark, Iceland and Norway"]]) == pytest.approx(6 / 7)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The Beatles", "beatles"),
        ("a cat and an owl", "cat and owl"),
        ("theatre another", "theatre another"),  # articles only as whole words
        ("U.S.A., (1990)!", "usa 1990"),
        ("  New\tYork \n City ", "new york city"),
        ("THE END", "end"),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match_takes_best_gold_and_normalises():
    assert squad_exact_match("the Eiffel Tower.", ["Paris", "Eiffel tower"]) == 1.0
    assert squad_exact_match("Eiffel", ["Paris", "Eiffel tower"]) == 0.0
    assert get_metric("em") is get_metric("exact_match")
    assert get_metric("em")(["Paris", "Rome"], [["paris"], ["Milan", "Turin"]]) == 0.5


def test_f1_is_max_over_golds_and_bare_string_reference():
    # vs "blue whale": P = 1/2, R = 1 -> 2/3; vs "whale": P = 1/2, R = 1 -> 2/3; vs "shark": 0
    assert squad_f1("the blue whale", ["shark", "whale"]) == pytest.approx(2 / 3)
    assert squad_f1("whale", "the whale") == 1.0
    assert get_metric("f1")(["whale", "x"], ["whale", ["y"]]) == 0.5


def test_f1_zero_without_common_tokens():
    assert squad_f1("red fox", ["blue whale"]) == 0.0
    assert squad_f1("the", ["a"]) == 0.0  # both normalise to nothing


def test_per_example_scores_of_builtins():
    assert per_example_scores("exact_match", ["x b", "c"], [["b"], ["c"]]) == [0.0, 1.0]
    assert per_example_scores("accuracy", [1, 2], [1, 1]) == [1.0, 0.0]
    assert per_example_scores("macro_f1", [1, 2], [1, 1]) is None


# --- classification ---------------------------------------------------------------


def test_accuracy_by_hand():
    assert get_metric("accuracy")([0, 1, 2, 2], [0, 1, 1, 2]) == 0.75
    assert get_metric("accuracy")([1], [0], prompts=["p"], rows=[{"x": 1}]) == 0.0


def test_macro_f1_by_hand():
    # refs 0 0 1 1 2, preds 0 1 1 1 0
    # class 0: tp 1, fp 1, fn 1 -> 1/2; class 1: tp 2, fp 1, fn 0 -> 4/5; class 2: 0
    value = get_metric("macro_f1")([0, 1, 1, 1, 0], [0, 0, 1, 1, 2])
    assert value == pytest.approx((1 / 2 + 4 / 5 + 0) / 3)
    assert get_metric("macro_f1")([0, 1], [0, 1]) == 1.0


def test_batch_length_mismatch_and_empty_batch():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        get_metric("accuracy")([0, 1], [0])
    with pytest.raises(ValueError, match="empty"):
        get_metric("f1")([], [])


# --- registry and loading ---------------------------------------------------------


def test_registry_is_a_plain_dict_of_callables():
    assert isinstance(METRICS, dict)
    assert list_metrics() == sorted(METRICS)
    assert {"accuracy", "macro_f1", "f1", "exact_match", "em"} <= set(METRICS)
    assert all(callable(m) for m in METRICS.values())


def test_unknown_name_lists_valid_names():
    with pytest.raises(ConfigError) as info:
        get_metric("bleu_score")
    message = str(info.value)
    assert "bleu_score" in message and "\n" not in message
    for name in list_metrics():
        assert name in message


def test_dotted_path_loads_function():
    metric = get_metric("operator:eq")  # (a, b): per example
    assert metric(["x", "y", "z", "w"], ["x", "y", "q", "w"]) == 0.75
    assert get_metric("zoobj.metrics.squad:f1") is get_metric("f1")  # a built-in stays itself


def test_file_path_loads_function(tmp_path):
    path = tmp_path / "my_reward.py"
    path.write_text("def longer(prediction, reference):\n    return float(len(prediction) > len(reference))\n")
    metric = get_metric(f"{path}:longer")
    assert metric(["abc", "a"], ["ab", "ab"]) == 0.5
    assert per_example_scores(metric, ["abc", "a"], ["ab", "ab"]) == [1.0, 0.0]


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("no_such_module_xyz:f", "no_such_module_xyz"),
        ("operator:no_such_function", "no_such_function"),
        ("math:pi", "not a function"),
        ("missing/dir/reward.py:f", "no such file"),
        ("operator:", "malformed"),
    ],
)
def test_loading_errors_are_one_line_config_errors(spec, needle):
    with pytest.raises(ConfigError, match=needle) as info:
        get_metric(spec)
    assert "\n" not in str(info.value)


def test_file_that_fails_to_import(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(ConfigError, match="RuntimeError: boom"):
        get_metric(f"{path}:f")


# --- user rewards: signature dispatch ---------------------------------------------


def test_example_form_is_averaged():
    calls = []

    def score(prediction, reference):
        calls.append((prediction, reference))
        return prediction == reference

    metric = get_metric(score)
    assert metric.form == "example"
    assert metric(["a", "b", "c", "d"], ["a", "x", "c", "y"]) == 0.5  # bools count as 0/1
    assert len(calls) == 4


def test_batch_form_called_once():
    calls = []

    def score(predictions, references):
        calls.append(len(predictions))
        return 0.25

    metric = get_metric(score)
    assert metric.form == "batch"
    assert metric(["a", "b", "c"], ["a", "b", "c"]) == 0.25
    assert calls == [3]
    assert per_example_scores(metric, ["a"], ["a"]) is None


def test_trl_form_gets_prompts_completions_and_columns():
    seen = {}

    def score(completions, prompts, **kwargs):
        seen.update(kwargs, prompts=prompts)
        return [float(c == s) for c, s in zip(completions, kwargs["solution"])]

    metric = get_metric(score)
    assert metric.form == "trl"
    rows = [{"solution": "4", "level": 1}, {"solution": "9", "level": 2}]
    assert metric(["4", "8"], ["ref4", "ref9"], prompts=["2+2=", "3*3="], rows=rows) == 0.5
    assert seen["prompts"] == ["2+2=", "3*3="]
    assert seen["level"] == [1, 2]
    assert seen["references"] == ["ref4", "ref9"]


def test_trl_columns_named_like_reward_arguments_are_renamed():
    seen = {}

    def score(completions, **kwargs):
        seen.update(kwargs, completions=completions)
        return [1.0] * len(completions)

    rows = [
        {"references": "row ref", "prompts": "row prompt", "completions": "row completion", "level": 1},
        {"references": "row ref 2", "prompts": "row prompt 2", "completions": "row completion 2", "level": 2},
    ]
    get_metric(score)(["out", "out 2"], ["gold", "gold 2"], prompts=["p", "p 2"], rows=rows)
    assert seen["references"] == ["gold", "gold 2"]  # the reserved names always win
    assert seen["prompts"] == ["p", "p 2"]
    assert seen["completions"] == ["out", "out 2"]
    assert seen["column_references"] == ["row ref", "row ref 2"]  # the row's values, renamed
    assert seen["column_prompts"] == ["row prompt", "row prompt 2"]
    assert seen["column_completions"] == ["row completion", "row completion 2"]
    assert seen["level"] == [1, 2]


def test_trl_renamed_column_that_exists_too_is_refused():
    def score(completions, **kwargs):
        return [1.0] * len(completions)

    rows = [{"references": "a", "column_references": "b"}]
    with pytest.raises(DataError, match="'references' and 'column_references'"):
        get_metric(score)(["out"], ["gold"], rows=rows)


def test_trl_form_without_kwargs_is_config_error():
    def score(completions, solution):
        return [1.0] * len(completions)

    with pytest.raises(ConfigError, match="kwargs"):
        get_metric(score)


def test_decorator_overrides_signature_rule():
    @reward(form="batch")
    def whole(preds, refs):
        return len(preds) / 10

    @reward
    def each(predictions, references):  # plural names, but marked per example
        return float(predictions == references)

    @reward(form="trl")
    def trl(outputs, **kwargs):
        return [1.0 for _ in outputs]

    assert get_metric(whole).form == "batch"
    assert get_metric(whole)(["a", "b"], ["a", "b"]) == 0.2
    assert get_metric(each).form == "example"
    assert get_metric(each)(["a", "b"], ["a", "c"]) == 0.5
    assert each("a", "a") == 1.0  # the decorated function is still the user's function
    assert get_metric(trl).form == "trl"
    with pytest.raises(ConfigError, match="form"):
        reward(form="pairwise")


def test_two_argument_rule_rejects_other_arities():
    def three(a, b, c):
        return 1.0

    with pytest.raises(ConfigError, match="two arguments"):
        get_metric(three)


def test_trl_none_means_not_applicable():
    def maybe(completions, **kwargs):
        return [None if c == "?" else float(len(c)) for c in completions]

    metric = get_metric(maybe)
    assert metric(["ab", "?", "abcd"], [0, 0, 0]) == 3.0  # mean of 2 and 4
    assert per_example_scores(metric, ["ab", "?"], [0, 0]) == [2.0, None]
    with pytest.raises(RewardError, match="None for all"):
        metric(["?", "?"], [0, 0])


# --- user rewards: errors ---------------------------------------------------------


def _fails_on_third(prediction, reference):
    if prediction == "c":
        raise ZeroDivisionError("bad input")
    return 1.0


@pytest.mark.parametrize(
    ("third", "needle"),
    [
        (float("nan"), "nan"),
        (math.inf, "inf"),
        (None, "None"),
        ("0.5", "str"),
    ],
)
def test_unusable_return_values_name_reward_and_example(third, needle):
    def score(prediction, reference):
        return third if prediction == "c" else 1.0

    with pytest.raises(RewardError) as info:
        get_metric(score)(["a", "b", "c"], ["a", "b", "c"])
    message = str(info.value)
    assert needle in message and "example 2" in message and "score" in message
    assert "\n" not in message


def test_raising_reward_names_reward_example_and_exception():
    with pytest.raises(RewardError) as info:
        get_metric("tests.test_metrics:_fails_on_third")(["a", "b", "c"], ["a", "b", "c"])
    message = str(info.value)
    assert "tests.test_metrics:_fails_on_third" in message
    assert "example 2" in message and "ZeroDivisionError" in message and "bad input" in message
    assert isinstance(info.value.__cause__, ZeroDivisionError)


def test_trl_reward_errors():
    def short(completions, **kwargs):
        return [1.0]

    def bad_value(completions, **kwargs):
        return [1.0, "high"]

    with pytest.raises(RewardError, match="1 scores for 2 examples"):
        get_metric(short)(["a", "b"], [0, 0])
    with pytest.raises(RewardError, match="example 1"):
        get_metric(bad_value)(["a", "b"], [0, 0])


def test_batch_metric_returning_garbage_names_metric():
    def nan_metric(predictions, references):
        return float("nan")

    def text_metric(predictions, references):
        return "good"

    for fn in (nan_metric, text_metric):
        with pytest.raises(RewardError, match=fn.__name__):
            get_metric(fn)(["a"], ["a"])


def test_numpy_scores_are_accepted():
    metric = get_metric(lambda prediction, reference: np.float32(0.5))
    assert metric(["a", "b"], ["a", "b"]) == 0.5


# --- evaluate -----------------------------------------------------------------------


class _FakeModule:
    def __init__(self, *results):
        self.results = list(results)
        self.calls = []

    def compute(self, predictions, references):
        self.calls.append((predictions, references))
        return self.results[min(len(self.calls), len(self.results)) - 1]


def _fake_evaluate(monkeypatch, load):
    fake = types.ModuleType("evaluate")
    fake.load = load
    monkeypatch.setitem(sys.modules, "evaluate", fake)


def test_evaluate_name_main_score_scaled_from_percent(monkeypatch):
    module = _FakeModule({"exact_match": 70.0, "f1": 85.0})
    loaded = []
    _fake_evaluate(monkeypatch, lambda name: loaded.append(name) or module)
    metric = get_metric("evaluate:squad#f1")
    assert loaded == ["squad"]  # loaded at get_metric time, without the #key
    assert metric(["a"], ["a"]) == pytest.approx(0.85)  # squad reports percent
    assert module.calls == [(["a"], ["a"])]


def test_evaluate_percent_metric_keeps_its_scale_at_low_scores(monkeypatch):
    # squad reports percent: 0.8 is 0.8 %, not 80 %, and the scale never switches
    _fake_evaluate(monkeypatch, lambda name: _FakeModule({"exact_match": 0.0, "f1": 0.8}, {"f1": 85.0}))
    metric = get_metric("evaluate:squad#f1")
    assert metric(["a"], ["a"]) == pytest.approx(0.008)
    assert metric(["a"], ["a"]) == pytest.approx(0.85)


def test_evaluate_percent_mark_overrides(monkeypatch):
    _fake_evaluate(monkeypatch, lambda name: _FakeModule({"mine": 0.8}, {"mine": 80.0}))
    metric = get_metric("evaluate:mine%")
    assert metric(["a"], ["a"]) == pytest.approx(0.008)
    assert metric(["a"], ["a"]) == pytest.approx(0.8)


def test_evaluate_unknown_scale_is_a_fraction_and_refuses_values_above_one(monkeypatch):
    _fake_evaluate(monkeypatch, lambda name: _FakeModule({"mine": 0.8}, {"mine": 80.0}, {"mine": -0.5}))
    metric = get_metric("evaluate:mine")
    assert metric(["a"], ["a"]) == pytest.approx(0.8)  # trusted as a fraction...
    with pytest.raises(RewardError) as info:  # ...and never reread as percent
        metric(["a"], ["a"])
    message = str(info.value)
    assert "80.0" in message and "'evaluate:mine%'" in message and "\n" not in message
    assert metric(["a"], ["a"]) == pytest.approx(-0.5)  # correlations may be negative


def test_evaluate_several_scores_need_a_key(monkeypatch):
    _fake_evaluate(monkeypatch, lambda name: _FakeModule({"exact_match": 70.0, "f1": 85.0, "name": "x"}))
    with pytest.raises(ConfigError) as info:
        get_metric("evaluate:squad")(["a"], ["a"])
    message = str(info.value)
    assert "exact_match, f1" in message and "'evaluate:squad#exact_match'" in message and "\n" not in message
    with pytest.raises(ConfigError, match=r"no key 'F1'.*exact_match, f1, name"):
        get_metric("evaluate:squad#F1")(["a"], ["a"])
    with pytest.raises(RewardError, match="'name'.*not a number"):
        get_metric("evaluate:squad#name")(["a"], ["a"])


def test_evaluate_single_number_is_the_score(monkeypatch):
    _fake_evaluate(monkeypatch, lambda name: _FakeModule({"name": "x", "score": 0.4, "counts": [1, 2]}))
    assert get_metric("evaluate:rouge")(["a"], ["a"]) == pytest.approx(0.4)


def test_evaluate_local_script(monkeypatch, tmp_path):
    script = tmp_path / "my_metric.py"
    script.write_text("# an evaluate metric script\n")
    loaded = []
    _fake_evaluate(monkeypatch, lambda path: loaded.append(path) or _FakeModule({"my_metric": 0.3, "n": 7}))
    assert get_metric(str(script))(["a"], ["a"]) == pytest.approx(0.3)
    assert get_metric(f"{script}#n%")(["a"], ["a"]) == pytest.approx(0.07)
    assert loaded == [str(script)] * 2


_SCRIPT = '''
import datasets
import evaluate


class {name}(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="a test metric",
            citation="",
            features=datasets.Features({{"predictions": datasets.Value("string"),
                                         "references": datasets.Value("string")}}),
        )

    def _compute(self, predictions, references):
        hits = sum(p == r for p, r in zip(predictions, references))
        return {result}
'''


@pytest.fixture
def real_evaluate(monkeypatch):
    evaluate = pytest.importorskip("evaluate")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")
    monkeypatch.setattr(evaluate.config, "HF_EVALUATE_OFFLINE", True)
    return evaluate


def test_real_evaluate_script_with_key_and_percent_mark(real_evaluate, tmp_path):
    two = tmp_path / "two_scores.py"  # exact match in percent, f1 as a fraction
    two.write_text(_SCRIPT.format(name="TwoScores", result='{"exact_match": 50.0, "f1": 0.8}'))
    assert get_metric(f"evaluate:{two}#f1")(["a"], ["a"]) == pytest.approx(0.8)
    assert get_metric(f"{two}#f1")(["a"], ["a"]) == pytest.approx(0.8)  # bare script path
    assert get_metric(f"evaluate:{two}#exact_match%")(["a"], ["a"]) == pytest.approx(0.5)
    with pytest.raises(RewardError, match=f"'evaluate:{two}#exact_match%'"):
        get_metric(f"evaluate:{two}#exact_match")(["a"], ["a"])
    with pytest.raises(ConfigError, match=f"exact_match, f1.*'evaluate:{two}#exact_match'"):
        get_metric(f"evaluate:{two}")(["a"], ["a"])
    with pytest.raises(ConfigError, match="no key 'bleu'.*exact_match, f1"):
        get_metric(f"evaluate:{two}#bleu")(["a"], ["a"])


def test_real_evaluate_percent_script_at_a_low_score(real_evaluate, tmp_path):
    pct = tmp_path / "hit_percent.py"
    pct.write_text(_SCRIPT.format(name="HitPercent", result='{"hit_percent": 100.0 * hits / len(predictions)}'))
    metric = get_metric(f"evaluate:{pct}%")
    preds = ["a"] + ["x"] * 124  # 1 of 125 right: 0.8 %
    assert metric(preds, ["a"] * 125) == pytest.approx(0.008)
    assert metric(["a", "x"], ["a", "a"]) == pytest.approx(0.5)


@pytest.mark.parametrize("spec", ["evaluate:squad#", "evaluate:#f1", "evaluate:%"])
def test_evaluate_malformed_spec(spec):
    with pytest.raises(ConfigError, match="evaluate:NAME#KEY"):
        get_metric(spec)


def test_evaluate_not_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "evaluate", None)  # import fails
    with pytest.raises(ConfigError, match="pip install evaluate"):
        get_metric("evaluate:f1")


def test_evaluate_load_failure_is_one_clear_line(monkeypatch):
    def offline(name):
        raise ConnectionError("Couldn't reach the Hub\nsecond line")

    _fake_evaluate(monkeypatch, offline)
    with pytest.raises(ConfigError) as info:
        get_metric("evaluate:squad")
    message = str(info.value)
    assert "could not load" in message and "squad" in message and "Hub" in message and "local" in message
    assert "\n" not in message


# --- bootstrap ----------------------------------------------------------------------


def test_bootstrap_is_deterministic_and_brackets_the_value():
    rng = np.random.default_rng(1)
    refs = rng.integers(0, 2, 200).tolist()
    preds = [r if rng.random() < 0.7 else 1 - r for r in refs]
    value = get_metric("accuracy")(preds, refs)
    first = bootstrap_ci("accuracy", preds, refs, n_resamples=300, seed=3)
    assert first == bootstrap_ci("accuracy", preds, refs, n_resamples=300, seed=3)
    assert first != bootstrap_ci("accuracy", preds, refs, n_resamples=300, seed=4)
    low, high = first
    assert 0 <= low <= value <= high <= 1


def test_bootstrap_narrower_with_more_data():
    small = bootstrap_ci("accuracy", [1, 0] * 10, [1, 1] * 10, n_resamples=300)
    large = bootstrap_ci("accuracy", [1, 0] * 1000, [1, 1] * 1000, n_resamples=300)
    assert large[1] - large[0] < (small[1] - small[0]) / 3


def test_bootstrap_recomputes_batch_metrics():
    @reward(form="batch")
    def batch_accuracy(predictions, references):
        return sum(p == r for p, r in zip(predictions, references)) / len(predictions)

    preds, refs = [1, 0, 1, 1, 0, 1] * 5, [1, 1, 1, 1, 0, 0] * 5
    # per-example resampling and recomputation draw the same indices for one seed
    assert bootstrap_ci(batch_accuracy, preds, refs, n_resamples=200) == pytest.approx(
        bootstrap_ci("accuracy", preds, refs, n_resamples=200)
    )
    low, high = bootstrap_ci("macro_f1", preds, refs, n_resamples=50)
    assert 0 <= low <= get_metric("macro_f1")(preds, refs) <= high <= 1

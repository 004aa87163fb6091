"""Where a classification task's predictions go: the class counts of an evaluation, the
plain note when one class takes most of them, and contextual calibration."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.test_cli import cli
from zoobj.cli import collapse_note
from zoobj.errors import ConfigError
from zoobj.run import objective
from zoobj.run.objective import class_counts, content_free_prior, predict
from zoobj.tasks import get_task

SST2 = get_task("sst2")


def rows(labels):
    return [{"sentence": f"sentence {i}", "label": y} for i, y in enumerate(labels)]


def test_a_collapse_is_one_class_taking_most_predictions_well_beyond_its_labels():
    r = rows([1, 0, 1, 0, 1, 0, 1, 0, 1, 1])  # 60% great
    collapsed = class_counts(SST2, r, [1] * 9 + [0])
    assert collapsed["predicted"] == {"great": 9, "terrible": 1} and collapsed["collapsed"] == "great"
    assert collapsed["majority_label_share"] == 0.6
    note = collapse_note({**collapsed, "n": 10}, "the model as given")
    assert "9 of 10 predictions (90%) in one class, 'great', which is 60% of the labels" in note
    assert "0.6000 accuracy" in note
    assert class_counts(SST2, r, [1, 0] * 5)["collapsed"] is None  # spread over both
    assert class_counts(SST2, rows([1] * 9 + [0]), [1] * 10)["collapsed"] is None  # the labels are that skewed too
    assert collapse_note({**class_counts(SST2, r, [1, 0] * 5), "n": 10}, "x") is None


def test_rows_with_candidates_of_their_own_are_counted_by_position():
    copa = get_task("copa")
    r = copa.load("validation")[:6]
    counts = class_counts(copa, r, [0] * 6)
    assert counts["predicted"] == {"choice 1": 6} and sum(counts["labels"].values()) == 6


def test_calibration_divides_out_the_prior_on_content_free_prompts(monkeypatch):
    """Scores that lean to 'great' by 2 nats whatever the sentence: the content-free prompts
    (N/A, empty, [MASK]) show the lean, and the calibrated predictions follow what is left."""
    seen = []
    lean = np.array([0.0, 2.0])  # terrible, great

    def scores(model, tok, prompts, candidates, **kw):
        seen.append(list(prompts))
        out = []
        for p in prompts:
            k = p.split("sentence ")[-1].split()[0] if "sentence " in p else None
            signal = np.array([0.0, 0.0]) if k is None else np.array([1.0, 0.0] if int(k) % 2 else [0.0, 1.0])
            out.append(list(lean + signal))
        return out

    monkeypatch.setattr(objective.inference, "score_candidates", scores)
    r = rows([0, 1, 0, 1])
    assert predict(None, None, SST2, r) == [1, 1, 1, 1]  # the lean wins every time
    assert predict(None, None, SST2, r, calibrate=True) == [1, 0, 1, 0]  # the sentence's signal, lean divided out
    free = seen[-1]
    assert len(free) == 3 and any("N/A" in p for p in free) and any("[MASK]" in p for p in free)
    prior = content_free_prior(None, None, SST2, r)
    assert prior[1] == pytest.approx(np.exp(2) / (1 + np.exp(2))) and prior.sum() == pytest.approx(1.0)


def test_calibration_is_refused_where_it_means_nothing():
    with pytest.raises(ConfigError, match="generation task"):
        predict(None, None, get_task("squad"), [{"question": "q"}], calibrate=True)
    copa = get_task("copa")
    with pytest.raises(ConfigError, match="same classes for every row"):
        content_free_prior(None, None, copa, copa.load("validation")[:4])


def test_eval_prints_the_class_counts_and_calibrates_on_a_tiny_model(model_dir, capsys):
    assert cli("eval", "--task", "sst2", "--model", model_dir, "--limit", "16", "--json") == 0
    plain = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert sum(plain["predicted"].values()) == 16 and sum(plain["labels"].values()) == 16
    assert "calibrated" not in plain
    assert cli("eval", "--task", "sst2", "--model", model_dir, "--limit", "16", "--calibrate", "--json") == 0
    cal = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert cal["calibrated"] is True and sum(cal["predicted"].values()) == 16
    assert cli("eval", "--task", "sst2", "--model", model_dir, "--limit", "16") == 0
    assert "predicted classes: " in capsys.readouterr().out

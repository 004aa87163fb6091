"""The default recipe: what a run of a task without a recipe of its own takes (zoobj.run.recipes)."""

from __future__ import annotations

import json
import random

import pytest

from zoobj.errors import ConfigError

from tests.test_tasks import CLASSIFICATION_TOML, write_jsonl, write_toml
from zoobj.run.config import TrainConfig
from zoobj.run.recipes import DEFAULT_RECIPES, NO_TAIL

pytestmark = pytest.mark.default_recipe

TAIL_SETTINGS = ("peft", "n", "shaping", "lr", "eps", "steps", "batch_size", "smooth")


def settings(cfg: TrainConfig) -> tuple:
    return tuple(getattr(cfg, k) for k in TAIL_SETTINGS)


@pytest.mark.parametrize("task", ["sst2", "sst5", "rte", "cb", "boolq", "wic"])
def test_bundled_classification_tasks_take_the_default_recipe(task):
    cfg = TrainConfig(task=task).resolved()
    recipe = dict(DEFAULT_RECIPES["classification"])
    assert cfg.recipe == "default classification"
    assert settings(cfg) == ("template", recipe["n"], "zscore", 0.2, 0.2, recipe["steps"], recipe["batch_size"], 1.0)


def test_copa_has_no_template_tail_and_trains_a_prefix():
    cfg = TrainConfig(task="copa").resolved()  # its prompts end with "so" or "because", by row
    assert cfg.recipe == "default classification, no template tail"
    assert (cfg.peft, cfg.n, cfg.shaping, cfg.lr, cfg.eps) == ("prefix", 8, "zscore", 1e-2, 1e-1)
    assert cfg.steps == dict(NO_TAIL["classification"])["steps"]


def test_squad_keeps_its_own_recipe():
    cfg = TrainConfig(task="squad").resolved()
    assert cfg.recipe == "task" and (cfg.peft, cfg.steps, cfg.smooth) == ("template", 20, 0.0)


def test_any_flag_given_wins_and_the_cross_entropy_arm_shares_lr_and_eps():
    assert settings(TrainConfig(task="sst2", steps=5, lr=0.05).resolved())[:7] == (
        "template", 8, "zscore", 0.05, 0.2, 5, 16)
    assert TrainConfig(task="sst2", smooth=0.0).resolved().smooth == 0.0  # 0 given: the hard metric
    full = TrainConfig(task="sst2", peft="none").resolved()  # another parameter set: none of the recipe
    assert (full.recipe, full.n, full.shaping, full.lr, full.steps, full.smooth) == (None, 1, "none", 1e-6, 20, 0.0)
    metric, ce = (TrainConfig(task="rte", objective=o).resolved() for o in ("metric", "ce"))
    assert settings(ce) == (*settings(metric)[:-1], 0.0)  # smoothing is the metric's; the rest is shared
    assert metric.scale == ce.scale == "auto"  # the same rule for both arms


def test_the_recipes_scale_auto_yields_to_a_given_lr_or_eps_or_scale():
    assert TrainConfig(task="sst2").resolved().scale == "auto"
    assert TrainConfig(task="sst2", lr=0.3).resolved().scale == 1.0  # the lr given is the lr used
    assert TrainConfig(task="sst2", eps=0.3).resolved().scale == 1.0
    assert TrainConfig(task="sst2", scale="3").resolved().scale == 3.0
    assert TrainConfig(task="squad").resolved().scale == 1.0  # a task's own recipe sets its lr and eps as they are
    with pytest.raises(ConfigError, match="--scale must be a number > 0 or auto, got 'big'"):
        TrainConfig(task="sst2", scale="big").resolved()
    with pytest.raises(ConfigError, match="--scale must be a finite number > 0 or auto, got -1"):
        TrainConfig(task="sst2", scale=-1.0).resolved()
    with pytest.raises(ConfigError, match="choose one"):
        TrainConfig(task="sst2", scale="auto", eps="auto").resolved()


def test_a_user_task_whose_prompts_end_with_the_row_trains_a_prefix(tmp_path, model_dir):
    from zoobj.run.train import run

    rows = [{"text": f"the {w} cat", "label": i % 2} for i, w in enumerate(["red", "blue", "green", "one"] * 6)]
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "test.jsonl", rows[:8])
    path = write_toml(tmp_path, """
        name = "bare"
        data_files = { train = "train.jsonl", validation = "test.jsonl" }
        template = "{text}"
        choices = [" Yes", " No"]
    """)
    cfg = TrainConfig(task=str(path), model=model_dir, output=str(tmp_path / "run"), steps=2, batch_size=4)
    assert cfg.resolved().peft == "prefix"
    result = run(cfg)  # end to end through the fallback
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (config["recipe"], config["peft"], config["n"], result["steps"]) == (
        "default classification, no template tail", "prefix", 8, 2)


COLOURS, NUMBERS = ["red", "blue", "green"], ["one", "two", "three"]


def colour_rows(n: int, seed: int) -> list[dict]:
    """Rows "<word> <word>" labelled 0 when a colour is among them, else 1."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(COLOURS + NUMBERS) for _ in range(2)]
        rows.append({"text": " ".join(words), "label": 0 if set(words) & set(COLOURS) else 1})
    return rows


def test_a_user_toml_task_goes_through_the_default_recipe(tmp_path, model_dir):
    """No training flags: the tail found, lr and eps in its units, dev held out of train,
    dev evaluated before the first step, the best dev step kept (never below the start)."""
    from zoobj.run.train import run

    write_jsonl(tmp_path / "train.jsonl", colour_rows(96, 0))
    write_jsonl(tmp_path / "test.jsonl", colour_rows(24, 1))
    task = str(write_toml(tmp_path, CLASSIFICATION_TOML))
    out = tmp_path / "run"
    result = run(TrainConfig(task=task, model=model_dir, output=str(out), steps=6))  # fewer steps: a tiny model
    config = json.loads((out / "config.json").read_text())
    assert config["recipe"] == "default classification"
    assert (config["peft"], config["n"], config["shaping"], config["smooth"]) == ("template", 8, "zscore", 1.0)
    cal = config["scale_calibration"]  # settings calibrated before the first step, recorded
    assert config["scale"] == cal["scale"] in cal["grid"] and cal["spread"] > 0 and cal["tested"]
    assert config["param_set"]["text"] == "\nTopic:" and config["unit"] > 0
    assert config["keep"] == "best" and config["dev_at_start"]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert any(e["event"] == "note" and "held out" in e["message"] for e in log)  # no dev split of its own
    dev = {e["step"]: e["value"] for e in log if e["event"] == "dev"}
    assert -1 in dev and 5 in dev  # before the first step and after the last
    best = max(dev.items(), key=lambda kv: (kv[1], -kv[0]))  # ties keep the earlier
    assert result["kept_steps"] == best[0] + 1 and best[1] >= dev[-1]

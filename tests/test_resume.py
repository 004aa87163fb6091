"""Resuming from Python: the same dev evaluations as an uninterrupted run, settings that
must match the run's, the recorded noise kernel, and the step numbers curves show."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from zoobj.engine import trajectory as tj
from zoobj.errors import ConfigError
from zoobj.model.loading import load_model
from zoobj.run import export
from zoobj.run import plots
from zoobj.run import train
from zoobj.run.train import TrainConfig, run

BASE = dict(task="sst2", steps=6, batch_size=4, lr=5e-2, eps=1e-2, eval_limit=8, eval_every=2, dev_limit=8,
            keep="best", zero_shot=False)


def dev_events(run_dir):
    return [(r["step"], r["value"]) for r in tj.read_jsonl(run_dir / tj.LOG) if r.get("event") == "dev"]


@pytest.mark.parametrize("cut_at, steps_done, logged", [(1, 0, 0), (3, 4, 2)])
def test_ctrl_c_during_a_dev_evaluation_then_resume_makes_the_same_dev_evaluations(model_dir, tmp_path, monkeypatch,
                                                                                    cut_at, steps_done, logged):
    """Cut during the dev evaluation of the model as given (the first), or during the one
    after step 4 (its trajectory line already written): the resumed run makes the same dev
    evaluations, keeps the same step and ends with the same result."""
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    run(TrainConfig(model=model_dir, output=str(whole), **BASE))

    real, calls = train._evaluate, [0]

    def interrupted(*args, **kw):
        if kw.get("n_resamples") == 200:  # the dev evaluations
            calls[0] += 1
            if calls[0] == cut_at:
                raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(train, "_evaluate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(TrainConfig(model=model_dir, output=str(cut), **BASE))
    assert len(tj.read_trajectory(cut / tj.TRAJECTORY)) == steps_done and len(dev_events(cut)) == logged
    monkeypatch.setattr(train, "_evaluate", real)

    result = run(TrainConfig(model=model_dir, output=str(cut), **BASE), resume=True)
    assert dev_events(cut) == dev_events(whole) and [s for s, _ in dev_events(whole)] == [-1, 1, 3, 5]
    reference = json.loads((whole / tj.EVAL).read_text())
    assert (result["kept_steps"], result["best_dev"], result["value"]) == (
        reference["kept_steps"], reference["best_dev"], reference["value"])
    assert (cut / tj.TRAJECTORY).read_text() == (whole / tj.TRAJECTORY).read_text()


@pytest.mark.parametrize("change", [
    dict(eps=2e-2), dict(rule="momentum"), dict(n=2), dict(objective="ce"), dict(seed=1), dict(batch_size=2),
    dict(train_embeddings=True), dict(peft="lora", lr=1e-2), dict(weight_decay=0.1), dict(metric="macro_f1"),
    dict(eval_every=3), dict(dev_limit=4),
])
def test_resume_from_python_refuses_a_setting_that_changes_the_run(model_dir, tmp_path, change):
    out = tmp_path / "run"
    settings = dict(BASE, steps=2, keep="last")
    run(TrainConfig(model=model_dir, output=str(out), **settings))
    before = (out / tj.TRAJECTORY).read_text()
    changed = next(iter(change))
    with pytest.raises(ConfigError, match=rf"{changed} .*the run's") as err:
        run(TrainConfig(model=model_dir, output=str(out), **{**settings, **change, "steps": 4}), resume=True)
    assert "\n" not in str(err.value)
    assert (out / tj.TRAJECTORY).read_text() == before


def test_resume_from_python_may_raise_the_budget_and_change_keep(model_dir, tmp_path):
    out = tmp_path / "run"
    run(TrainConfig(model=model_dir, output=str(out), **dict(BASE, steps=2, keep="last")))
    result = run(TrainConfig(model=model_dir, output=str(out), **dict(BASE, steps=4, keep="best")), resume=True)
    assert result["steps"] == 4 and json.loads((out / tj.CONFIG).read_text())["keep"] == "best"


def test_curve_plots_steps_and_dev_points_counted_from_1(model_dir, tmp_path, monkeypatch):
    import matplotlib.axes

    out = tmp_path / "run"
    run(TrainConfig(model=model_dir, output=str(out), **dict(BASE, keep="last")))
    plotted = []
    real = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", lambda ax, x, *a, **k: plotted.append(list(x)) or real(ax, x, *a, **k))
    plots.plot_curve(out)
    assert plotted[0] == [1, 2, 3, 4, 5, 6]  # the loss of each step
    assert plotted[1] == [0, 2, 4, 6]  # dev on the model as given, then after steps 2, 4 and 6, as the progress
    # line and eval.json count them
    assert json.loads((out / tj.EVAL).read_text())["kept_steps"] == 6


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_rebuild_replays_with_the_recorded_noise_kernel(model_dir, tmp_path, monkeypatch):
    import zoobj.engine.noise as zn

    out = tmp_path / "eager"
    model, tok = load_model(model_dir)
    monkeypatch.setattr(zn, "KERNEL", zn.EAGER_KERNEL)  # as under ZOOBJ_COMPILE=0
    run(TrainConfig(model=model_dir, output=str(out), noise="gaussian",  # KERNEL: the Gaussian kind's
                    **dict(BASE, keep="last", eval_every=0, lr=5e-1)), model=model, tok=tok)
    trained = _weights(model)
    assert json.loads((out / tj.CONFIG).read_text())["noise_backend"] == "eager"
    monkeypatch.undo()  # the compiled kernel is back: replaying with it would differ in the last bits
    assert zn.KERNEL.compiled_for("cpu") is not None

    _, session = export.rebuild(out)
    assert session.optimizer.noise_backend == "eager"
    rebuilt = _weights(session.model)
    assert all(torch.equal(rebuilt[k], trained[k]) for k in trained)


def test_rebuild_refuses_a_compiled_run_where_compile_is_unavailable(model_dir, tmp_path, monkeypatch):
    import zoobj.engine.noise as zn

    out = tmp_path / "compiled"
    gaussian = dict(BASE, noise="gaussian", keep="last", eval_every=0)  # KERNEL: the Gaussian kind's
    run(TrainConfig(model=model_dir, output=str(out), **dict(gaussian, steps=1)))
    assert json.loads((out / tj.CONFIG).read_text())["noise_backend"] == "compiled"
    monkeypatch.setattr(zn, "KERNEL", zn.Kernel(compile=False))
    with pytest.raises(ConfigError, match="compiled noise kernel, which cannot run here"):
        export.rebuild(out)
    with pytest.raises(ConfigError, match="compiled noise kernel"):
        run(TrainConfig(model=model_dir, output=str(out), **dict(gaussian, steps=2)), resume=True)


def test_a_run_made_with_an_unknown_noise_version_is_refused(model_dir, tmp_path):
    out = tmp_path / "future"
    run(TrainConfig(model=model_dir, output=str(out), **dict(BASE, steps=1, keep="last", eval_every=0)))
    config = json.loads((out / tj.CONFIG).read_text())
    (out / tj.CONFIG).write_text(json.dumps({**config, "noise_version": 99}))
    with pytest.raises(ConfigError, match="noise function version 99, which this zoobj does not have"):
        export.rebuild(out)
    with pytest.raises(ConfigError, match="noise function version 99"):
        run(TrainConfig(model=model_dir, output=str(out), **dict(BASE, steps=2, keep="last", eval_every=0)),
            resume=True)


def test_a_new_run_records_where_its_noise_ran(model_dir, tmp_path):
    out = tmp_path / "run"
    run(TrainConfig(model=model_dir, output=str(out), **dict(BASE, steps=1, keep="last", eval_every=0)))
    config = json.loads((out / tj.CONFIG).read_text())
    assert config["noise_device"] == "cpu" and config["noise_backend"] in ("compiled", "eager")
    assert config["noise_version"] == 1
    assert config["passes"] == "fused"
    assert set(dataclasses.asdict(TrainConfig(task="sst2"))) - set(config) <= {
        "output", "save_model", "zero_shot", "device", "device_map", "report_to"}


def test_a_run_made_before_a_setting_was_recorded_rebuilds_and_resumes(model_dir, tmp_path):
    """config.json without the keys added later (n, shaping, peft, perturb, noise, passes,
    keep, dev_at_start, dev_limit): rebuild and resume take what the run was made with, not
    None, not a task recipe and not today's defaults (Gaussian noise, the best dev step
    kept, the model as given evaluated first, 256 dev rows)."""
    out = tmp_path / "old"
    model, tok = load_model(model_dir)
    run(TrainConfig(model=model_dir, output=str(out), noise="gaussian",
                    **dict(BASE, steps=2, keep="last", eval_every=0, lr=5e-1)), model=model, tok=tok)
    trained = _weights(model)
    config = json.loads((out / tj.CONFIG).read_text())
    for key in ("n", "shaping", "peft", "perturb", "noise", "passes", "keep", "dev_at_start", "dev_limit"):
        del config[key]
    (out / tj.CONFIG).write_text(json.dumps(config))
    from zoobj.run.config import load_run_config

    old = load_run_config(out)
    assert (old.keep, old.dev_at_start, old.dev_limit) == ("last", False, 32)

    _, session = export.rebuild(out)
    assert (session.optimizer.passes, session.optimizer.noise) == ("separate", "gaussian")  # as runs were made then
    rebuilt = _weights(session.model)
    assert all(torch.equal(rebuilt[k], trained[k]) for k in trained)
    resumed = run(TrainConfig(model=model_dir, output=str(out), noise="gaussian", dev_at_start=False,
                              **dict(BASE, steps=3, keep="last", eval_every=0, lr=5e-1, dev_limit=32)), resume=True)
    assert resumed["steps"] == 3


@pytest.mark.parametrize("kind, other", [("rademacher", "gaussian"), ("gaussian", "rademacher")])
def test_a_run_records_its_noise_kind_rebuilds_and_keeps_it_on_resume(model_dir, tmp_path, kind, other):
    out = tmp_path / "signs"
    model, tok = load_model(model_dir)
    run(TrainConfig(model=model_dir, output=str(out), noise=kind,
                    **dict(BASE, steps=2, keep="last", eval_every=0, lr=5e-1)), model=model, tok=tok)
    trained = _weights(model)
    assert json.loads((out / tj.CONFIG).read_text())["noise"] == kind
    _, session = export.rebuild(out)
    rebuilt = _weights(session.model)
    assert all(torch.equal(rebuilt[k], trained[k]) for k in trained)
    with pytest.raises(ConfigError, match=f"noise '{other}' \\(the run's: '{kind}'\\)"):
        run(TrainConfig(model=model_dir, output=str(out), noise=other,
                        **dict(BASE, steps=3, keep="last", eval_every=0, lr=5e-1)), resume=True)
    with pytest.raises(ConfigError, match="unknown --noise 'uniform'; choose one of gaussian, rademacher"):
        TrainConfig(task="sst2", noise="uniform").resolved()


@pytest.mark.parametrize("settings", [dict(objective="metric"), dict(objective="ce", n=2),
                                      dict(task="squad", metric="f1", smooth=1.0, train_max_new_tokens=2,
                                           peft="none", eval_every=2, dev_limit=2, eval_limit=2, batch_size=2,
                                           steps=3)])
def test_updates_held_for_the_next_step_change_nothing_a_run_does(model_dir, tmp_path, monkeypatch, settings):
    """The loop leaves a step's update held for the next step's first pass. Dev evaluations,
    the kept best step, the smoothed objective's answer sets (prepared from the weights)
    and the trajectory are those of a run that writes every update at once."""
    from zoobj.engine.mezo import MeZO

    cfg = dict(BASE, **settings)
    held = run(TrainConfig(model=model_dir, output=str(tmp_path / "held"), **cfg))
    real = MeZO.step
    monkeypatch.setattr(MeZO, "step", lambda self, closure, probes=None, settle=True: real(self, closure, probes))
    at_once = run(TrainConfig(model=model_dir, output=str(tmp_path / "once"), **cfg))
    assert (tmp_path / "held" / tj.TRAJECTORY).read_text() == (tmp_path / "once" / tj.TRAJECTORY).read_text()
    assert dev_events(tmp_path / "held") == dev_events(tmp_path / "once")
    assert (held["value"], held["kept_steps"]) == (at_once["value"], at_once["kept_steps"])


def test_an_interrupt_between_two_steps_leaves_the_trained_weights(model_dir, tmp_path):
    """Ctrl-C after a step whose update is held (here from the progress reporter): the
    weights are written before the run stops, equal to the trajectory's rebuild."""
    out = tmp_path / "cut"
    model, tok = load_model(model_dir)
    steps = []

    def reporter(event, info):
        if event == "step":
            steps.append(info)
            if len(steps) == 3:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(TrainConfig(model=model_dir, output=str(out), **dict(BASE, keep="last", eval_every=0, lr=5e-1)),
            reporter=reporter, model=model, tok=tok)
    assert len(tj.read_trajectory(out / tj.TRAJECTORY)) == 3
    _, session = export.rebuild(out)
    rebuilt = _weights(session.model)
    assert all(torch.equal(v, rebuilt[k]) for k, v in _weights(model).items())

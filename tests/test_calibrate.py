"""--eps auto: zoobj.engine.calibrate.calibrate_eps and its use by a training run."""

from __future__ import annotations

import math

import pytest
import torch

from zoobj.engine.calibrate import CALIBRATION_STEP, calibrate_eps, eps_grid
from zoobj.engine.noise import noise, step_seed


class Flips(torch.nn.Module):
    """A linear classifier's error count on fixed data: a loss with plateaus."""

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.lin = torch.nn.Linear(16, 1)
        with torch.no_grad():
            self.lin.weight.copy_(torch.randn(1, 16, generator=g))
            self.lin.bias.zero_()
        self.x = torch.randn(64, 16, generator=g)
        self.y = torch.randn(64, generator=g) > 0

    def forward(self):
        return float(((self.lin(self.x).squeeze(1) > 0) != self.y).sum())


def direct_ties(model: Flips, eps: float, probes: int, seed: int = 0) -> int:
    """Ties at ``eps``, counted by hand: l(theta + eps z) == l(theta - eps z) for each probe direction."""
    params = [model.lin.weight, model.lin.bias]
    base = [p.detach().clone() for p in params]
    ties = 0
    for j in range(probes):
        s = step_seed(seed, CALIBRATION_STEP, j)
        losses = []
        for sign in (1, -1):
            with torch.no_grad():
                for i, (p, b) in enumerate(zip(params, base)):
                    p.copy_(b + sign * eps * noise(p.numel(), s, index=i).view_as(p))
            losses.append(model())
        ties += losses[0] == losses[1]
    with torch.no_grad():
        for p, b in zip(params, base):
            p.copy_(b)
    return ties


@pytest.mark.parametrize("hooks", [True, False], ids=["forward-hooks", "in-place"])
def test_picks_the_smallest_grid_value_with_at_most_a_quarter_tied_and_leaves_the_weights_exact(hooks):
    model = Flips()
    params = [model.lin.weight, model.lin.bias]
    before = [p.detach().clone() for p in params]
    grid = eps_grid(1e-3)
    cal = calibrate_eps(params, [model] * 8, grid, seed=0, model=model if hooks else None)
    for p, b in zip(params, before):
        assert torch.equal(p, b)  # bit for bit
    counted = [direct_ties(model, e, 8) for e in grid]
    assert cal.eps == min(e for e, t in zip(grid, counted) if t <= 2)
    assert counted[0] > 2  # the smallest value ties too often: the choice is not the trivial one
    assert len(cal.tested) <= math.ceil(math.log2(len(grid) + 1))  # bisection
    for row in cal.tested:
        assert row["ties"] + row["saturated"] == counted[grid.index(row["eps"])]


def test_a_loss_no_perturbation_changes_gives_no_eps_and_says_what_it_tried():
    w = torch.zeros(4)
    cal = calibrate_eps([w], [lambda: 1.0] * 8, [1e-3, 1e-2, 1e-1])
    assert cal.eps is None
    assert [row["eps"] for row in cal.tested][-1] == 1e-1 and all(row["ties"] == 8 for row in cal.tested)
    assert torch.equal(w, torch.zeros(4))


def test_non_finite_losses_count_against_a_value():
    w = torch.zeros(8)
    loss = lambda: math.nan if float(w.abs().max()) > 0.5 else float(w[0])  # noqa: E731  never tied, nan when far
    assert calibrate_eps([w], [loss] * 8, [1e-3, 1e-2]).eps == 1e-3
    cal = calibrate_eps([w], [loss] * 8, [1e-3, 1.0, 10.0])  # bisection starts at 1.0: all nan, so look lower
    assert cal.eps == 1e-3
    assert cal.tested == [{"eps": 1.0, "ties": 0, "saturated": 0, "nonfinite": 8},
                          {"eps": 1e-3, "ties": 0, "saturated": 0, "nonfinite": 0}]
    assert calibrate_eps([w], [loss] * 8, [1.0, 10.0]).eps is None


def test_ties_away_from_the_unperturbed_loss_mean_too_large():
    """A bounded metric saturates: two garbled answers both score 0, l+ == l- again, but
    not at the unperturbed value. Such a tie sends the search lower, not higher."""
    w = torch.zeros(8)

    def loss():
        if float(w.abs().max()) > 1:  # garbled on both sides alike
            return 1.0
        return float(w[0] > 0.01)  # flips once the shift is large enough

    cal = calibrate_eps([w], [loss] * 8, [1e-3, 0.1, 10.0, 100.0, 1000.0])
    assert cal.tested[0] == {"eps": 10.0, "ties": 0, "saturated": 8, "nonfinite": 0}
    assert cal.eps == 0.1
    assert calibrate_eps([w], [loss] * 8, [10.0, 100.0]).eps is None


def test_a_closure_that_raises_leaves_the_weights_exact():
    model = Flips()
    before = model.lin.weight.detach().clone()
    calls = []

    def boom():
        calls.append(1)
        if len(calls) == 8 + 3:  # after the 8 unperturbed losses: mid-probe, weights shifted
            raise KeyboardInterrupt
        return model()

    for hooks in (model, None):
        calls.clear()
        with pytest.raises(KeyboardInterrupt):
            calibrate_eps([model.lin.weight, model.lin.bias], [boom] * 8, [1e-2], model=hooks)
        assert torch.equal(model.lin.weight, before)
        assert not model.lin._forward_pre_hooks and not model.lin._forward_hooks


def test_a_tensor_outside_any_modules_forward_falls_back_to_in_place_shifts():
    model = Flips()
    free = torch.zeros(16)  # used by the closure, owned by no module
    loss = lambda: model() + float((free > 0.02).sum())  # noqa: E731
    cal = calibrate_eps([model.lin.weight, free], [loss] * 8, eps_grid(1e-3), model=model)
    assert cal.eps is not None and torch.equal(free, torch.zeros(16))


def test_eps_grid_is_half_decades_around_the_default():
    assert eps_grid(1e-2) == [0.01, 0.0316, 0.1, 0.316, 1.0]
    with pytest.raises(ValueError, match="finite values > 0"):
        calibrate_eps([torch.zeros(2)], [lambda: 0.0], [0.0, 1.0])


# ----------------------------------------------------------------------------- in a run

SETTINGS = dict(task="sst2", metric="accuracy", objective="metric", steps=2, batch_size=8, lr=1e-3,
                eval_limit=4, eval_every=0, zero_shot=False)


def test_a_run_with_eps_auto_records_the_calibration_and_resumes_and_rebuilds_with_it(model_dir, tmp_path):
    from zoobj.engine import trajectory as tj
    from zoobj.run.export import rebuild
    from zoobj.run.train import TrainConfig, run

    out = tmp_path / "auto"
    run(TrainConfig(output=str(out), model=model_dir, eps="auto", **SETTINGS))
    saved = tj.read_json(out / tj.CONFIG)
    cal = saved["eps_calibration"]
    assert saved["eps"] == cal["eps"] and cal["eps"] in cal["grid"] and cal["probes"] == 8
    assert cal["grid"] == eps_grid(1e-3)  # from the full-parameter default up
    logged = [x for x in tj.read_jsonl(out / tj.LOG) if x.get("event") == "eps_auto"]
    assert logged and logged[0]["eps"] == cal["eps"]
    # the run is the run with that eps given
    given = tmp_path / "given"
    run(TrainConfig(output=str(given), model=model_dir, eps=cal["eps"], **SETTINGS))
    assert tj.read_trajectory(given / tj.TRAJECTORY) == tj.read_trajectory(out / tj.TRAJECTORY)
    # resumed with eps="auto" (or its value): the calibrated eps stands, nothing is probed again
    run(TrainConfig(output=str(out), model=model_dir, eps="auto", **{**SETTINGS, "steps": 3}), resume=True)
    assert len(tj.read_trajectory(out / tj.TRAJECTORY)) == 3
    assert len([x for x in tj.read_jsonl(out / tj.LOG) if x.get("event") == "eps_auto"]) == 1
    run(TrainConfig(output=str(given), model=model_dir, eps=cal["eps"], **{**SETTINGS, "steps": 3}), resume=True)
    assert tj.read_trajectory(given / tj.TRAJECTORY) == tj.read_trajectory(out / tj.TRAJECTORY)
    (_, ours), (_, theirs) = rebuild(out), rebuild(given)
    for a, b in zip(ours.params, theirs.params, strict=True):
        assert torch.equal(a, b)


def test_a_metric_nothing_unties_is_one_line_naming_the_levers_and_leaves_no_run_dir(model_dir, tmp_path):
    from zoobj.errors import ConfigError
    from zoobj.run.train import TrainConfig, run

    reward = tmp_path / "flat.py"
    reward.write_text("def constant(predictions, references, **kw):\n    return 0.5\n")
    out = tmp_path / "flat"
    with pytest.raises(ConfigError) as err:
        run(TrainConfig(output=str(out), model=model_dir, eps="auto",
                        **{**SETTINGS, "metric": f"{reward}:constant"}))
    message = str(err.value)
    assert "\n" not in message and "--eps auto: no eps from 0.001 to 0.1 changed" in message
    for lever in ("--batch-size", "--smooth", "finer steps", "--eps N"):
        assert lever in message
    assert not out.exists()


def test_eps_must_be_a_number_or_auto():
    from zoobj.errors import ConfigError
    from zoobj.run.config import TrainConfig

    assert TrainConfig(task="sst2", eps="0.01").resolved().eps == 0.01
    assert TrainConfig(task="sst2", eps="AUTO").resolved().eps == "auto"
    with pytest.raises(ConfigError, match="--eps must be a number > 0 or auto, got 'big'"):
        TrainConfig(task="sst2", eps="big").resolved()


def test_the_command_line_takes_eps_auto_and_resumes_such_a_run_with_or_without_it(model_dir, tmp_path, capsys):
    from tests.test_cli import cli
    from zoobj.engine import trajectory as tj

    out = tmp_path / "cli"
    flags = ["--task", "sst2", "--metric", "accuracy", "--batch-size", "8", "--eval-limit", "4", "--eval-every", "0",
             "--lr", "1e-3", "--model", model_dir]
    assert cli("train", *flags, "--eps", "auto", "--steps", "1", "--output", out) == 0
    assert "--eps auto: eps" in capsys.readouterr().err
    eps = tj.read_json(out / tj.CONFIG)["eps"]
    assert cli("train", "--resume", out, "--eps", "auto", "--steps", "2") == 0
    assert cli("train", "--resume", out, "--eps", str(eps), "--steps", "3") == 0
    assert len(tj.read_trajectory(out / tj.TRAJECTORY)) == 3
    assert cli("train", "--resume", out, "--eps", str(eps * 10), "--steps", "4") == 2
    assert "contradicts the run's" in capsys.readouterr().err


def test_compare_calibrates_each_arm_and_cross_entropy_keeps_the_default(model_dir, tmp_path, capsys):
    from tests.test_cli import cli
    from zoobj.engine import trajectory as tj

    out = tmp_path / "cmp"
    assert cli("compare", "--task", "sst2", "--metric", "accuracy", "--model", model_dir, "--steps", "1",
               "--batch-size", "8", "--eval-limit", "4", "--lr", "1e-3", "--eps", "auto", "--output", out) == 0
    ce, metric = tj.read_json(out / "ce" / tj.CONFIG), tj.read_json(out / "metric" / tj.CONFIG)
    assert ce["eps"] == 1e-3 and ce["eps_calibration"]["tested"][-1]["ties"] == 0  # cross-entropy never ties
    assert metric["eps"] == metric["eps_calibration"]["eps"]
    report = (out / "report.md").read_text()
    assert "| 0.001 (auto) |" in report and f"| {metric['eps']:g} (auto) |" in report


def test_eps_auto_with_smooth_builds_each_answer_set_at_the_unperturbed_weights(monkeypatch):
    """--eps auto with --smooth on generation: every calibration batch's answer set comes
    from the weights before any probe (was: from whatever perturbed point first met it)."""
    from tests.tiny import tiny_gemma, tiny_tokenizer
    from zoobj.model.params import make_param_set
    from zoobj.run import train
    from zoobj.run.objective import predict
    from zoobj.run.train import TrainConfig, calibrate_run_eps
    from zoobj.tasks import get_task

    tok = tiny_tokenizer()
    model = tiny_gemma(len(tok), seed=3, layers=2, sliding_window=4096)
    task = get_task("squad")
    rows = task.load("train")[:24]
    cfg = TrainConfig(task="squad", metric="f1", smooth=1.0, batch_size=3, eps="auto", peft="none",
                      train_max_new_tokens=3, shared=False).resolved()
    param_set = make_param_set("none")
    model, named = param_set.attach(model, tok)
    params = [p for _, p in named]
    made, real = [], train.make_objective
    monkeypatch.setattr(train, "make_objective", lambda *a, **kw: made.append(real(*a, **kw)) or made[-1])
    try:
        calibrate_run_eps(cfg, model, tok, params, param_set, task, rows, None, lambda event, info: None)
    except Exception:  # whether some eps unties F1 on this tiny model does not matter here
        pass
    objective = made[0]
    batches = [[rows[i] for i in train.batch_indices(cfg.seed, step, cfg.batch_size, len(rows))] for step in range(8)]
    for b in batches:
        base = predict(model, tok, task, b, max_new_tokens=3)
        held = objective.held[tuple(task.prompt(r) for r in b)]  # prepared during the calibration, not now
        assert [t[0] for t in held.texts] == [g.strip() or t[0] for g, t in zip(base, held.texts)]


def linear_losses(sensitivity: float, w: torch.Tensor) -> list:
    """Eight batches' losses: an offset each (the spread over batches) plus a linear answer
    to the weights, ``sensitivity`` times as strong."""
    g = torch.Generator().manual_seed(7)
    return [lambda o=float(o), v=torch.randn(w.shape, generator=g): o + sensitivity * float((w * v).sum())
            for o in torch.randn(8, generator=g)]


@pytest.mark.parametrize("hooks", [True, False], ids=["probes-together", "one-by-one"])
def test_scale_auto_grows_the_step_as_much_as_the_model_answers_less(hooks):
    from zoobj.engine.calibrate import calibrate_scale

    w = torch.zeros(32)
    strong, weak = linear_losses(1.0, w), linear_losses(0.25, w)
    r1 = calibrate_scale([w], strong, 0.01, grid=[1.0], target=0.0).tested[0]["response"]  # at x1, the strong loss
    assert r1 > 0
    probes = None
    if hooks:  # the closures' points together, as an objective's probes give them
        def together(closure):
            def at(points):
                base = w.clone()
                out = []
                for p in points:
                    w.copy_(p[0])
                    out.append(closure())
                w.copy_(base)
                return out
            return at
        probes = [together(c) for c in weak]
    found = calibrate_scale([w], weak, 0.01, target=0.99 * r1, probes=probes)
    assert found.scale == 4.0 and found.why is None  # a quarter the answer: four times the step
    assert [t["scale"] for t in found.tested] == [1.0, 4.0, 3.0]  # 1, the guess from 1's response, the one below
    assert [t["scale"] for t in calibrate_scale([w], strong, 0.01, target=0.99 * r1).tested] == [1.0]  # one round
    assert bool((w == 0).all())  # the weights as they were
    flat = calibrate_scale([w], [lambda: 1.0] * 4, 0.01)
    assert flat.scale == 1.0 and "no spread" in flat.why
    deaf = calibrate_scale([w], linear_losses(1e-9, w), 0.01)
    assert deaf.scale == 8.0 and "no factor up to 8" in deaf.why


def test_a_run_with_scale_auto_records_it_and_is_the_run_given_that_scale(model_dir, tmp_path):
    from zoobj.engine import trajectory as tj
    from zoobj.run.export import rebuild
    from zoobj.run.train import TrainConfig, run

    out = tmp_path / "auto"
    run(TrainConfig(output=str(out), model=model_dir, scale="auto", eps=1e-3, **SETTINGS))
    saved = tj.read_json(out / tj.CONFIG)
    cal = saved["scale_calibration"]
    assert saved["scale"] == cal["scale"] in cal["grid"] and cal["directions"] == 4
    assert [x for x in tj.read_jsonl(out / tj.LOG) if x.get("event") == "scale_auto"][0]["scale"] == cal["scale"]
    given = tmp_path / "given"
    run(TrainConfig(output=str(given), model=model_dir, scale=cal["scale"], eps=1e-3, **SETTINGS))
    assert tj.read_trajectory(given / tj.TRAJECTORY) == tj.read_trajectory(out / tj.TRAJECTORY)
    run(TrainConfig(output=str(out), model=model_dir, scale="auto", eps=1e-3, **{**SETTINGS, "steps": 3}), resume=True)
    assert len([x for x in tj.read_jsonl(out / tj.LOG) if x.get("event") == "scale_auto"]) == 1  # not probed again
    run(TrainConfig(output=str(given), model=model_dir, scale=cal["scale"], eps=1e-3, **{**SETTINGS, "steps": 3}),
        resume=True)
    assert tj.read_trajectory(given / tj.TRAJECTORY) == tj.read_trajectory(out / tj.TRAJECTORY)
    (_, ours), (_, theirs) = rebuild(out), rebuild(given)
    for a, b in zip(ours.params, theirs.params, strict=True):
        assert torch.equal(a, b)

"""The MeZO engine: descent, restore, determinism, safety, replay."""

import math
import signal

import pytest
import torch

from zoobj import MeZO, NonFiniteLossError, decay_groups, replay
from zoobj.engine.mezo import RECORD_KEYS, noise, step_seed


def least_squares(seed=0, n=64, d=8):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, d, generator=g)
    x_true = torch.randn(d, generator=g)
    b = A @ x_true
    w = torch.zeros(d)
    return A, b, w, lambda: ((A @ w - b) ** 2).mean()


def test_descends_on_least_squares():
    A, b, w, loss = least_squares()
    start = float(loss())
    opt = MeZO([w], lr=0.01, eps=1e-3, seed=1)
    for _ in range(400):
        opt.step(loss)
    assert float(loss()) < 0.05 * start


@pytest.mark.parametrize("rule", ["momentum", "adam"])
def test_stateful_rules_descend(rule):
    A, b, w, loss = least_squares()
    start = float(loss())
    lr = 0.002 if rule == "momentum" else 0.02
    opt = MeZO([w], lr=lr, eps=1e-3, seed=1, rule=rule)
    for _ in range(400):
        opt.step(loss)
    assert float(loss()) < 0.2 * start
    assert set(opt.state[0]) >= {"exp_avg"}


def test_n_spsa_descends_and_records_n_seeds():
    A, b, w, loss = least_squares()
    start = float(loss())
    opt = MeZO([w], lr=0.01, eps=1e-3, seed=3, n=4)
    for _ in range(150):
        opt.step(loss)
    assert float(loss()) < 0.2 * start
    rec = opt.trajectory[-1]
    assert len(rec["seeds"]) == len(rec["grads"]) == len(rec["loss_plus"]) == 4
    assert len(set(rec["seeds"])) == 4


def test_lr_zero_restores_weights():
    torch.manual_seed(0)
    ws = [torch.randn(1000), torch.randn(30, 40)]
    before = [w.clone() for w in ws]
    opt = MeZO(ws, lr=0.0, eps=1e-3, seed=5, n=2)
    for _ in range(20):
        opt.step(lambda: sum((w**2).sum() for w in ws))
    # 60 in-place passes of +-eps*z: only float32 rounding may remain
    for w, w0 in zip(ws, before):
        torch.testing.assert_close(w, w0, rtol=2e-6, atol=1e-6)


def test_parameters_change_and_records_are_complete():
    w = torch.ones(10)
    opt = MeZO([w], lr=0.1, eps=1e-2, seed=0)
    w0 = w.clone()
    loss = opt.step(lambda: (w**2).sum())
    assert not torch.equal(w, w0)
    rec = opt.trajectory[0]
    assert set(rec) == set(RECORD_KEYS)
    assert rec["step"] == 0 and rec["lr"] == 0.1 and rec["skipped"] is False
    assert rec["ties"] == 0
    lp, lm = rec["loss_plus"][0], rec["loss_minus"][0]
    assert math.isclose(loss, (lp + lm) / 2, rel_tol=1e-6)
    assert math.isclose(rec["grads"][0], (lp - lm) / 2e-2, rel_tol=1e-5)
    assert len(__import__("json").dumps(rec)) < 200


def run(seed, steps=10, threads=None):
    if threads:
        torch.set_num_threads(threads)
    A, b, w, loss = least_squares()
    opt = MeZO([w], lr=0.01, eps=1e-3, seed=seed)
    for _ in range(steps):
        opt.step(loss)
    return w, opt.trajectory


def test_same_seed_same_trajectory_and_weights():
    w1, t1 = run(7)
    w2, t2 = run(7)
    w3, t3 = run(8)
    assert torch.equal(w1, w2) and t1 == t2
    assert not torch.equal(w1, w3)
    assert [r["seeds"] for r in t1] != [r["seeds"] for r in t3]


def test_noise_independent_of_thread_count():
    torch.set_num_threads(1)
    z1 = noise((300, 1000), seed=123, index=2)
    torch.set_num_threads(2)
    z2 = noise((300, 1000), seed=123, index=2)
    assert torch.equal(z1, z2)
    w1, t1 = run(4, threads=1)
    w2, t2 = run(4, threads=2)
    assert torch.equal(w1, w2) and t1 == t2


def test_noise_is_standard_normal_and_varies_by_seed_and_index():
    z = noise(200_000, seed=1)
    assert abs(float(z.mean())) < 0.01
    assert abs(float(z.std()) - 1) < 0.01
    assert abs(float((z**4).mean()) - 3) < 0.1  # Gaussian kurtosis
    other_seed, other_index = noise(200_000, seed=2), noise(200_000, seed=1, index=1)
    assert abs(float((z * other_seed).mean())) < 0.01
    assert abs(float((z * other_index).mean())) < 0.01


def _hash32_int64(x):  # the noise hash as it was first written: int64 lanes, masked to 32 bits
    for _ in range(2):
        x = x ^ (x >> 16)
        x = (x * 0x45D9F3B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def test_int32_noise_hash_gives_the_bits_of_the_int64_hash():
    import zoobj.engine.noise as zn

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 2**32, (200_000,), dtype=torch.int64, generator=g)
    x[:4] = torch.tensor([0, 2**31 - 1, 2**31, 2**32 - 1])
    as_int32 = torch.where(x >= 2**31, x - 2**32, x).to(torch.int32)
    assert torch.equal(zn._hash32(as_int32).to(torch.int64) & 0xFFFFFFFF, _hash32_int64(x))
    assert zn.NOISE_VERSION in zn.NOISE_VERSIONS


def test_noise_is_the_int64_formula_up_to_the_top_of_a_span():
    import math

    import zoobj.engine.noise as zn

    seed, index, offset, n = 2**32 - 3, 5, 2**31 - 3000, 3000  # indices up to the last of a span
    k1, k2 = zn._param_key(seed, index, 0)
    i = torch.arange(n, dtype=torch.int64) + offset
    u = _hash32_int64(i ^ k1)
    v = _hash32_int64(u ^ k2)
    u1 = ((u >> 8).to(torch.float32) + 0.5) * (2.0**-24)
    u2 = (v >> 8).to(torch.float32) * (2.0**-24)
    want = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)
    got = torch.zeros(n)
    zn.chunk_axpz(got, seed, index, offset, 1.0, zn.EAGER_KERNEL)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    compiled = torch.zeros(n)
    zn.chunk_axpz(compiled, seed, index, offset, 1.0, zn.KERNEL)
    torch.testing.assert_close(compiled, want, rtol=1e-5, atol=1e-6)


def test_step_seed_is_pure():
    assert step_seed(3, 10, 1) == step_seed(3, 10, 1)
    assert len({step_seed(0, t) for t in range(1000)}) == 1000
    assert all(0 <= step_seed(s, t) < 2**32 for s in range(3) for t in range(3))


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("fail_on_call", [1, 2])
@pytest.mark.parametrize("exc", [Boom, KeyboardInterrupt])
def test_exception_in_closure_restores_weights(fail_on_call, exc):
    torch.manual_seed(0)
    w = torch.randn(50)
    opt = MeZO([w], lr=0.1, eps=0.5, seed=0)
    opt.step(lambda: (w**2).sum())
    w0 = w.clone()
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == fail_on_call:
            raise exc("stop")
        return (w**2).sum()

    with pytest.raises(exc):
        opt.step(closure)
    torch.testing.assert_close(w, w0, rtol=0, atol=1e-6)
    assert len(opt.trajectory) == 1 and opt.step_count == 1


def test_sigint_during_closure_restores_weights():
    w = torch.randn(100)
    w0 = w.clone()
    opt = MeZO([w], lr=0.1, eps=0.5, seed=0)

    def closure():  # a real SIGINT, to this thread: Python's handler raises in this call, not at a later check
        signal.raise_signal(signal.SIGINT)
        return (w**2).sum()

    # Python's own handler, also where the suite was started with SIGINT ignored (nohup, a background job)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            opt.step(closure)
    finally:
        signal.signal(signal.SIGINT, before)
    torch.testing.assert_close(w, w0, rtol=0, atol=1e-6)
    assert opt.trajectory == []


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_loss_skips_update(bad):
    w = torch.randn(20)
    w0 = w.clone()
    opt = MeZO([w], lr=0.1, eps=1e-2)
    calls = []

    def closure():
        calls.append(1)
        return bad if len(calls) == 2 else (w**2).sum()

    opt.step(closure)
    torch.testing.assert_close(w, w0, rtol=0, atol=1e-6)
    rec = opt.trajectory[0]
    assert rec["skipped"] is True and rec["grads"] == [0.0] and rec["loss_minus"] == [None]
    opt.step(lambda: (w**2).sum())  # training goes on
    assert opt.trajectory[1]["skipped"] is False


def test_non_finite_loss_can_raise():
    w = torch.randn(20)
    w0 = w.clone()
    opt = MeZO([w], lr=0.1, eps=1e-2, on_nonfinite="raise")
    with pytest.raises(NonFiniteLossError):
        opt.step(lambda: float("nan"))
    torch.testing.assert_close(w, w0, rtol=0, atol=1e-6)
    assert opt.trajectory == []


def test_closure_returning_non_number_is_a_type_error_and_restores():
    w = torch.randn(20)
    w0 = w.clone()
    opt = MeZO([w], lr=0.1, eps=1e-2)
    with pytest.raises(TypeError, match="float or a 0-dim tensor"):
        opt.step(lambda: "0.5")
    torch.testing.assert_close(w, w0, rtol=0, atol=1e-6)


def test_ties_are_counted():
    w = torch.randn(5)
    opt = MeZO([w], lr=0.1, eps=1e-3, n=3)
    opt.step(lambda: 1.0)  # a constant objective: l+ == l- every time
    assert opt.trajectory[0]["ties"] == 3 and opt.trajectory[0]["grads"] == [0.0] * 3


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(rule="sgd"),
        dict(rule="sgd", n=3, weight_decay=0.1),
        dict(rule="momentum"),
        dict(rule="adam", n=2),
    ],
)
def test_replay_reproduces_trained_weights_exactly(kwargs):
    torch.manual_seed(0)
    base = [torch.randn(40), torch.randn(8, 5)]
    ws = [b.clone() for b in base]
    settings = dict(lr=0.01, eps=1e-3, seed=11, **kwargs)
    opt = MeZO(ws, **settings)
    calls = []

    def closure():
        calls.append(1)
        return float("nan") if len(calls) == 7 else sum((w**2).sum() for w in ws)

    for _ in range(12):
        opt.step(closure)
    assert any(r["skipped"] for r in opt.trajectory)
    rebuilt = [b.clone() for b in base]
    again = replay(rebuilt, opt.trajectory, **settings)
    for w, r in zip(ws, rebuilt):
        assert torch.equal(w, r)
    assert again.step_count == 12
    # and it continues exactly as the original would have
    opt.step(lambda: sum((w**2).sum() for w in ws))
    again.step(lambda: sum((w**2).sum() for w in rebuilt))
    assert opt.trajectory[-1] == again.trajectory[-1]


def test_replay_rejects_out_of_order_records():
    w = torch.zeros(3)
    opt = MeZO([w], lr=0.1)
    with pytest.raises(ValueError, match="step 5"):
        opt.replay([{"step": 5, "seeds": [1], "grads": [0.0], "lr": 0.1, "loss_plus": [0.0],
                     "loss_minus": [0.0], "ties": 1, "skipped": False}])


def test_param_groups_lr_weight_decay_and_frozen():
    a, b = torch.ones(100), torch.ones(100)
    frozen = torch.nn.Parameter(torch.ones(10), requires_grad=False)
    opt = MeZO([{"params": [a], "lr": 0.0, "weight_decay": 0.5}, {"params": [b, frozen]}], lr=0.1)
    opt.step(lambda: float((a**2).sum() + (b**2).sum()))
    torch.testing.assert_close(a, torch.ones(100), rtol=0, atol=1e-6)  # group lr 0: no decay either
    assert not torch.allclose(b, torch.ones(100))
    assert torch.equal(frozen, torch.ones(10))

    # weight decay alone shrinks the weights: a zero objective gives g = 0
    c = torch.ones(100)
    MeZO([c], lr=0.1, weight_decay=0.5).step(lambda: 0.0)
    torch.testing.assert_close(c, torch.full((100,), 0.95), rtol=0, atol=1e-6)


def test_schedule_sets_recorded_lr():
    w = torch.ones(4)
    opt = MeZO([w], lr=0.1, schedule=lambda t: 1.0 / (1 + t))
    for _ in range(3):
        opt.step(lambda: (w**2).sum())
    assert [r["lr"] for r in opt.trajectory] == [0.1, 0.05, pytest.approx(0.033333333)]


def test_decay_groups_leave_out_bias_and_norm():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    decay, no_decay = decay_groups(model.named_parameters(), 0.01)
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 4]), torch.Size([2, 4])]
    assert len(no_decay["params"]) == 4 and no_decay["weight_decay"] == 0.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lr=-1.0), "lr"),
        (dict(eps=0.0), "eps"),
        (dict(n=0), "n must"),
        (dict(rule="sign"), "sgd, momentum, adam"),
        (dict(on_nonfinite="ignore"), "on_nonfinite"),
    ],
)
def test_bad_settings_are_value_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MeZO([torch.zeros(2)], **{"lr": 0.1, **kwargs})


def test_bad_params():
    with pytest.raises(ValueError, match="empty"):
        MeZO([], lr=0.1)
    with pytest.raises(TypeError):
        MeZO(torch.zeros(3), lr=0.1)
    with pytest.raises(TypeError, match="floating-point"):
        MeZO([torch.zeros(3, dtype=torch.int64)], lr=0.1)


def test_state_dict_round_trip():
    A, b, w, loss = least_squares()
    opt = MeZO([w], lr=0.002, rule="momentum")
    for _ in range(3):
        opt.step(loss)
    sd = opt.state_dict()
    other = MeZO([w.clone()], lr=0.002, rule="momentum")
    other.load_state_dict(sd)
    assert other.step_count == 3 and torch.equal(other.state[0]["exp_avg"], opt.state[0]["exp_avg"])
    with pytest.raises(ValueError, match="rule"):
        MeZO([w.clone()], lr=0.002, rule="adam").load_state_dict(sd)


def test_eager_noise_matches_compiled(monkeypatch):
    import zoobj.engine.noise as zn

    compiled = zn.noise((3, 1000), seed=9, index=4)
    monkeypatch.setenv("ZOOBJ_COMPILE", "0")
    eager_kernel = zn.Kernel()
    monkeypatch.setattr(zn, "KERNEL", eager_kernel)
    monkeypatch.setattr(zn, "_EAGER_CHUNK", 256)  # several chunks, offsets exercised
    eager = zn.noise((3, 1000), seed=9, index=4)
    assert eager_kernel.backend == "eager"
    torch.testing.assert_close(eager, compiled, rtol=1e-5, atol=1e-5)


def test_tiny_causal_lm_cross_entropy_falls():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (8, 16))

    def loss():
        with torch.no_grad():
            return model(input_ids=ids, labels=ids).loss

    before = {n: p.clone() for n, p in model.named_parameters()}
    start = float(loss())
    opt = MeZO(model.parameters(), lr=3e-3, eps=1e-3, seed=0)
    for _ in range(200):
        opt.step(loss)
    assert float(loss()) < start - 0.15
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("held", [False, True])  # True: each update held for the next step's first pass
def test_probes_together_see_the_points_one_by_one_would_and_leave_the_same_weights(held):
    seen = {}
    for way in ("closure", "probes"):
        x = torch.linspace(-1.0, 1.0, 7)
        opt = MeZO([x], lr=0.05, eps=1e-2, seed=3, n=2)
        got = []
        closure = lambda: (got.append(x.clone()), float((x ** 2).sum()))[1]  # noqa: E731
        probes = lambda pts: [(got.append(p[0]), float((p[0] ** 2).sum()))[1] for p in pts]  # noqa: E731
        for t in range(3):
            opt.step(closure, probes=probes if way == "probes" else None, settle=not held or t == 2)
        seen[way] = (got, x.clone(), [r["grads"] for r in opt.trajectory])
    assert len(seen["probes"][0]) == len(seen["closure"][0]) == 12
    assert all(torch.equal(a, b) for a, b in zip(seen["probes"][0], seen["closure"][0]))
    assert torch.equal(seen["probes"][1], seen["closure"][1]) and seen["probes"][2] == seen["closure"][2]


def test_probes_that_decline_fall_back_and_a_wrong_count_is_named():
    x = torch.ones(3)
    opt = MeZO([x], lr=0.1, eps=1e-2, seed=0, n=2)
    calls = []
    opt.step(lambda: (calls.append(1), float(x.sum()))[1], probes=lambda pts: None)
    assert len(calls) == 4  # declined: the closure evaluated all four points
    before = x.clone()
    with pytest.raises(ValueError, match="probes returned 3 losses for 4 points"):
        opt.step(lambda: 0.0, probes=lambda pts: [0.0, 0.0, 0.0])
    assert torch.equal(x, before) and opt.step_count == 1  # nothing was written, no step recorded


@pytest.mark.parametrize("together", [False, True])
def test_an_interrupt_between_the_last_probe_and_the_update_restores_the_weights(monkeypatch, together):
    """n = 1, sgd, in place: the restore is fused into the update, so after the last probe
    the weights sit at theta - eps z until the commit. An interrupt in between (here from
    the estimate) must still put them back."""
    import zoobj.engine.mezo as mezo_module

    w = torch.randn(64)
    w0 = w.clone()
    opt = MeZO([w], lr=0.1, eps=0.5, seed=0)

    def interrupted(*args, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(mezo_module, "coefficients", interrupted)
    probes = (lambda points: [float((p[0] ** 2).sum()) for p in points]) if together else None
    with pytest.raises(KeyboardInterrupt):
        opt.step(lambda: (w**2).sum(), probes=probes)
    torch.testing.assert_close(w, w0, rtol=0, atol=1e-6)
    assert opt.trajectory == [] and opt.step_count == 0
    monkeypatch.undo()
    opt.step(lambda: (w**2).sum())  # and the next step starts from theta
    assert opt.trajectory[0]["step"] == 0


def test_probes_that_decline_cost_no_copy_of_the_trained_tensors(monkeypatch):
    """``MeZO.step(probes=)`` makes the 2n points only when the function looks at them."""
    from zoobj.engine.perturb import InPlace

    made, real = [], InPlace.points

    def counted(self, seeds):
        made.append(len(seeds))
        return real(self, seeds)

    monkeypatch.setattr(InPlace, "points", counted)
    w = torch.randn(1000)
    opt = MeZO([w], lr=0.1, eps=1e-2, n=4, seed=0)
    opt.step(lambda: (w**2).sum(), probes=lambda points: None if len(points) == 8 else 1 / 0)
    assert made == [] and len(opt.trajectory) == 1
    opt.step(lambda: (w**2).sum(), probes=lambda points: [float((p[0] ** 2).sum()) for p in points])
    assert made == [4]


def _mueller(x: int) -> int:
    for _ in range(2):
        x = (((x >> 16) ^ x) * 0x45D9F3B) & 0xFFFFFFFF
    return (x >> 16) ^ x


@pytest.mark.parametrize("backend", ["auto", "eager"])
def test_a_rademacher_direction_is_bit_8_of_the_mueller_hash_of_its_index(backend):
    """The definition runs record: element i of z is -1 where bit 8 of the unsigned 32-bit
    Mueller hash of (i xor k1) is set, k1 the parameter's first key; written here in plain
    Python, so a faster form of the kernel cannot change a recorded run's directions."""
    from zoobj.engine.noise import _param_key, kernel_for

    for seed, index in ((7, 0), (2**40 + 3, 5)):
        k1 = _param_key(seed, index, 0)[0]
        z = torch.zeros(70_001)
        kernel_for(backend, "rademacher")(z, seed, index, 0.0, 1.0)
        for i in (0, 1, 2, 255, 4096, 65_537, 70_000):
            assert z[i].item() == (-1.0 if (_mueller(i ^ k1) >> 8) & 1 else 1.0), (seed, index, i)
        bits = torch.tensor([(_mueller(i ^ k1) >> 8) & 1 for i in range(2000)])
        assert torch.equal(z[:2000], 1.0 - 2.0 * bits.float())


def test_rademacher_directions_are_signs_and_replay_exactly():
    """noise="rademacher": each probe moves every element by exactly +-eps, the step's
    record replays bit for bit, and the kernel form may still be named the old way."""
    from zoobj import replay

    w = torch.randn(4096)
    w0 = w.clone()
    seen = []
    opt = MeZO([w], lr=0.05, eps=0.25, seed=3, noise="rademacher")

    def closure():
        seen.append((w - w0).clone())
        return float((w**2).sum())

    for _ in range(3):
        opt.step(closure)
    first = seen[0] / 0.25
    assert set(first.round().tolist()) == {-1.0, 1.0} and torch.allclose(first, first.round(), atol=1e-5)
    assert abs(float(first.mean())) < 0.05  # about as many +1 as -1
    again = w0.clone()
    replay([again], opt.trajectory, lr=0.05, eps=0.25, seed=3, noise="rademacher")
    assert torch.equal(again, w)
    gaussian = w0.clone()
    replay([gaussian], opt.trajectory, lr=0.05, eps=0.25, seed=3, noise="gaussian")
    assert not torch.equal(gaussian, w)  # the kind is part of the run
    assert MeZO([torch.zeros(3)], noise="eager").noise_backend == "eager"  # the older meaning of noise=
    with pytest.raises(ValueError, match="unknown noise 'uniform'; choose one of gaussian, rademacher"):
        MeZO([torch.zeros(3)], noise="uniform")


# ----------------------------------------------------------------------------- fused passes


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
@pytest.mark.parametrize("backend", ["auto", "eager"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_several_moves_in_one_pass_give_the_bits_of_separate_passes(kind, backend, dtype):
    from zoobj.engine.noise import axpz_param, kernel_for, moves_param

    kernel = kernel_for(backend, kind)
    w0 = (torch.randn(50_001, generator=torch.Generator().manual_seed(1)) * 0.05).to(dtype)
    moves = [(11, 1.0, 1e-3), (12, 0.999, -2e-3 + 1e-4), (13, 1.0, 5e-4), (14, 1.0, 0.0)]
    apart, together = w0.clone(), w0.clone()
    for seed, a, b in moves:
        axpz_param(apart, seed, 4, a, b, kernel)
    moves_param(together, 4, moves, kernel)
    assert not torch.equal(apart, w0)
    assert torch.equal(apart, together)
    strided = w0.clone().view(-1)[:50_000].view(100, 500).t()  # not contiguous: a copy, written back
    expect = strided.contiguous()
    for seed, a, b in moves:
        axpz_param(expect, seed, 4, a, b, kernel)
    moves_param(strided, 4, moves, kernel)
    assert torch.equal(strided, expect)


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
@pytest.mark.parametrize("backend, dtype", [("auto", torch.float32), ("auto", torch.bfloat16),
                                            ("eager", torch.float32)])
@pytest.mark.parametrize("fuse", [True, False])
def test_small_tensors_grouped_in_one_call_get_the_bits_of_one_call_each(monkeypatch, kind, backend, dtype, fuse):
    """moves_params sends small tensors with the same moves through one grouped call: the
    weights are bit for bit those of moves_param per tensor, large, strided and odd ones
    included; tensors whose moves differ are grouped apart."""
    import zoobj.engine.noise as noise_module
    from zoobj.engine.noise import SMALL, kernel_for, moves_param, moves_params

    kernel = kernel_for(backend, kind)
    g = torch.Generator().manual_seed(2)
    shapes = [(640,), (3, 7), (1,), (SMALL,), (SMALL + 1,), (257, 3), (5,), (64, 64)]
    ws = [(torch.randn(s, generator=g) * 0.05).to(dtype) for s in shapes] + [
        (torch.randn(30, 20, generator=g) * 0.05).to(dtype).t()]  # small but strided: on its own
    two = [(21, 1.0, 1e-3), (22, 0.999, -2e-3)]
    other = [(21, 1.0, 1e-3), (23, 0.99, 4e-3)]  # same first move, different second: another group
    moves = [two if k % 3 else other for k in range(len(ws))]
    one_each = [w.clone() for w in ws]
    for k, w in enumerate(one_each):
        moves_param(w, 10 + k, moves[k], kernel, fuse)
    calls = []
    real = noise_module.Kernel.grouped
    monkeypatch.setattr(noise_module.Kernel, "grouped",
                        lambda self, flats, *a: (calls.append(len(flats)), real(self, flats, *a))[1])
    grouped = [w.clone() for w in ws]
    moves_params([(10 + k, w, moves[k]) for k, w in enumerate(grouped)], kernel, fuse)
    assert all(torch.equal(a, b) for a, b in zip(grouped, one_each))
    assert not any(torch.equal(a, b) for a, b in zip(grouped, ws))
    small = [k for k, w in enumerate(ws) if w.numel() <= SMALL and w.is_contiguous()]
    in_groups = sorted(calls)
    expect = sorted(n for n in (sum(1 for k in small if moves[k] is two), sum(1 for k in small if moves[k] is other)))
    assert in_groups == (expect if fuse else sorted(expect * 2))


def _count_passes(monkeypatch):
    """Count passes over the weights (one call of moves_param is one read and write of a
    tensor; a tensor alone goes there from moves_params too)."""
    import zoobj.engine.noise as noise_module
    import zoobj.engine.perturb as perturb_module

    passes, real = [], noise_module.moves_param

    def counted(p, i, moves, kernel, fuse=True):
        passes.append(len(moves) if fuse else 1)
        return real(p, i, moves, kernel, fuse)

    monkeypatch.setattr(perturb_module, "moves_param", counted)
    monkeypatch.setattr(noise_module, "moves_param", counted)
    return passes


@pytest.mark.parametrize("n, settle, per_step", [(1, False, 2), (1, True, 3), (3, False, 6), (3, True, 7)])
def test_a_step_makes_two_passes_per_direction_where_the_update_is_held(monkeypatch, n, settle, per_step):
    passes = _count_passes(monkeypatch)
    w = torch.randn(64)
    opt = MeZO([w], lr=0.01, eps=1e-3, seed=0, n=n)
    for _ in range(5):
        opt.step(lambda: float((w**2).sum()), settle=settle)
    passes.clear()
    opt.step(lambda: float((w**2).sum()), settle=settle)  # a step in the middle of a run
    assert len(passes) == per_step


@pytest.mark.parametrize("kwargs", [dict(), dict(n=3, weight_decay=0.1), dict(rule="momentum", n=2),
                                    dict(noise="rademacher")])
def test_fused_passes_give_the_weights_and_trajectory_of_separate_ones(kwargs):
    """Held moves written with the next pass (the trainer's loop: settle=False, settled
    now and then) leave the same bits as one pass per move, and replay either way."""
    torch.manual_seed(0)
    base = [torch.randn(40), torch.randn(8, 5)]
    out = {}
    for passes, settle_every in (("separate", 1), ("fused", 4)):
        ws = [b.clone() for b in base]
        opt = MeZO(ws, lr=0.01, eps=1e-3, seed=5, passes=passes, **kwargs)
        for t in range(10):
            opt.step(lambda: float(sum((w * w).sum() for w in ws)), settle=(t + 1) % settle_every == 0)
        opt.settle()
        out[passes] = ([w.clone() for w in ws], opt.trajectory)
    assert out["fused"][1] == out["separate"][1]
    assert all(torch.equal(a, b) for a, b in zip(out["fused"][0], out["separate"][0]))
    for passes in ("fused", "separate"):  # and a replay in either order gives those weights
        rebuilt = [b.clone() for b in base]
        replay(rebuilt, out["fused"][1], lr=0.01, eps=1e-3, seed=5, passes=passes, **kwargs)
        assert all(torch.equal(a, b) for a, b in zip(rebuilt, out["fused"][0]))


def test_a_held_update_reads_stale_until_settled_and_joins_the_next_step():
    w = torch.randn(32)
    w0 = w.clone()
    opt = MeZO([w], lr=0.1, eps=1e-2, seed=0)
    opt.step(lambda: float((w**2).sum()), settle=False)
    held = w.clone()
    assert not torch.equal(held, w0)  # at theta - eps z: the update (and restore) is held
    twin = MeZO([w0], lr=0.1, eps=1e-2, seed=0)
    twin.step(lambda: float((w0**2).sum()))
    opt.settle()
    assert torch.equal(w, w0)  # settled: the weights of the same step taken with settle=True
    opt.settle()  # nothing held: a no-op
    assert torch.equal(w, w0)


@pytest.mark.parametrize("exc", [Boom, KeyboardInterrupt])
def test_an_exception_in_the_step_after_a_held_update_leaves_the_updated_weights(exc):
    w = torch.randn(32)
    ref = w.clone()
    opt = MeZO([w], lr=0.1, eps=1e-2, seed=0, n=2)
    twin = MeZO([ref], lr=0.1, eps=1e-2, seed=0, n=2)
    opt.step(lambda: float((w**2).sum()), settle=False)
    twin.step(lambda: float((ref**2).sum()))
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 3:
            raise exc()
        return float((w**2).sum())

    with pytest.raises(exc):
        opt.step(closure, settle=False)
    torch.testing.assert_close(w, ref, rtol=0, atol=1e-6)  # theta_1: the held update written, the probe undone
    assert opt.step_count == 1 and len(opt.trajectory) == 1


def test_an_unknown_pass_order_is_refused():
    with pytest.raises(ValueError, match="unknown passes 'twice'; choose one of fused, separate"):
        MeZO([torch.zeros(2)], passes="twice")

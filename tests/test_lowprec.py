"""Exact low precision: with perturb="forward" the weights are never written until the
update, so a step at lr=0 leaves bf16/fp16 weights bit for bit as they were."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.test_cli import cli
from tests.tiny import tiny_gemma, tiny_tokenizer
from zoobj.engine.mezo import MeZO
from zoobj.model import inference
from zoobj.model.loading import load_model

LR0 = ["--task", "sst2", "--objective", "ce", "--batch-size", "4", "--eval-limit", "4", "--eval-every", "0",
       "--lr", "0", "--eps", "1e-3", "--steps", "100"]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view({2: torch.int16, 4: torch.int32}[t.element_size()])


def same_bits(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(bits(a[k]), bits(b[k])) for k in a)


@pytest.mark.parametrize("dtype,torch_dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_100_steps_at_lr_0_leave_low_precision_weights_bit_identical(model_dir, tmp_path, dtype, torch_dtype):
    run_dir = tmp_path / "run"
    assert cli("train", *LR0, "--model", model_dir, "--dtype", dtype, "--output", run_dir, "--save-model") == 0
    config = json.loads((run_dir / "config.json").read_text())
    assert config["perturb"] == "forward" and config["dtype"] == dtype  # the exact scheme is the low-precision default
    records = [json.loads(x) for x in (run_dir / "trajectory.jsonl").read_text().splitlines()]
    assert len(records) == 100 and any(r["grads"][0] != 0 for r in records)  # it did perturb and measure
    start = {k: v for k, v in load_model(model_dir, dtype=dtype)[0].state_dict().items()}
    saved = load_file(str(run_dir / "model" / "model.safetensors"))
    assert all(v.dtype == torch_dtype for v in saved.values())  # --save-model writes them in the run's dtype
    assert same_bits({k: saved[k] for k in saved}, {k: start[k] for k in saved})


def test_the_paper_style_sequence_drifts_in_bf16(model_dir, tmp_path):
    run_dir = tmp_path / "run"
    assert cli("train", *LR0, "--steps", "20", "--model", model_dir, "--dtype", "bf16", "--perturb", "inplace",
               "--output", run_dir, "--save-model") == 0
    start = load_model(model_dir, dtype="bf16")[0].state_dict()
    saved = load_file(str(run_dir / "model" / "model.safetensors"))
    drift = max(float((saved[k].float() - start[k].float()).abs().max()) for k in saved)
    assert drift > 0  # +eps z, -2 eps z, +eps z does not bring bf16 weights back


def tiny(dtype=torch.float32):
    tok = tiny_tokenizer()
    return tiny_gemma(len(tok)).to(dtype), tok


PROMPTS, TARGETS = ["the cat sat on", "It was great", "Denmark Norway"], [" the mat", " It was", " Iceland"]


def test_forward_perturbation_sees_the_same_losses_as_inplace_in_fp32():
    runs = {}
    for perturb in ("inplace", "forward"):
        model, tok = tiny()
        opt = MeZO(list(model.parameters()), lr=1e-3, eps=1e-3, seed=3, perturb=perturb, model=model)
        for _ in range(5):
            opt.step(lambda: inference.target_nll(model, tok, PROMPTS, TARGETS))
        runs[perturb] = opt.trajectory
    a, b = runs["inplace"], runs["forward"]
    assert a[0]["loss_plus"] == b[0]["loss_plus"]  # the same perturbed weights, built in a temporary
    for r, q in zip(a, b):
        assert r["grads"][0] == pytest.approx(q["grads"][0], rel=1e-3, abs=1e-3)


def test_forward_mode_replays_bit_for_bit_and_updates_in_low_precision():
    model, tok = tiny(torch.bfloat16)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    opt = MeZO(list(model.parameters()), lr=1e-2, eps=1e-2, seed=1, perturb="forward", model=model)
    for _ in range(4):
        opt.step(lambda: inference.target_nll(model, tok, PROMPTS, TARGETS))
    assert not same_bits(model.state_dict(), start)  # a real lr does move the weights
    again, _ = tiny(torch.bfloat16)
    MeZO(list(again.parameters()), lr=1e-2, eps=1e-2, seed=1, perturb="forward", model=again).replay(opt.trajectory)
    assert same_bits(again.state_dict(), model.state_dict())


def test_an_exception_inside_a_forward_puts_every_original_tensor_back():
    model, tok = tiny(torch.bfloat16)
    before = {k: (v.data_ptr(), v.clone()) for k, v in model.state_dict().items()}
    opt = MeZO(list(model.parameters()), lr=1e-2, eps=1e-2, perturb="forward", model=model)
    layer = model.model.layers[1].mlp

    def closure():
        inference.target_nll(model, tok, PROMPTS, TARGETS)
        layer(torch.zeros(1, 3, 7, dtype=torch.bfloat16))  # wrong width: raises inside a hooked forward
        return 0.0

    with pytest.raises(RuntimeError):
        opt.step(closure)
    after = model.state_dict()
    assert all(after[k].data_ptr() == ptr and torch.equal(bits(after[k]), bits(v)) for k, (ptr, v) in before.items())
    assert opt.trajectory == []


def test_forward_mode_names_parameters_it_cannot_reach():
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 1)
            self.scale = torch.nn.Parameter(torch.ones(1))

        def forward(self, x):  # self.scale is used here, but held by the root module: reached
            return self.lin(x) * self.scale

    class Shared(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 1)
            self.unused = torch.nn.Linear(3, 1)

        def forward(self, x):  # reads unused.weight without running unused's forward
            return self.lin(x) + x @ self.unused.weight.T

    x = torch.ones(2, 3)
    odd = Odd()
    MeZO(list(odd.parameters()), lr=1e-2, perturb="forward", model=odd).step(lambda: odd(x).sum())
    shared = Shared()
    opt = MeZO(list(shared.parameters()), lr=1e-2, perturb="forward", model=shared)
    before = [p.clone() for p in shared.parameters()]
    with pytest.raises(ValueError, match="never ran the modules holding parameters"):
        opt.step(lambda: shared(x).sum())
    assert all(torch.equal(a, b) for a, b in zip(shared.parameters(), before))
    with pytest.raises(ValueError, match="not held by any module"):
        MeZO([torch.nn.Parameter(torch.ones(2))], perturb="forward", model=shared)
    with pytest.raises(ValueError, match="needs model="):
        MeZO(list(shared.parameters()), perturb="forward")


def test_device_map_auto_loads_and_trains(model_dir):
    model, tok = load_model(model_dir, device_map="auto")  # one CPU here: every layer lands on it
    params = [p for p in model.parameters()]
    assert {p.device.type for p in params} == {"cpu"}
    before = [p.clone() for p in params]
    opt = MeZO(params, lr=1e-2, eps=1e-2)
    for _ in range(2):
        opt.step(lambda: inference.target_nll(model, tok, PROMPTS, TARGETS))
    assert any(not torch.equal(a, b) for a, b in zip(params, before))


def test_a_device_map_that_offloads_to_disk_is_refused(model_dir):
    from zoobj.errors import ModelError

    with pytest.raises(ModelError, match="offloaded weights .* to disk"):
        load_model(model_dir, device_map={"model": "cpu", "lm_head": "disk"})

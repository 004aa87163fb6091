"""Tensors on an accelerator never reach numpy: CI has no GPU, so a tensor subclass
stands for one -- it refuses ``.numpy()`` and ``__array__`` until copied to the host."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.tiny import tiny_gemma

ROOT = Path(__file__).resolve().parent.parent


class OnDevice(torch.Tensor):
    """Behaves like a CUDA tensor where the host is concerned: numpy refuses it, while
    ``.cpu()`` / ``.to("cpu")`` give back an ordinary host tensor."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.Tensor.numpy, torch.Tensor.__array__):
            raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() first.")
        out = super().__torch_function__(func, types, args, kwargs)
        to_host = func is torch.Tensor.cpu or (
            func is torch.Tensor.to and any(str(a) == "cpu" for a in [*args[1:], kwargs.get("device")]))
        if to_host and isinstance(out, OnDevice):
            with torch._C.DisableTorchFunctionSubclass():
                return out.as_subclass(torch.Tensor).clone()
        return out


def on_device(t: torch.Tensor) -> OnDevice:
    return t.detach().clone().as_subclass(OnDevice)


def test_the_stand_in_refuses_numpy_like_a_gpu_tensor():
    t = on_device(torch.arange(4.0))
    with pytest.raises(TypeError, match="numpy"):
        t.numpy()
    with pytest.raises(TypeError, match="numpy"):
        np.asarray(t)
    assert type(t.cpu()) is torch.Tensor and t.to("cpu").numpy().tolist() == [0, 1, 2, 3]


class _DeviceStateDict(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.inner = model

    def state_dict(self, *args, **kwargs):
        return {k: on_device(v) for k, v in self.inner.state_dict().items()}


def test_weights_hash_of_a_model_on_a_device_equals_the_host_hash():
    from zoobj.run.session import weights_hash

    model = tiny_gemma(64)
    assert weights_hash(_DeviceStateDict(model)) == weights_hash(model)


def test_keep_best_holds_host_copies_of_device_parameters():
    from zoobj.run.train import _Best

    params = [on_device(torch.randn(3, 2)), on_device(torch.randn(5))]
    best = _Best()
    best.offer(0.5, 3, params)
    assert all(type(t) is torch.Tensor for t in best.tensors)
    assert all(torch.equal(t, p.cpu()) for t, p in zip(best.tensors, params))


def _numpy_receivers(tree: ast.AST):
    """Each ``X.numpy()`` call with the chain of method names applied before it."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "numpy":
            chain, cur = [], node.func.value
            while True:
                if isinstance(cur, ast.Call):
                    f = cur.func
                    name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
                    arg = cur.args[0].value if cur.args and isinstance(cur.args[0], ast.Constant) else None
                    chain.append((name, arg))
                    cur = f.value if isinstance(f, ast.Attribute) else None
                elif isinstance(cur, ast.Attribute):
                    cur = cur.value
                else:
                    break
            yield node.lineno, chain


def _reaches_host(chain) -> bool:
    return any(name in ("cpu", "_host") or (name == "to" and arg == "cpu") for name, arg in chain)


@pytest.mark.parametrize("path", sorted((ROOT / "zoobj").rglob("*.py")), ids=lambda p: p.name)
def test_every_numpy_call_in_zoobj_copies_to_the_host_first(path):
    bad = [line for line, chain in _numpy_receivers(ast.parse(path.read_text())) if not _reaches_host(chain)]
    assert not bad, f"{path.name}: .numpy() on a tensor that may live on a device, lines {bad}; use .cpu() first"


def test_the_numpy_scan_flags_a_device_unsafe_call():
    unsafe = ast.parse("h = t.detach().contiguous().numpy()\nok = t.detach().to('cpu').numpy()\n")
    flags = [(line, _reaches_host(chain)) for line, chain in _numpy_receivers(unsafe)]
    assert sorted(flags) == [(1, False), (2, True)]

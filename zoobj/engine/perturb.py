"""Where the weights are during a probe: theta + offset * eps * z(seed).

Two perturbers share one interface, so the optimizer's step never asks which it has:

- ``shift(seed, coef)``: move by ``coef * eps * z(seed)`` (``+1``, ``-2``, ``+1`` in a step);
- ``check_reached()``: after the first perturbed forward, every trained tensor was reached;
- ``restore(seed)``: back to the step's base point, after an exception;
- ``release()``: detach from the model (take the hooks off).

``InPlace`` writes each shift into the weights, one uninterruptible pass (the paper's
scheme). ``Forward`` writes nothing: a hook on each module that owns a trained tensor
builds the perturbed tensor in a temporary for that module's forward and puts the
original back after it, so the weights are exact in any dtype and never left perturbed.

``atomic()`` holds SIGINT / SIGTERM while a pass over the weights runs.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any

import torch

from zoobj.engine.noise import _axpz_param, _Kernel

Params = list[tuple[int, torch.Tensor]]  # (index, tensor): the index keys the noise


@contextlib.contextmanager
def atomic():
    """Hold SIGINT / SIGTERM until a noise pass is complete, then deliver them.

    A pass touches every parameter; an interrupt in the middle would leave some
    perturbed and some not. Deferred, an interrupt lands between passes, where the
    optimizer knows exactly how far the weights are from the base point.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[tuple[int, Any]] = []
    old = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            old[sig] = signal.signal(sig, lambda s, f: pending.append((s, f)))
        except (ValueError, OSError):  # pragma: no cover - exotic embedding
            pass
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        for sig, frame in pending:
            handler = old.get(sig)
            if callable(handler):
                handler(sig, frame)
            elif handler == signal.SIG_DFL:
                if sig == signal.SIGINT:
                    raise KeyboardInterrupt
                signal.raise_signal(sig)


class NotReachable(ValueError):
    """``Forward`` cannot perturb a trained tensor: no module's forward owns or reaches it."""


class InPlace:
    """Each shift is written into the weights (in bf16/fp16 they do not come back exactly).

    >>> import torch
    >>> from zoobj.engine.noise import _kernel
    >>> w = torch.zeros(4)
    >>> p = InPlace([(0, w)], eps=0.1, kernel=_kernel)
    >>> p.shift(seed=1, coef=+1.0); bool(w.abs().sum() > 0), p.offset
    (True, 1.0)
    >>> p.restore(seed=1); bool((w.abs() < 1e-6).all()), p.offset
    (True, 0.0)
    """

    def __init__(self, params: Params, eps: float, kernel: _Kernel) -> None:
        self.params, self.eps, self.kernel = params, eps, kernel
        self.offset = 0.0  # how many eps*z(seed) the weights are from the step's base point

    def shift(self, seed: int, coef: float) -> None:
        """theta += coef * eps * z(seed), as one uninterruptible pass."""
        with atomic(), torch.no_grad():
            for i, p in self.params:
                _axpz_param(p, seed, i, 1.0, coef * self.eps, self.kernel)
            self.offset += coef  # inside the atomic block: always matches the weights

    def restore(self, seed: int) -> None:
        """Back to the base point (after an exception)."""
        if self.offset:
            self.shift(seed, -self.offset)
        self.offset = 0.0

    def check_reached(self) -> None:
        """Every tensor is written directly: nothing to check."""

    def release(self) -> None:
        """Nothing is attached to the model."""


class Forward:
    """Nothing is written: forward hooks add ``offset * eps * z(seed)`` to a temporary."""

    def __init__(self, params: Params, eps: float, kernel: _Kernel, model: torch.nn.Module) -> None:
        self.params, self.eps, self.kernel = params, eps, kernel
        self.offset = 0.0  # read by the hooks: 0 means the forward sees the stored weights
        self.seed = 0  # the seed whose perturbation the hooks add
        self._swapped: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._hooks: list = []
        self._reached: set[int] | None = None
        self._install(model)

    def shift(self, seed: int, coef: float) -> None:
        """The next forwards see theta + (offset + coef) * eps * z(seed)."""
        self.offset += coef
        self.seed = seed

    def restore(self, seed: int) -> None:
        """Put back every original tensor (after an exception inside a forward)."""
        for p, original in self._swapped.values():
            p.data = original
        self._swapped.clear()
        self.offset = 0.0

    def check_reached(self) -> None:
        """After the first perturbed closure: refuse a tensor no hooked forward reached."""
        if self._reached is None:
            return
        missed = [i for i, _ in self.params if i not in self._reached]
        self._reached = None
        if missed:
            raise NotReachable(f"perturb='forward': the closure never ran the modules holding parameters {missed[:5]} "
                             "(a tensor used outside its module's forward cannot be perturbed this way); "
                             "use perturb='inplace'")

    def release(self) -> None:
        """Take the forward hooks off the model."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def _install(self, model: torch.nn.Module) -> None:
        index = {id(p): i for i, p in self.params}
        owned: set[int] = set()
        for module in model.modules():
            own = [(p, index[id(p)]) for p in module._parameters.values() if p is not None and id(p) in index]
            if not own:
                continue
            owned.update(id(p) for p, _ in own)
            self._hooks.append(module.register_forward_pre_hook(lambda m, a, own=own: self._swap_in(own)))
            self._hooks.append(module.register_forward_hook(lambda m, a, o, own=own: self._swap_out(own), always_call=True))
        stray = [i for i, p in self.params if id(p) not in owned]
        if stray:
            self.release()
            raise NotReachable(f"perturb='forward': parameters {stray[:5]} are not held by any module of the model; "
                             "pass the model that owns them, or use perturb='inplace'")
        self._reached = set()  # filled during the first perturbed closure, then checked

    def _swap_in(self, own) -> None:
        if not self.offset:
            return
        # outside inference mode: the temporary is an ordinary tensor, and the noise kernel
        # sees the same kind of inputs as in the in-place passes (no recompilation)
        with torch.inference_mode(False), torch.no_grad():
            for p, i in own:
                if id(p) in self._swapped:  # a tied tensor already swapped by an enclosing module
                    continue
                original = p.data
                tmp = original.clone(memory_format=torch.contiguous_format)
                self.kernel(tmp.view(-1), self.seed, i, 1.0, self.offset * self.eps)
                self._swapped[id(p)] = (p, original)
                p.data = tmp
                if self._reached is not None:
                    self._reached.add(i)

    def _swap_out(self, own) -> None:
        for p, _ in own:
            entry = self._swapped.pop(id(p), None)
            if entry is not None:
                p.data = entry[1]

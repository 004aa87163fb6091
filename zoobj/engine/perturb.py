"""Where the weights are during a probe: theta + offset * eps * z(seed).

Two perturbers share one interface, so the optimizer's step never asks which it has:

- ``shift(seed, coef, write)``: move by ``coef * eps * z(seed)`` (``+1``, ``-2``, ``+1`` in a
  step); ``write=False`` lets ``InPlace`` hold the move for the next pass;
- ``queue(i, p, moves)``: an update's moves for one tensor; ``flush()``: write what is held;
- ``check_reached()``: after the first perturbed forward, every trained tensor was reached;
- ``restore(seed)``: back to the step's base point, after an exception;
- ``release()``: detach from the model (take the hooks off).

``InPlace`` writes each shift into the weights, one uninterruptible pass (the paper's
scheme). ``Forward`` writes nothing: a hook on each module that owns a trained tensor
builds the perturbed tensor in a temporary for that module's forward and puts the
original back after it, so the weights are exact in any dtype and never left perturbed.

``atomic()`` holds SIGINT / SIGTERM while a pass over the weights runs. ``Queries`` says
which of a step's directions this process evaluates (all, or a share in query-parallel
n-SPSA).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Sequence
from typing import Any

import torch

from zoobj.engine.noise import Kernel, moves_param, moves_params

Params = list[tuple[int, torch.Tensor]]  # (index, tensor): the index keys the noise
Move = tuple[int, float, float]  # (seed, a, b): theta <- a * theta + b * z(seed)


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

    With ``fuse`` a shift may be held (``write=False``) and an update queued (``queue``):
    they are written with the next written shift, or by ``flush``, in the same pass --
    one read and write of the weights for several moves, with the bits of separate passes.
    ``offset`` always counts the held moves: it says where the weights are once written.

    >>> import torch
    >>> from zoobj.engine.noise import KERNEL
    >>> w = torch.zeros(4)
    >>> p = InPlace([(0, w)], eps=0.1, kernel=KERNEL)
    >>> p.shift(seed=1, coef=+1.0); bool(w.abs().sum() > 0), p.offset
    (True, 1.0)
    >>> p.restore(seed=1); bool((w.abs() < 1e-6).all()), p.offset
    (True, 0.0)
    """

    def __init__(self, params: Params, eps: float, kernel: Kernel, fuse: bool = False) -> None:
        self.params, self.eps, self.kernel, self.fuse = params, eps, kernel, fuse
        self.offset = 0.0  # how many eps*z(seed) the weights are (or will be, once written) from the step's base point
        self.held: dict[int, list[Move]] = {i: [] for i, _ in params}  # moves not yet written, per tensor

    def _move(self, tensors: Params, seed: int, coef: float) -> None:
        """tensors += coef * eps * z(seed): the shift arithmetic, in one place."""
        moves_params([(i, p, [(seed, 1.0, coef * self.eps)]) for i, p in tensors], self.kernel)

    def shift(self, seed: int, coef: float, write: bool = True) -> None:
        """theta += coef * eps * z(seed), as one uninterruptible pass (with any held moves);
        ``write=False`` holds it for the next pass where passes are fused."""
        with atomic(), torch.no_grad():
            for i, _ in self.params:
                self.held[i].append((seed, 1.0, coef * self.eps))
            self.offset += coef  # inside the atomic block: always matches the weights
            if write or not self.fuse:
                self._write()

    def queue(self, i: int, p: torch.Tensor, moves: Sequence[Move]) -> None:
        """An update's moves for tensor ``i``: held where passes are fused, else written now
        (nothing is ever held then: every shift is written)."""
        if self.fuse:
            self.held[i].extend(moves)
        else:
            moves_param(p, i, moves, self.kernel, fuse=False)

    def flush(self) -> None:
        """Write every held move: afterwards the weights are where ``offset`` says."""
        with atomic(), torch.no_grad():
            self._write()

    def _write(self) -> None:
        moves_params([(i, p, self.held[i]) for i, p in self.params if self.held[i]], self.kernel, fuse=self.fuse)
        for i in self.held:
            self.held[i] = []

    def points(self, seeds: list[int]) -> list[list[torch.Tensor]]:
        """Where the probes of these seeds evaluate the trained tensors, bit for bit, as new
        tensors (the weights are not written): for each seed in turn, after ``+eps z`` (with
        any held moves) and after ``-2 eps z``, then back by ``+eps z`` (so a later direction
        starts from the same rounded point as in place)."""
        out = []
        with torch.no_grad():
            cur = [(i, p.detach().clone()) for i, p in self.params]
            held = {i: list(m) for i, m in self.held.items()}
            for s in seeds:
                moves_params([(i, q, [*held[i], (s, 1.0, self.eps)]) for i, q in cur], self.kernel, fuse=self.fuse)
                out.append([q.clone() for _, q in cur])
                self._move(cur, s, -2.0)
                out.append([q.clone() for _, q in cur])
                held = {i: [(s, 1.0, self.eps)] for i in held}
        return out

    def restore(self, seed: int) -> None:
        """Back to the base point (after an exception), every held move written."""
        if self.offset:
            self.shift(seed, -self.offset)
        self.flush()
        self.offset = 0.0

    def check_reached(self) -> None:
        """Every tensor is written directly: nothing to check."""

    def release(self) -> None:
        """Nothing is attached to the model."""


class Forward:
    """Nothing is written: forward hooks add ``offset * eps * z(seed)`` to a temporary."""

    def __init__(self, params: Params, eps: float, kernel: Kernel, model: torch.nn.Module, fuse: bool = False) -> None:
        self.params, self.eps, self.kernel, self.fuse = params, eps, kernel, fuse
        self.offset = 0.0  # read by the hooks: 0 means the forward sees the stored weights
        self.seed = 0  # the seed whose perturbation the hooks add
        self._swapped: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._hooks: list = []
        self._reached: set[int] | None = None
        self._install(model)

    def shift(self, seed: int, coef: float, write: bool = True) -> None:
        """The next forwards see theta + (offset + coef) * eps * z(seed) (``write``: unused)."""
        self.offset += coef
        self.seed = seed

    def queue(self, i: int, p: torch.Tensor, moves: Sequence[Move]) -> None:
        """An update's moves for tensor ``i``, written now (in one pass where passes are fused)."""
        moves_param(p, i, moves, self.kernel, fuse=self.fuse)

    def flush(self) -> None:
        """Nothing is ever held."""

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


class Queries:
    """Which of a step's directions this process evaluates, and how the others' losses arrive.

    One process evaluates them all. With ``shard=(rank, world)`` (query-parallel n-SPSA)
    it evaluates ``k % world == rank`` and ``exchange`` brings every process's rows.
    """

    def __init__(self, shard: tuple[int, int] | None, exchange) -> None:
        self.rank, self.world = shard if shard is not None else (0, 1)
        self.exchange = exchange if shard is not None else None

    def mine(self, k: int) -> bool:
        return k % self.world == self.rank

    def gather(self, plus: list[float], minus: list[float]) -> None:
        """Fill in, in place, the (l+, l-) of the directions other processes evaluated."""
        if self.exchange is None:
            return
        rows = torch.tensor([[k, plus[k], minus[k]] for k in range(len(plus)) if self.mine(k)], dtype=torch.float64)
        for k, lp, lm in self.exchange(rows).tolist():
            plus[int(k)], minus[int(k)] = lp, lm


class Points(Sequence):
    """A step's 2n probe points (``InPlace.points``), computed on first access: a
    ``probes`` function that declines without looking costs no copy of the tensors."""

    def __init__(self, make, count: int) -> None:
        self._make, self._count, self._items = make, count, None

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, i):
        if self._items is None:
            self._items = self._make()
        return self._items[i]

"""MeZO: memory-efficient zeroth-order SGD (Malladi et al., NeurIPS 2023).

The algorithm only. It knows nothing of models, tasks or metrics: it moves a list
of tensors along seeded random directions and asks a closure for a number.

One step with step seed ``s`` (``z ~ N(0, I)`` is regenerated from ``s``, never
stored)::

    theta += eps * z            l+ = closure()
    theta -= 2 * eps * z        l- = closure()
    g = (l+ - l-) / (2 * eps)
    theta += (eps - lr * g) * z          # restore and update in one pass

so ``z`` is produced three times a step and nothing the size of the model is
allocated. The noise is counter-based: element ``i`` of parameter ``j`` at step
seed ``s`` is a hash of ``(s, j, i)`` turned into a normal deviate (Box-Muller),
so any slice of ``z`` can be regenerated on its own, the result does not depend
on the thread count, and the global RNG is never touched. Where ``torch.compile``
works the hash, the transform and the in-place update run as one fused kernel;
elsewhere the same arithmetic runs eagerly in chunks (the two agree to within a
float32 rounding of ``z``).

Every step appends one flat record to ``opt.trajectory``; ``replay`` re-applies
those records to the base weights and reproduces the trained weights bit for bit
(same backend, same settings), which is why a run's checkpoint can be a few KB.

>>> import torch
>>> from zoobj import MeZO
>>> x = torch.tensor([3.0, -2.0])
>>> opt = MeZO([x], lr=0.05, eps=1e-3, seed=0)
>>> start = float((x ** 2).sum())
>>> for _ in range(200):
...     _ = opt.step(lambda: (x ** 2).sum())
>>> float((x ** 2).sum()) < start / 10
True
>>> sorted(opt.trajectory[0])
['grads', 'loss_minus', 'loss_plus', 'lr', 'seeds', 'skipped', 'step', 'ties']
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

__all__ = [
    "MeZO",
    "NonFiniteLossError",
    "PERTURB",
    "RECORD_KEYS",
    "RULES",
    "decay_groups",
    "noise",
    "replay",
    "step_seed",
]

RULES = ("sgd", "momentum", "adam")
PERTURB = ("inplace", "forward")
RECORD_KEYS = ("step", "seeds", "grads", "lr", "loss_plus", "loss_minus", "ties", "skipped")

_M32 = 0xFFFFFFFF
_M64 = 0xFFFFFFFFFFFFFFFF
_HASH_MUL = 0x45D9F3B  # < 2**31, so a 32-bit value times it stays inside int64
_TWO_PI = 2.0 * math.pi
_EAGER_CHUNK = 1 << 20  # elements per chunk on the eager path
_STATE_CHUNK = 1 << 20  # elements per chunk for the momentum / adam updates
_MAX_SPAN = 1 << 31  # element indices are hashed as 32-bit counters: re-key past this


class NonFiniteLossError(FloatingPointError):
    """The closure returned NaN or inf and the optimizer was asked to raise."""


# ----------------------------------------------------------------------------- seeds


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def step_seed(seed: int, step: int, k: int = 0) -> int:
    """The seed of perturbation ``k`` at ``step``: a pure function of its arguments.

    A 32-bit integer, so it is short in a trajectory file and exact in any JSON reader.

    >>> step_seed(0, 5) == step_seed(0, 5)
    True
    >>> step_seed(0, 5) != step_seed(0, 6) != step_seed(1, 5)
    True
    """
    return _splitmix64(_splitmix64(_splitmix64(seed & _M64) ^ step) ^ k) & _M32


def _param_key(seed: int, index: int, span: int) -> tuple[int, int]:
    """Two 32-bit keys for parameter ``index`` (and its ``span``-th 2**31 slice)."""
    h = _splitmix64(_splitmix64((seed << 20) ^ index) ^ span)
    return h & _M32, h >> 32


# ----------------------------------------------------------------------------- noise


def _hash32(x: torch.Tensor) -> torch.Tensor:
    # Thomas Mueller's 32-bit integer hash, in int64 so that nothing overflows.
    x = x ^ (x >> 16)
    x = (x * _HASH_MUL) & _M32
    x = x ^ (x >> 16)
    x = (x * _HASH_MUL) & _M32
    return x ^ (x >> 16)


def _axpz(flat: torch.Tensor, k1, k2, offset, a, b) -> None:
    """``flat <- a * flat + b * z[offset : offset + len(flat)]``, in place, computed in fp32."""
    i = torch.arange(flat.numel(), device=flat.device, dtype=torch.int64) + offset
    u = _hash32(i ^ k1)
    v = _hash32(u ^ k2)
    u1 = ((u >> 8).to(torch.float32) + 0.5) * (2.0**-24)  # (0, 1): log is finite
    u2 = (v >> 8).to(torch.float32) * (2.0**-24)
    z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(_TWO_PI * u2)
    flat.copy_((flat.to(torch.float32) * a + z * b).to(flat.dtype))


class _Kernel:
    """Chooses, once per process and device type, the compiled or the eager form of ``_axpz``."""

    def __init__(self, compile: bool = True) -> None:
        self._compiled: dict[str, Callable | None] = {}
        self.backend = "eager"
        self.compile = compile  # False: always the eager form (replaying a run that ran eagerly)

    def _get_compiled(self, device_type: str = "cpu") -> Callable | None:
        if device_type not in self._compiled:
            self._compiled[device_type] = None
            wanted = self.compile and os.environ.get("ZOOBJ_COMPILE", "1") not in ("0", "false", "no")
            if wanted and device_type != "meta":
                try:
                    # one graph per dtype and device; leave room for fp32, bf16 and fp16
                    limit = getattr(torch._dynamo.config, "recompile_limit", None)
                    if isinstance(limit, int) and limit < 32:
                        torch._dynamo.config.recompile_limit = 32
                    fn = torch.compile(_axpz, dynamic=True)
                    probe = torch.zeros(8, device=device_type)
                    t = torch.zeros((), dtype=torch.int64, device=device_type)
                    fn(probe, t, t, t, torch.ones((), device=device_type), torch.ones((), device=device_type))
                    self._compiled[device_type] = fn
                except Exception as exc:  # no C++ compiler / triton, unsupported platform, ...
                    warnings.warn(
                        f"zoobj: torch.compile unavailable on {device_type} ({type(exc).__name__}); "
                        "noise runs eagerly (slower, same numbers to float32 rounding). "
                        "Set ZOOBJ_COMPILE=0 to skip the attempt.",
                        RuntimeWarning,
                        stacklevel=3,
                    )
            if device_type == "cpu" or len(self._compiled) == 1:
                self.backend = "compiled" if self._compiled[device_type] is not None else "eager"
        return self._compiled[device_type]

    def __call__(self, flat: torch.Tensor, seed: int, index: int, a: float, b: float) -> None:
        dev = flat.device
        fa = torch.tensor(a, dtype=torch.float32, device=dev)
        fb = torch.tensor(b, dtype=torch.float32, device=dev)
        compiled = self._get_compiled(dev.type)
        for span, start in enumerate(range(0, flat.numel(), _MAX_SPAN)):
            part = flat[start : start + _MAX_SPAN]
            k1, k2 = (torch.tensor(k, dtype=torch.int64, device=dev) for k in _param_key(seed, index, span))
            if compiled is not None:
                compiled(part, k1, k2, torch.zeros((), dtype=torch.int64, device=dev), fa, fb)
                continue
            for off in range(0, part.numel(), _EAGER_CHUNK):
                _axpz(part[off : off + _EAGER_CHUNK], k1, k2, off, fa, fb)


_kernel = _Kernel()
_eager_kernel = _Kernel(compile=False)
NOISE_BACKENDS = ("auto", "compiled", "eager")


def _flat(p: torch.Tensor) -> torch.Tensor:
    return p.detach().view(-1)


def _axpz_param(p: torch.Tensor, seed: int, index: int, a: float, b: float, kernel: _Kernel = _kernel) -> None:
    if a == 1.0 and b == 0.0:  # nothing to do (and -0.0 stays -0.0)
        return
    if p.is_contiguous():
        kernel(_flat(p), seed, index, a, b)
    else:  # rare: work on a contiguous copy and write it back
        tmp = p.detach().contiguous()
        kernel(tmp.view(-1), seed, index, a, b)
        p.detach().copy_(tmp)


def noise(shape: Sequence[int] | int, seed: int, index: int = 0, dtype=torch.float32, device=None) -> torch.Tensor:
    """The perturbation direction ``z`` for parameter ``index`` under step seed ``seed``.

    This is exactly what the optimizer adds (scaled by eps); it is materialised here
    only for inspection and tests.

    >>> z = noise(100_000, seed=7)
    >>> abs(float(z.mean())) < 0.02 and abs(float(z.std()) - 1) < 0.02
    True
    >>> bool((noise(10, seed=7) == z[:10]).all())
    True
    """
    out = torch.zeros(shape, dtype=dtype, device=device)
    _kernel(out.view(-1), seed, index, 0.0, 1.0)
    return out


# ----------------------------------------------------------------------------- signals


@contextlib.contextmanager
def _atomic():
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


# ----------------------------------------------------------------------------- groups


def decay_groups(named_parameters: Iterable[tuple[str, torch.Tensor]], weight_decay: float) -> list[dict]:
    """Split parameters into a decayed group and a group without weight decay.

    As in the MeZO paper, biases and normalisation weights (any 1-D tensor, or a name
    ending in ``bias`` or containing ``norm``) are not decayed. Pass the result to
    ``MeZO`` as its ``params``.

    >>> import torch
    >>> lin, ln = torch.nn.Linear(2, 2), torch.nn.LayerNorm(2)
    >>> named = [("lin." + n, p) for n, p in lin.named_parameters()]
    >>> named += [("ln." + n, p) for n, p in ln.named_parameters()]
    >>> [len(g["params"]) for g in decay_groups(named, 0.1)]
    [1, 3]
    """
    decay, no_decay = [], []
    for name, p in named_parameters:
        lowered = name.lower()
        if p.ndim < 2 or lowered.endswith("bias") or "norm" in lowered:
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _round(x: float) -> float:
    """8 significant digits: short in JSON, and the value used is the value stored."""
    return float(f"{x:.8g}")


def _finite_or_none(x: float) -> float | None:
    return _round(x) if math.isfinite(x) else None


# ----------------------------------------------------------------------------- optimizer


class MeZO:
    """Zeroth-order SGD with the ``torch.optim`` closure convention.

    Args:
        params: an iterable of tensors, or of torch-style param groups (dicts with
            ``params`` and optionally ``lr`` and ``weight_decay``). A
            ``torch.nn.Parameter`` with ``requires_grad=False`` is left frozen.
        lr: base learning rate; a group's ``lr`` overrides it for that group and
            follows the same schedule (``group_lr * schedule(step)``).
        eps: perturbation scale.
        seed: the run's seed; step ``t`` uses ``step_seed(seed, t, k)``.
        n: perturbations per step (n-SPSA); the projected gradients are averaged and
            all of them are evaluated at the same point.
        rule: ``"sgd"`` (no extra memory), ``"momentum"`` (one fp32 buffer the size of
            the trained parameters) or ``"adam"`` (two such buffers). The last two are
            meant for PEFT-sized parameter sets (LoRA, prefixes), not whole models.
        weight_decay: decoupled decay ``theta *= 1 - lr * wd`` (see ``decay_groups``).
        momentum: the momentum rule's beta.
        betas, adam_eps: the adam rule's constants.
        schedule: ``step -> multiplier`` for the learning rate. It must depend on the
            step alone (not on the total number of steps), so that a run resumed to a
            longer budget follows the same path. Default: constant.
        on_nonfinite: ``"skip"`` (restore the weights, record the step as skipped, no
            update) or ``"raise"`` (restore, then raise ``NonFiniteLossError``).
        perturb: ``"inplace"`` (the paper's scheme: ``+eps z``, ``-2 eps z`` and the
            restore are written into the weights; in bf16/fp16 the rounding of each
            pass means the weights do not come back exactly) or ``"forward"`` (the
            weights are never written until the update: a hook on each module of
            ``model`` that owns a trained tensor builds the perturbed tensor in a
            temporary for that module's forward and puts the original back after it.
            Exact in any dtype, at the cost of one temporary the size of the largest
            module and one noise pass per module call -- which, for generation, is one
            per decoded token).
        model: the ``torch.nn.Module`` holding ``params``; needed for ``perturb="forward"``.
        noise: which form of the noise kernel runs: ``"auto"`` (compiled where
            ``torch.compile`` works, else eager), ``"compiled"`` (raise RuntimeError where
            it does not) or ``"eager"``. The two forms agree only to float32 rounding of
            ``z``: replaying a trajectory bit for bit needs the form that made it
            (``noise_backend`` says which one runs).
        shard, exchange: query-parallel n-SPSA. ``shard=(rank, world)`` makes this
            process evaluate only perturbations ``k`` with ``k % world == rank``;
            ``exchange(rows)`` receives this process's ``(k, l+, l-)`` rows as a float64
            tensor of shape ``(n // world, 3)`` and must return every process's rows
            (e.g. an all-gather). Every process then applies all ``n`` updates, so the
            replicas stay identical; with ``perturb="inplace"`` each process also runs
            the weight passes of the perturbations it did not evaluate (no forwards), so
            that its weights match ``replay`` bit for bit.

    ``step(closure)`` returns ``(l+ + l-) / 2`` (averaged over the ``n`` perturbations)
    and appends a record with the keys in ``RECORD_KEYS`` to ``self.trajectory``.
    If the closure raises (``KeyboardInterrupt`` included) the weights are restored
    to where the step began before the exception propagates.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-6,
        eps: float = 1e-3,
        seed: int = 0,
        n: int = 1,
        rule: str = "sgd",
        weight_decay: float = 0.0,
        *,
        momentum: float = 0.9,
        betas: tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
        schedule: Callable[[int], float] | None = None,
        on_nonfinite: str = "skip",
        perturb: str = "inplace",
        model: torch.nn.Module | None = None,
        shard: tuple[int, int] | None = None,
        exchange: Callable[[torch.Tensor], torch.Tensor] | None = None,
        noise: str = "auto",
    ) -> None:
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0):
            raise ValueError(f"lr must be a finite number >= 0, got {lr!r}")
        if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
            raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
        if not (isinstance(n, int) and n >= 1):
            raise ValueError(f"n must be an integer >= 1, got {n!r}")
        if rule not in RULES:
            raise ValueError(f"unknown update rule {rule!r}; choose one of {', '.join(RULES)}")
        if on_nonfinite not in ("skip", "raise"):
            raise ValueError(f"on_nonfinite must be 'skip' or 'raise', got {on_nonfinite!r}")
        if perturb not in PERTURB:
            raise ValueError(f"unknown perturb {perturb!r}; choose one of {', '.join(PERTURB)}")
        if noise not in NOISE_BACKENDS:
            raise ValueError(f"unknown noise backend {noise!r}; choose one of {', '.join(NOISE_BACKENDS)}")
        if perturb == "forward" and not isinstance(model, torch.nn.Module):
            raise ValueError("perturb='forward' needs model=<the torch.nn.Module that holds the parameters>")
        if shard is not None:
            rank, world = shard
            if not (0 <= rank < world) or exchange is None:
                raise ValueError(f"shard=(rank, world) needs 0 <= rank < world and an exchange function, got {shard!r}")
            if n % world:
                raise ValueError(f"query-parallel n-SPSA needs n to be a multiple of the world size ({world}), got n={n}")
        self.defaults = {"lr": float(lr), "weight_decay": float(weight_decay)}
        self.eps, self.seed, self.n, self.rule = float(eps), int(seed), n, rule
        self.momentum, self.betas, self.adam_eps = momentum, tuple(betas), adam_eps
        self.schedule = schedule
        self.on_nonfinite = on_nonfinite
        self.param_groups = self._groups(params)
        self.state: dict[int, dict[str, torch.Tensor]] = {}
        self.trajectory: list[dict] = []
        self.step_count = 0
        self._offset = 0.0
        self.perturb, self.shard, self.exchange = perturb, shard, exchange
        self._seed_now = 0  # the seed whose perturbation the forward hooks add
        self._swapped: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._hooks: list = []
        self._reached: set[int] | None = None
        self._kernel = _eager_kernel if noise == "eager" else _kernel
        if noise == "compiled" and self.noise_backend != "compiled":
            raise RuntimeError("noise='compiled': torch.compile is not available for the noise kernel here "
                               "(ZOOBJ_COMPILE=0, no C++ compiler, or an unsupported device)")
        if perturb == "forward":
            self._install_hooks(model)

    # -- setup ---------------------------------------------------------------

    def _groups(self, params: Iterable) -> list[dict]:
        if isinstance(params, torch.Tensor):
            raise TypeError("params must be an iterable of tensors or of param groups, not a tensor")
        params = list(params)
        if not params:
            raise ValueError("MeZO got an empty parameter list")
        raw = params if isinstance(params[0], dict) else [{"params": params}]
        groups, seen, index = [], set(), 0
        for g in raw:
            g = dict(g)
            ps = g["params"]
            ps = [ps] if isinstance(ps, torch.Tensor) else list(ps)
            kept, indices = [], []
            for p in ps:
                if not isinstance(p, torch.Tensor) or not p.is_floating_point():
                    raise TypeError(f"MeZO trains floating-point tensors, got {type(p).__name__}")
                if id(p) in seen:
                    raise ValueError("a tensor appears in more than one parameter group")
                seen.add(id(p))
                if isinstance(p, torch.nn.Parameter) and not p.requires_grad:
                    continue
                kept.append(p)
                indices.append(index)
                index += 1
            g["params"], g["index"] = kept, indices
            g.setdefault("lr", self.defaults["lr"])
            g.setdefault("weight_decay", self.defaults["weight_decay"])
            groups.append(g)
        if index == 0:
            raise ValueError("MeZO got no trainable tensors (all frozen?)")
        return groups

    def _params(self):
        for g in self.param_groups:
            yield from zip(g["index"], g["params"])

    def lr_at(self, step: int) -> float:
        """The base learning rate used at ``step``."""
        factor = 1.0 if self.schedule is None else float(self.schedule(step))
        return _round(self.defaults["lr"] * factor)

    def _group_lr(self, g: dict, lr: float) -> float:
        base = self.defaults["lr"]
        return g["lr"] * (lr / base) if base else g["lr"]

    # -- perturbation during the forward (perturb="forward") ------------------------

    def _install_hooks(self, model: torch.nn.Module) -> None:
        index = {id(p): i for i, p in self._params()}
        owned: set[int] = set()
        for module in model.modules():
            own = [(p, index[id(p)]) for p in module._parameters.values() if p is not None and id(p) in index]
            if not own:
                continue
            owned.update(id(p) for p, _ in own)
            self._hooks.append(module.register_forward_pre_hook(lambda m, a, own=own: self._swap_in(own)))
            self._hooks.append(module.register_forward_hook(lambda m, a, o, own=own: self._swap_out(own), always_call=True))
        stray = [i for i, p in self._params() if id(p) not in owned]
        if stray:
            self.remove_hooks()
            raise ValueError(f"perturb='forward': parameters {stray[:5]} are not held by any module of the model; "
                             "pass the model that owns them, or use perturb='inplace'")
        self._reached = set()  # filled during the first perturbed closure, then checked

    def remove_hooks(self) -> None:
        """Take the forward hooks of ``perturb="forward"`` off the model."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def _swap_in(self, own) -> None:
        if not self._offset:
            return
        # outside inference mode: the temporary is an ordinary tensor, and the noise kernel
        # sees the same kind of inputs as in the in-place passes (no recompilation)
        with torch.inference_mode(False), torch.no_grad():
            for p, i in own:
                if id(p) in self._swapped:  # a tied tensor already swapped by an enclosing module
                    continue
                original = p.data
                tmp = original.clone(memory_format=torch.contiguous_format)
                self._kernel(tmp.view(-1), self._seed_now, i, 1.0, self._offset * self.eps)
                self._swapped[id(p)] = (p, original)
                p.data = tmp
                if self._reached is not None:
                    self._reached.add(i)

    def _swap_out(self, own) -> None:
        for p, _ in own:
            entry = self._swapped.pop(id(p), None)
            if entry is not None:
                p.data = entry[1]

    def _release(self) -> None:
        """Put back every original tensor (after an exception inside a forward)."""
        for p, original in self._swapped.values():
            p.data = original
        self._swapped.clear()

    def _check_reached(self) -> None:
        if self._reached is None:
            return
        missed = [i for i, _ in self._params() if i not in self._reached]
        self._reached = None
        if missed:
            raise ValueError(f"perturb='forward': the closure never ran the modules holding parameters {missed[:5]} "
                             "(a tensor used outside its module's forward cannot be perturbed this way); "
                             "use perturb='inplace'")

    # -- the passes ------------------------------------------------------------

    def _shift(self, seed: int, coef: float) -> None:
        """theta += coef * eps * z(seed), as one uninterruptible pass.

        With ``perturb="forward"`` nothing is written: the hooks read the offset."""
        if self.perturb == "forward":
            self._offset += coef
            self._seed_now = seed
            return
        with _atomic(), torch.no_grad():
            for i, p in self._params():
                _axpz_param(p, seed, i, 1.0, coef * self.eps, self._kernel)
            self._offset += coef  # inside the atomic block: always matches the weights

    def _restore_and_update(self, seed: int, g: float, lr: float) -> None:
        """From theta - eps*z to decay(theta) - lr*g*z in one pass (rule sgd, n = 1)."""
        with _atomic(), torch.no_grad():
            for group in self.param_groups:
                glr = self._group_lr(group, lr)
                a = 1.0 - glr * group["weight_decay"]
                for i, p in zip(group["index"], group["params"]):
                    _axpz_param(p, seed, i, a, a * self.eps - glr * g, self._kernel)
            self._offset = 0.0

    def _update(self, seeds: Sequence[int], grads: Sequence[float], lr: float) -> None:
        """Apply the averaged estimate sum_k g_k z_k / n at the (restored) base point."""
        n = len(seeds)
        with _atomic(), torch.no_grad():
            for group in self.param_groups:
                glr = self._group_lr(group, lr)
                decay = 1.0 - glr * group["weight_decay"]
                for i, p in zip(group["index"], group["params"]):
                    if self.rule == "sgd":
                        for k, (s, g) in enumerate(zip(seeds, grads)):
                            _axpz_param(p, s, i, decay if k == 0 else 1.0, -glr * g / n, self._kernel)
                    else:
                        self._stateful_update(i, p, seeds, grads, glr, decay)

    def _stateful_update(self, i: int, p: torch.Tensor, seeds, grads, glr: float, decay: float) -> None:
        st = self.state.setdefault(i, {})
        if not st:
            st["exp_avg"] = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
            if self.rule == "adam":
                st["exp_avg_sq"] = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
            st["t"] = torch.zeros((), dtype=torch.int64)
        st["t"] += 1
        t = int(st["t"])
        flat, n = _flat(p), len(seeds)
        if decay != 1.0:
            flat.mul_(decay)
        buf = torch.zeros(min(flat.numel(), _STATE_CHUNK), dtype=torch.float32, device=p.device)
        b1, b2 = self.betas
        for off in range(0, flat.numel(), _STATE_CHUNK):
            size = min(_STATE_CHUNK, flat.numel() - off)
            ghat = buf[:size].zero_()  # the chunk of sum_k g_k z_k / n
            for s, g in zip(seeds, grads):
                _chunk_axpz(ghat, s, i, off, g / n, self._kernel)
            m = st["exp_avg"][off : off + size]
            target = flat[off : off + size]
            if self.rule == "momentum":
                m.mul_(self.momentum).add_(ghat)
                target.add_((-glr * m).to(target.dtype))
            else:
                v = st["exp_avg_sq"][off : off + size]
                m.mul_(b1).add_(ghat, alpha=1 - b1)
                v.mul_(b2).addcmul_(ghat, ghat, value=1 - b2)
                denom = (v / (1 - b2**t)).sqrt_().add_(self.adam_eps)
                target.add_((-glr / (1 - b1**t) * m / denom).to(target.dtype))

    # -- the step ----------------------------------------------------------------

    def step(self, closure: Callable[[], Any]) -> float:
        """One SPSA step; see the class docstring. Returns the mean of l+ and l-."""
        if closure is None:
            raise TypeError("MeZO.step needs a closure that returns the loss")
        t = self.step_count
        lr = self.lr_at(t)
        seeds = [step_seed(self.seed, t, k) for k in range(self.n)]
        fused = self.n == 1 and self.rule == "sgd" and self.perturb == "inplace" and self.shard is None
        plus, minus, grads = [math.nan] * self.n, [math.nan] * self.n, []
        self._offset = 0.0  # how many eps*z(s) the weights are from the step's base point
        for k, s in enumerate(seeds):
            try:
                if self.shard is not None and k % self.shard[1] != self.shard[0]:
                    # another process evaluates this one; run the same weight passes so the
                    # replicas (and replay) see the same rounding
                    if self.perturb == "inplace":
                        self._shift(s, +1.0)
                        self._shift(s, -2.0)
                        self._shift(s, +1.0)
                    continue
                self._shift(s, +1.0)
                lp = _as_float(closure(), "l+")
                self._check_reached()
                self._shift(s, -2.0)
                lm = _as_float(closure(), "l-")
                finite = math.isfinite(lp) and math.isfinite(lm)
                if not (fused and finite):
                    self._shift(s, +1.0)  # restore now; the update comes after all n
            except BaseException:
                self._release()
                if self._offset:
                    self._shift(s, -self._offset)
                self._offset = 0.0
                raise
            plus[k], minus[k] = lp, lm
        if self.shard is not None:
            mine = torch.tensor([[k, plus[k], minus[k]] for k in range(self.n) if k % self.shard[1] == self.shard[0]],
                                dtype=torch.float64)
            for k, lp, lm in self.exchange(mine).tolist():
                plus[int(k)], minus[int(k)] = lp, lm
        for lp, lm in zip(plus, minus):
            finite = math.isfinite(lp) and math.isfinite(lm)
            grads.append(_round((lp - lm) / (2 * self.eps)) if finite else 0.0)
        skipped = not all(math.isfinite(x) for x in plus + minus)
        if skipped and self.on_nonfinite == "raise":
            raise NonFiniteLossError(
                f"step {t}: the closure returned a non-finite loss (l+={plus}, l-={minus}); "
                "the weights were restored"
            )
        record = {
            "step": t,
            "seeds": seeds,
            "grads": [0.0 if skipped else g for g in grads],
            "lr": lr,
            "loss_plus": [_finite_or_none(x) for x in plus],
            "loss_minus": [_finite_or_none(x) for x in minus],
            "ties": sum(a == b for a, b in zip(plus, minus)),
            "skipped": skipped,
        }
        with _atomic():  # the update and its record land together, or neither does
            if fused and not skipped:
                self._restore_and_update(seeds[0], grads[0], lr)  # the step's third pass
            elif not skipped:
                self._update(seeds, grads, lr)
            self.trajectory.append(record)
            self.step_count = t + 1
        return sum(plus + minus) / (2 * self.n)

    # -- replay ----------------------------------------------------------------

    def replay(self, trajectory: Iterable[dict]) -> None:
        """Re-apply recorded steps to the current (base) weights, pass for pass.

        Steps must follow on from ``self.step_count``. With the same settings and
        noise backend the result is bit-identical to the weights after training.
        """
        for rec in trajectory:
            missing = [k for k in RECORD_KEYS if k not in rec]
            if missing:
                raise ValueError(f"trajectory record lacks {', '.join(missing)}: {rec!r}")
            if rec["step"] != self.step_count:
                raise ValueError(f"trajectory record for step {rec['step']} where step {self.step_count} was expected")
            seeds, grads, lr = rec["seeds"], rec["grads"], rec["lr"]
            fused = len(seeds) == 1 and self.rule == "sgd" and self.perturb == "inplace" and self.shard is None
            for s, g in zip(seeds, grads):
                self._shift(s, +1.0)
                self._shift(s, -2.0)
                if fused and not rec["skipped"]:
                    self._restore_and_update(s, g, lr)
                else:
                    self._shift(s, +1.0)
            if not rec["skipped"] and not fused:
                self._update(seeds, grads, lr)
            self.trajectory.append(dict(rec))
            self.step_count += 1

    # -- state -------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Step counter, settings and rule buffers (the trajectory travels separately)."""
        return {
            "step_count": self.step_count,
            "seed": self.seed,
            "eps": self.eps,
            "n": self.n,
            "rule": self.rule,
            "state": {i: {k: v.clone() for k, v in st.items()} for i, st in self.state.items()},
        }

    def load_state_dict(self, sd: dict) -> None:
        for key in ("seed", "eps", "n", "rule"):
            if sd[key] != getattr(self, key):
                raise ValueError(f"state_dict has {key}={sd[key]!r}, this optimizer {getattr(self, key)!r}")
        self.step_count = int(sd["step_count"])
        self.state = {int(i): {k: v.clone() for k, v in st.items()} for i, st in sd["state"].items()}

    @property
    def noise_backend(self) -> str:
        """``"compiled"`` or ``"eager"``: which form of the noise kernel runs (on the
        first parameter's device)."""
        _, first = next(self._params())
        return "compiled" if self._kernel._get_compiled(first.device.type) is not None else "eager"


def _chunk_axpz(buf: torch.Tensor, seed: int, index: int, offset: int, b: float, kernel: _Kernel = _kernel) -> None:
    """buf += b * z(seed, index)[offset : offset + len(buf)] (offset < 2**31 per span)."""
    span, local = divmod(offset, _MAX_SPAN)
    if local + buf.numel() > _MAX_SPAN:  # straddles a re-keyed span: split it
        cut = _MAX_SPAN - local
        _chunk_axpz(buf[:cut], seed, index, offset, b, kernel)
        _chunk_axpz(buf[cut:], seed, index, offset + cut, b, kernel)
        return
    dev = buf.device
    k1, k2 = (torch.tensor(k, dtype=torch.int64, device=dev) for k in _param_key(seed, index, span))
    one = torch.ones((), dtype=torch.float32, device=dev)
    fb = torch.tensor(b, dtype=torch.float32, device=dev)
    off = torch.tensor(local, dtype=torch.int64, device=dev)
    fn = kernel._get_compiled(dev.type) or _axpz
    fn(buf, k1, k2, off, one, fb)


def _as_float(value: Any, which: str) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise TypeError(f"the closure must return a scalar loss, got a tensor of shape {tuple(value.shape)} for {which}")
        return float(value.detach())
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    try:
        import numpy as np

        if isinstance(value, np.generic) and np.ndim(value) == 0:
            return float(value)
    except ImportError:  # pragma: no cover
        pass
    raise TypeError(f"the closure must return a float or a 0-dim tensor, got {type(value).__name__} for {which}")


def replay(params: Iterable, trajectory: Iterable[dict], **settings: Any) -> MeZO:
    """Rebuild trained weights: apply ``trajectory`` to ``params`` (the base weights).

    ``settings`` are the optimizer's (``lr``, ``eps``, ``seed``, ``rule``,
    ``weight_decay``, ...) as used in training; the parameter order must be the
    training order. Returns the optimizer, ready to continue training.
    """
    opt = MeZO(params, **settings)
    opt.replay(trajectory)
    return opt

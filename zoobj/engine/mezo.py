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
allocated. ``MeZO.step`` reads as those lines do -- seeds, probe, estimate, update
and record -- and each variation is a piece it calls, chosen once at construction:

- the noise ``z``: ``zoobj.engine.noise`` (counter-based, the same numbers on any thread
  count, compiled where ``torch.compile`` works and eager elsewhere);
- how the weights are perturbed: ``zoobj.engine.perturb`` (in place, or by forward hooks
  that build each perturbed tensor in a temporary);
- which directions this process evaluates: ``_Queries`` (all of them, or a share in
  query-parallel n-SPSA, the others' losses arriving by an exchange);
- how the update is made: ``MeZO._apply`` with one per-parameter rule (``sgd``,
  ``momentum``, ``adam``, or the fused restore-and-update above, which needs n = 1,
  sgd, in-place perturbation and one process: ``MeZO._fused``).

Every step appends one flat record to ``opt.trajectory``; ``replay`` re-applies
those records to the base weights with the same weight passes as ``step`` (the
fused decision included) and reproduces the trained weights bit for bit (same
backend, same settings), which is why a run's checkpoint can be a few KB.

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

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from zoobj.engine.noise import NOISE_BACKENDS, _axpz_param, _chunk_axpz, _flat, kernel_for, noise, step_seed
from zoobj.engine.perturb import Forward, InPlace, atomic

__all__ = [
    "MeZO",
    "NonFiniteLossError",
    "PERTURB",
    "RECORD_KEYS",
    "RULES",
    "SHAPINGS",
    "decay_groups",
    "noise",
    "replay",
    "shaped_coefficients",
    "step_seed",
]

RULES = ("sgd", "momentum", "adam")
SHAPINGS = ("none", "zscore", "rank")
PERTURB = ("inplace", "forward")
RECORD_KEYS = ("step", "seeds", "grads", "lr", "loss_plus", "loss_minus", "ties", "skipped")

_STATE_CHUNK = 1 << 20  # elements per chunk for the momentum / adam updates


class NonFiniteLossError(FloatingPointError):
    """The closure returned NaN or inf and the optimizer was asked to raise."""


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



# ----------------------------------------------------------------------------- sharding


class _Queries:
    """Which of a step's directions this process evaluates, and how the others' losses arrive.

    One process evaluates them all. With ``shard=(rank, world)`` (query-parallel n-SPSA)
    it evaluates ``k % world == rank`` and ``exchange`` brings every process's rows.
    """

    def __init__(self, shard: tuple[int, int] | None, exchange: Callable[[torch.Tensor], torch.Tensor] | None) -> None:
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
        shaping: how the ``2n`` losses of a step become the update's coefficients
            ``c_k`` (``theta -= lr * mean_k c_k z_k``, ``grads`` in the record):
            ``"none"``, the projected gradients ``(l+_k - l-_k) / (2 eps)`` (n-SPSA;
            ``lr`` multiplies the raw size of a loss change); ``"zscore"``, half the
            difference of the losses standardised over the step's ``2n`` values;
            ``"rank"``, half the difference of their centred ranks in [-1/2, 1/2]
            (ties share their mean rank). Shaped coefficients are unit-free, so ``lr``
            is a step length in parameter space per unit of ``z``, whatever the scale
            of the reward; ``rank`` is unchanged by any increasing transform of the
            loss, ``zscore`` by any positive affine one (see ``shaped_coefficients``).
            A step whose ``2n`` losses are all equal moves nothing.
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
        shaping: str = "none",
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
        if shaping not in SHAPINGS:
            raise ValueError(f"unknown shaping {shaping!r}; choose one of {', '.join(SHAPINGS)}")
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
        self.on_nonfinite, self.shaping = on_nonfinite, shaping
        self.param_groups = self._groups(params)
        self.state: dict[int, dict[str, torch.Tensor]] = {}
        self.trajectory: list[dict] = []
        self.step_count = 0
        self.perturb, self.shard, self.exchange = perturb, shard, exchange
        self._kernel = kernel_for(noise)
        if noise == "compiled" and self.noise_backend != "compiled":
            raise RuntimeError("noise='compiled': torch.compile is not available for the noise kernel here "
                               "(ZOOBJ_COMPILE=0, no C++ compiler, or an unsupported device)")
        # the variations, decided once: how to perturb, which directions are ours, how to update
        trained = list(self._params())
        self._perturb = (InPlace(trained, self.eps, self._kernel) if perturb == "inplace"
                         else Forward(trained, self.eps, self._kernel, model))
        self._queries = _Queries(shard, exchange)
        # fused: the probe's third pass (the restore) also applies the update -- in step and in replay
        self._fused = n == 1 and rule == "sgd" and perturb == "inplace" and shard is None
        self._rule = self._fused_sgd if self._fused else self._sgd if rule == "sgd" else self._stateful

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

    def remove_hooks(self) -> None:
        """Take the forward hooks of ``perturb="forward"`` off the model."""
        self._perturb.release()

    # -- the step ----------------------------------------------------------------

    def step(self, closure: Callable[[], Any], probes: Callable[[list], Any] | None = None) -> float:
        """One SPSA step; see the class docstring. Returns the mean of l+ and l-.

        ``probes`` (optional): evaluates the step's 2n points together. It gets, for
        each direction in turn, the trained tensors at theta + eps z and then at
        theta - eps z (new tensors, in parameter order; the weights are not written) and
        returns the 2n losses in that order, or None to have ``closure`` evaluate them
        one by one as usual. For a small trained set (a template tail) where one batched
        forward over all the probes is much cheaper than 2n forwards. The points are
        computed with the same arithmetic as the in-place passes, and those passes are
        still made after, so the weights and ``replay`` are exactly as without it. Used
        with in-place perturbation in one process; ignored otherwise."""
        if closure is None:
            raise TypeError("MeZO.step needs a closure that returns the loss")
        t, lr = self.step_count, self.lr_at(self.step_count)
        seeds = [step_seed(self.seed, t, k) for k in range(self.n)]  # n directions from (seed, step)
        together = self._probe_together(seeds, probes) if probes is not None else None
        # (l+, l-) each; restores on error
        plus, minus = together if together is not None else self._probe_all(seeds, closure)
        grads, skipped = self._estimate(t, plus, minus)  # projected gradients
        record = {
            "step": t,
            "seeds": seeds,
            "grads": grads,
            "lr": lr,
            "loss_plus": [_finite_or_none(x) for x in plus],
            "loss_minus": [_finite_or_none(x) for x in minus],
            "ties": sum(a == b for a, b in zip(plus, minus)),
            "skipped": skipped,
        }
        self._commit(record)  # update and record, together
        return sum(plus + minus) / (2 * self.n)

    def _probe_all(self, seeds: list[int], closure: Callable[[], Any]) -> tuple[list[float], list[float]]:
        """(l+, l-) for every direction: evaluated here, or by another process and exchanged."""
        plus, minus = [math.nan] * self.n, [math.nan] * self.n
        for k, s in enumerate(seeds):
            try:
                if self._queries.mine(k):
                    plus[k], minus[k] = self._probe(s, closure)
                else:  # the same weight passes, no forwards: the replicas (and replay) round alike
                    self._passes(s, finite=True)
            except BaseException:
                self._perturb.restore(s)  # back to where the step began
                raise
        self._queries.gather(plus, minus)
        return plus, minus

    def points(self, seeds: Sequence[int]) -> list[list[torch.Tensor]]:
        """The trained tensors where ``_probe`` evaluates them, bit for bit, as new tensors:
        for each seed in turn, after ``+eps z`` and after ``-2 eps z``, then back by ``+eps z``
        (so a later direction starts from the same rounded point as in place)."""
        out = []
        with torch.no_grad():
            cur = [(i, p.detach().clone()) for i, p in self._params()]
            for s in seeds:
                for coef in (1.0, -2.0):
                    for i, q in cur:
                        _axpz_param(q, s, i, 1.0, coef * self.eps, self._kernel)
                    out.append([q.clone() for _, q in cur])
                for i, q in cur:
                    _axpz_param(q, s, i, 1.0, self.eps, self._kernel)
        return out

    def _probe_together(self, seeds: list[int],
                        probes: Callable[[list], Any]) -> tuple[list[float], list[float]] | None:
        """(l+, l-) for every direction from one call of ``probes`` (see ``step``); None where it
        does not apply or declines. The weight passes follow, as the probes one by one make them."""
        if self.perturb != "inplace" or self.shard is not None:
            return None
        losses = probes(self.points(seeds))
        if losses is None:
            return None
        losses = list(losses)
        if len(losses) != 2 * self.n:
            raise ValueError(f"probes returned {len(losses)} losses for {2 * self.n} points")
        plus = [_as_float(x, "l+") for x in losses[0::2]]
        minus = [_as_float(x, "l-") for x in losses[1::2]]
        for s, lp, lm in zip(seeds, plus, minus):
            try:
                self._passes(s, finite=math.isfinite(lp) and math.isfinite(lm))
            except BaseException:  # an interrupt between two passes
                self._perturb.restore(s)
                raise
        return plus, minus

    def _probe(self, s: int, closure: Callable[[], Any]) -> tuple[float, float]:
        """l+ at theta + eps z(s), l- at theta - eps z(s), then back to theta (or left for the fused update)."""
        self._perturb.shift(s, +1.0)
        lp = _as_float(closure(), "l+")
        self._perturb.check_reached()
        self._perturb.shift(s, -2.0)
        lm = _as_float(closure(), "l-")
        self._back(s, math.isfinite(lp) and math.isfinite(lm))
        return lp, lm

    def _passes(self, s: int, finite: bool) -> None:
        """The weight passes of ``_probe`` without its forwards (another process's direction; replay)."""
        self._perturb.shift(s, +1.0)
        self._perturb.shift(s, -2.0)
        self._back(s, finite)

    def _back(self, s: int, finite: bool) -> None:
        """Restore theta now, unless the fused update will (its pass is the restore)."""
        if not (self._fused and finite):
            self._perturb.shift(s, +1.0)

    def _estimate(self, t: int, plus: list[float], minus: list[float]) -> tuple[list[float], bool]:
        """The projected gradients (l+ - l-) / (2 eps), and whether the step is skipped (a loss not finite)."""
        skipped = not all(math.isfinite(x) for x in plus + minus)
        if skipped and self.on_nonfinite == "raise":
            raise NonFiniteLossError(
                f"step {t}: the closure returned a non-finite loss (l+={plus}, l-={minus}); "
                "the weights were restored"
            )
        if skipped:
            return [0.0] * self.n, True
        if self.shaping == "none":
            return [_round((lp - lm) / (2 * self.eps)) for lp, lm in zip(plus, minus)], False
        return [_round(c) for c in shaped_coefficients(plus, minus, self.shaping)], False

    def _commit(self, record: dict) -> None:
        """Apply a record's update and append it: both land, or neither does."""
        with atomic():
            if not record["skipped"]:
                self._apply(record["seeds"], record["grads"], record["lr"])
            self.trajectory.append(record)
            self.step_count += 1

    # -- the update: one rule per parameter, chosen at construction ------------

    def _apply(self, seeds: Sequence[int], grads: Sequence[float], lr: float) -> None:
        """theta <- decay * theta - (the rule's step along sum_k g_k z_k / n), group by group."""
        with atomic(), torch.no_grad():
            for group in self.param_groups:
                glr = self._group_lr(group, lr)
                decay = 1.0 - glr * group["weight_decay"]
                for i, p in zip(group["index"], group["params"]):
                    self._rule(i, p, seeds, grads, glr, decay)
            if self._fused:
                self._perturb.offset = 0.0  # that pass was also the restore

    def _fused_sgd(self, i: int, p: torch.Tensor, seeds, grads, glr: float, decay: float) -> None:
        """From theta - eps*z to decay*theta - lr*g*z in one pass (rule sgd, n = 1, in place)."""
        _axpz_param(p, seeds[0], i, decay, decay * self.eps - glr * grads[0], self._kernel)

    def _sgd(self, i: int, p: torch.Tensor, seeds, grads, glr: float, decay: float) -> None:
        """At the restored base point: one pass per direction, the decay in the first."""
        n = len(seeds)
        for k, (s, g) in enumerate(zip(seeds, grads)):
            _axpz_param(p, s, i, decay if k == 0 else 1.0, -glr * g / n, self._kernel)

    def _stateful(self, i: int, p: torch.Tensor, seeds, grads, glr: float, decay: float) -> None:
        """Momentum or adam on the estimate sum_k g_k z_k / n, built chunk by chunk in fp32."""
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

    # -- replay ----------------------------------------------------------------

    def replay(self, trajectory: Iterable[dict]) -> None:
        """Re-apply recorded steps to the current (base) weights, pass for pass.

        Steps must follow on from ``self.step_count``. With the same settings and
        noise backend the result is bit-identical to the weights after training:
        each direction gets the weight passes ``step`` gave it, and the same update.
        """
        for rec in trajectory:
            missing = [k for k in RECORD_KEYS if k not in rec]
            if missing:
                raise ValueError(f"trajectory record lacks {', '.join(missing)}: {rec!r}")
            if rec["step"] != self.step_count:
                raise ValueError(f"trajectory record for step {rec['step']} where step {self.step_count} was expected")
            if len(rec["seeds"]) != self.n:
                raise ValueError(f"trajectory record for step {rec['step']} has {len(rec['seeds'])} directions, "
                                 f"this optimizer n={self.n}")
            for s in rec["seeds"]:
                self._passes(s, finite=not rec["skipped"])  # +eps z, -2 eps z, and the restore unless fused
            self._commit(dict(rec))

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


def shaped_coefficients(plus: Sequence[float], minus: Sequence[float], shaping: str) -> list[float]:
    """``c_k = (s(l+_k) - s(l-_k)) / 2`` where ``s`` standardises (``"zscore"``) or
    centre-ranks (``"rank"``) the step's ``2n`` losses together; all equal: zeros.

    >>> [round(c, 4) for c in shaped_coefficients([3.0, 1.0], [1.0, 1.0], "rank")]  # ranks 3, 1, 1, 1
    [0.3333, 0.0]
    >>> shaped_coefficients([2.0], [0.0], "zscore"), shaped_coefficients([5.0, 5.0], [5.0, 5.0], "zscore")
    ([1.0], [0.0, 0.0])
    """
    values = [*plus, *minus]
    m = len(values)
    if shaping == "zscore":
        mean = math.fsum(values) / m
        std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / m)
        s = [(v - mean) / std if std > 0 else 0.0 for v in values]
    elif shaping == "rank":
        order = sorted(range(m), key=values.__getitem__)
        rank = [0.0] * m
        i = 0
        while i < m:  # equal values share the mean of their ranks
            j = i
            while j + 1 < m and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in order[i : j + 1]:
                rank[k] = (i + j) / 2
            i = j + 1
        s = [r / (m - 1) - 0.5 for r in rank]
    else:
        raise ValueError(f"unknown shaping {shaping!r}; choose one of {', '.join(SHAPINGS[1:])}")
    n = len(plus)
    return [(s[k] - s[n + k]) / 2 for k in range(n)]


def replay(params: Iterable, trajectory: Iterable[dict], **settings: Any) -> MeZO:
    """Rebuild trained weights: apply ``trajectory`` to ``params`` (the base weights).

    ``settings`` are the optimizer's (``lr``, ``eps``, ``seed``, ``rule``,
    ``weight_decay``, ...) as used in training; the parameter order must be the
    training order. Returns the optimizer, ready to continue training.
    """
    opt = MeZO(params, **settings)
    opt.replay(trajectory)
    return opt

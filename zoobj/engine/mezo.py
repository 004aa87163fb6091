"""MeZO: memory-efficient zeroth-order SGD (Malladi et al., NeurIPS 2023).

The algorithm only. It knows nothing of models, tasks or metrics: it moves a list
of tensors along seeded random directions and asks a closure for a number.

One step with step seed ``s`` (``z``, signs +-1 by default or ``N(0, I)``, is regenerated
from ``s``, never stored)::

    theta += eps * z            l+ = closure()
    theta -= 2 * eps * z        l- = closure()
    g = (l+ - l-) / (2 * eps)
    theta += (eps - lr * g) * z          # restore and update in one move

so ``z`` is produced three times a step and nothing the size of the model is
allocated. Moves are written in passes over the weights; with ``passes="fused"`` a move
that no forward waits for (a restore, an update) is held and written in the same pass as
the next move -- one read and write for both, the same bits -- so a step of a loop that
calls ``step(closure, settle=False)`` makes two passes. ``MeZO.step`` reads as those
lines do; each variation is a piece it calls, chosen once at construction:

- the noise ``z``: ``zoobj.engine.noise`` (counter-based, the same numbers on any thread
  count, compiled where ``torch.compile`` works and eager elsewhere);
- how the weights are perturbed: ``zoobj.engine.perturb`` (in place, or by forward hooks
  that build each perturbed tensor in a temporary);
- which directions this process evaluates: ``zoobj.engine.perturb.Queries`` (all of
  them, or a share in query-parallel n-SPSA, the others' losses arriving by an exchange);
- how the losses become coefficients: ``zoobj.engine.shaping`` (spsa, zscore, rank);
- how the update is made: ``MeZO._apply`` with one per-parameter rule from
  ``zoobj.engine.rules`` (``sgd`` moves, ``momentum``, ``adam``; the restore-and-update move
  above needs n = 1, sgd, in-place perturbation and one process: ``MeZO._fused``).

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

from zoobj.engine.noise import NOISE_BACKENDS, kernel_for, noise, step_seed
from zoobj.engine.perturb import Forward, InPlace, Points, Queries, atomic
from zoobj.engine.rules import RULES, Stateful, decay_groups, param_groups, sgd_moves
from zoobj.engine.settings import PASSES, PERTURB, check_settings
from zoobj.engine.shaping import SHAPINGS, as_loss, coefficients, finite_or_none, round8, shaped_coefficients

__all__ = ["MeZO", "NonFiniteLossError", "PASSES", "PERTURB", "RECORD_KEYS", "RULES", "SHAPINGS", "decay_groups",
           "noise", "replay", "shaped_coefficients", "step_seed"]

RECORD_KEYS = ("step", "seeds", "grads", "lr", "loss_plus", "loss_minus", "ties", "skipped")

class NonFiniteLossError(FloatingPointError):
    """The closure returned NaN or inf and the optimizer was asked to raise."""


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
        noise: the directions ``z``: ``"rademacher"`` (+-1 per element, Spall's SPSA; several
            times cheaper per element) or ``"gaussian"`` (the paper's; the default until
            0.3). A kernel form given here (the older meaning) sets ``noise_backend``
            and Gaussian directions.
        passes: ``"fused"`` (a held move joins the next pass: one read and write of the
            weights for both) or ``"separate"`` (one pass per move, as zoobj before 0.3);
            the same bits either way.
        noise_backend: which form of the kernel runs: ``"auto"`` (compiled where
            ``torch.compile`` works, else eager), ``"compiled"`` (raise RuntimeError where
            it does not) or ``"eager"``; they agree only to float32 rounding of ``z``, so
            replaying bit for bit needs the form that made it (property ``noise_backend``).
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
        noise: str = "rademacher",
        shaping: str = "none",
        noise_backend: str = "auto",
        passes: str = "fused",
    ) -> None:
        if noise in NOISE_BACKENDS:  # the older meaning of ``noise``: the kernel's form
            noise, noise_backend = "gaussian", noise
        check_settings(lr, eps, n, rule, on_nonfinite, perturb, shaping, noise, noise_backend, passes, model, shard,
                       exchange)
        self.defaults = {"lr": float(lr), "weight_decay": float(weight_decay)}
        self.eps, self.seed, self.n, self.rule = float(eps), int(seed), n, rule
        self.momentum, self.betas, self.adam_eps = momentum, tuple(betas), adam_eps
        self.schedule = schedule
        self.on_nonfinite, self.shaping = on_nonfinite, shaping
        self.param_groups = param_groups(params, self.defaults["lr"], self.defaults["weight_decay"])
        self.trajectory: list[dict] = []
        self.step_count = 0
        self.perturb, self.shard, self.exchange, self.passes = perturb, shard, exchange, passes
        self.noise, self._kernel = noise, kernel_for(noise_backend, noise)
        if noise_backend == "compiled" and self.noise_backend != "compiled":
            raise RuntimeError("noise='compiled': torch.compile is not available for the noise kernel here "
                               "(ZOOBJ_COMPILE=0, no C++ compiler, or an unsupported device)")
        # the variations, decided once: how to perturb, which directions are ours, how to update
        trained = list(self._params())
        fuse = passes == "fused"
        self._perturb = (InPlace(trained, self.eps, self._kernel, fuse) if perturb == "inplace"
                         else Forward(trained, self.eps, self._kernel, model, fuse))
        self._queries = Queries(shard, exchange)
        # fused: the probe's third pass (the restore) also applies the update -- in step and in replay
        self._fused = n == 1 and rule == "sgd" and perturb == "inplace" and shard is None
        self._stateful = Stateful(rule, momentum, self.betas, adam_eps)  # its buffers: self.state

    # -- setup ---------------------------------------------------------------

    def _params(self):
        for g in self.param_groups:
            yield from zip(g["index"], g["params"])

    def lr_at(self, step: int) -> float:
        """The base learning rate used at ``step``."""
        factor = 1.0 if self.schedule is None else float(self.schedule(step))
        return round8(self.defaults["lr"] * factor)

    def _group_lr(self, g: dict, lr: float) -> float:
        base = self.defaults["lr"]
        return g["lr"] * (lr / base) if base else g["lr"]

    @property
    def state(self) -> dict[int, dict[str, torch.Tensor]]:
        """The momentum / adam buffers, per tensor index (empty for sgd)."""
        return self._stateful.state

    @state.setter
    def state(self, value: dict[int, dict[str, torch.Tensor]]) -> None:
        self._stateful.state = value

    def remove_hooks(self) -> None:
        """Take the forward hooks of ``perturb="forward"`` off the model."""
        self._perturb.release()

    # -- the step ----------------------------------------------------------------

    def step(self, closure: Callable[[], Any], probes: Callable[[list], Any] | None = None,
             settle: bool = True) -> float:
        """One SPSA step; see the class docstring. Returns the mean of l+ and l-.

        ``settle=False`` leaves the step's last move (the update) held, to be written in
        the next step's first pass: until that step or ``settle()``, the weights read as
        they were before the update. For a loop that only steps; see ``settle``.

        ``probes`` (optional): evaluates the step's 2n points together. It gets, for
        each direction in turn, the trained tensors at theta + eps z and then at
        theta - eps z (new tensors, in parameter order, made on first access; the
        weights are not written) and
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
        try:  # the weights may still sit at theta - eps z, for the fused update to restore
            grads, skipped = self._estimate(t, plus, minus)  # projected gradients
            record = {
                "step": t,
                "seeds": seeds,
                "grads": grads,
                "lr": lr,
                "loss_plus": [finite_or_none(x) for x in plus],
                "loss_minus": [finite_or_none(x) for x in minus],
                "ties": sum(a == b for a, b in zip(plus, minus)),
                "skipped": skipped,
            }
            self._commit(record)  # update and record, together
        except BaseException:  # an interrupt before the update: back to theta, nothing recorded
            self._perturb.restore(seeds[-1])
            raise
        if settle:
            self.settle()
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
        """The trained tensors where ``_probe`` evaluates them, bit for bit, as new tensors
        (``InPlace.points``: the in-place passes' own arithmetic)."""
        return self._perturb.points(list(seeds))

    def _probe_together(self, seeds: list[int],
                        probes: Callable[[list], Any]) -> tuple[list[float], list[float]] | None:
        """(l+, l-) for every direction from one call of ``probes`` (see ``step``); None where it
        does not apply or declines. The weight passes follow, as the probes one by one make them."""
        if self.perturb != "inplace" or self.shard is not None:
            return None
        losses = probes(Points(lambda: self.points(seeds), 2 * self.n))  # made only if looked at
        if losses is None:
            return None
        losses = list(losses)
        if len(losses) != 2 * self.n:
            raise ValueError(f"probes returned {len(losses)} losses for {2 * self.n} points")
        plus = [as_loss(x, "l+") for x in losses[0::2]]
        minus = [as_loss(x, "l-") for x in losses[1::2]]
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
        lp = as_loss(closure(), "l+")
        self._perturb.check_reached()
        self._perturb.shift(s, -2.0)
        lm = as_loss(closure(), "l-")
        self._back(s, math.isfinite(lp) and math.isfinite(lm))
        return lp, lm

    def _passes(self, s: int, finite: bool) -> None:
        """The weight passes of ``_probe`` without its forwards (another process's direction; replay)."""
        self._perturb.shift(s, +1.0)
        self._perturb.shift(s, -2.0)
        self._back(s, finite)

    def _back(self, s: int, finite: bool) -> None:
        """Restore theta, unless the update will (its move is the restore): held for the next pass."""
        if not (self._fused and finite):
            self._perturb.shift(s, +1.0, write=False)

    def settle(self) -> None:
        """Write every held move: the weights are then the trained ones of the steps taken
        (call it after ``step(..., settle=False)`` before reading or saving them)."""
        self._perturb.flush()

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
        return coefficients(plus, minus, self.eps, self.shaping), False

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
            if self.rule != "sgd":
                self._perturb.flush()  # the rule reads the restored weights
            for group in self.param_groups:
                glr = self._group_lr(group, lr)
                decay = 1.0 - glr * group["weight_decay"]
                for i, p in zip(group["index"], group["params"]):
                    if self.rule == "sgd":  # moves, written with the next pass where passes are fused
                        self._perturb.queue(i, p, sgd_moves(seeds, grads, glr, decay, self.eps, self._fused))
                    else:
                        self._stateful(i, p, seeds, grads, glr, decay, self.eps, self._kernel)
            if self._fused:
                self._perturb.offset = 0.0  # that pass was also the restore

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
        self.settle()

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
        return "compiled" if self._kernel.compiled_for(first.device.type) is not None else "eager"



def replay(params: Iterable, trajectory: Iterable[dict], **settings: Any) -> MeZO:
    """Rebuild trained weights: apply ``trajectory`` to ``params`` (the base weights).

    ``settings`` are the optimizer's (``lr``, ``eps``, ``seed``, ``rule``,
    ``weight_decay``, ...) as used in training; the parameter order must be the
    training order. Returns the optimizer, ready to continue training.
    """
    opt = MeZO(params, **settings)
    opt.replay(trajectory)
    return opt

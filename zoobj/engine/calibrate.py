"""``--eps auto``: the smallest perturbation scale at which the loss notices the perturbation.

A metric with steps -- accuracy over a batch, F1 of a few greedy answers -- returns
exactly the same number at ``theta + eps z`` and ``theta - eps z`` when ``eps`` is too
small to flip any prediction: the step is a tie and moves nothing. ``calibrate_eps``
probes seeded directions, each on its own batch (one closure per direction), at the
values of an ascending grid, and returns the smallest value at which at most
``max_tie_fraction`` of the directions are unusable (tied, or a loss that is not
finite). The grid is searched by bisection, on the premise that larger perturbations
flip more predictions, so a grid of 5 values costs at most 3 probe rounds (and one
unperturbed evaluation per closure). A value is too large, and the search goes lower,
when most of its unusable probes are not finite or tie *away* from the unperturbed
loss (saturated: F1 is 0 on both sides once both answers are garbled); a tie at the
unperturbed loss means too small.

The weights are exactly what they were when it returns, or when a closure raises:
with ``model`` the perturbation is built by forward hooks and never written
(``zoobj.engine.perturb.Forward``); without it, each shift is written in place and the
trained tensors are copied back from a host copy at the end (memory: one copy of the
trained tensors), which is also the fallback where a trained tensor is used outside
its module's forward. The probe directions come from a step index no run reaches, so
they are not the directions of the run's first steps.

>>> import torch
>>> w = torch.zeros(8)
>>> flips = lambda: float((w > 0.05).sum())   # a loss with plateaus
>>> cal = calibrate_eps([w], [flips] * 4, eps_grid(1e-2), seed=0)
>>> cal.eps > 1e-2, bool((w == 0).all())       # too small a shift flips nothing; w untouched
(True, True)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from zoobj.engine.noise import kernel_for, step_seed
from zoobj.engine.perturb import Forward, InPlace, NotReachable, atomic

CALIBRATION_STEP = 1 << 40  # the step index of the probe directions: a step no run reaches
MAX_TIE_FRACTION = 0.25
PROBES = 8


def eps_grid(base: float, low: int = 0, high: int = 4) -> list[float]:
    """``base * 10 ** (k / 2)`` for ``k = low .. high``: half-decades from ``base`` up.

    Never below the default: a smaller eps does not untie anything, and a loss that
    never ties (cross-entropy, ``--smooth``) keeps the paper's value.

    >>> eps_grid(1e-3)
    [0.001, 0.00316, 0.01, 0.0316, 0.1]
    """
    return [float(f"{base * 10 ** (k / 2):.3g}") for k in range(low, high + 1)]


@dataclass
class Calibration:
    """What ``calibrate_eps`` found: ``eps`` (None when no grid value worked), and each
    tested value with its count of tied and of non-finite probes, in the order tested."""

    eps: float | None
    probes: int
    max_tie_fraction: float
    grid: list[float]
    tested: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"eps": self.eps, "probes": self.probes, "max_tie_fraction": self.max_tie_fraction,
                "grid": self.grid, "tested": self.tested}

    def usable(self, row: dict) -> bool:
        return row["ties"] + row["saturated"] + row["nonfinite"] <= self.max_tie_fraction * self.probes


def calibrate_eps(params: Sequence[torch.Tensor], closures: Sequence[Callable[[], float]], grid: Sequence[float], *,
                  seed: int = 0, max_tie_fraction: float = MAX_TIE_FRACTION, model: torch.nn.Module | None = None,
                  noise: str = "auto", kind: str = "gaussian") -> Calibration:
    """The smallest ``eps`` in ``grid`` at which at most ``max_tie_fraction`` of the
    probe directions (one per closure) leave the loss unchanged; see the module docstring.

    ``params``: the trained tensors, in the optimizer's order (the order keys the noise);
    ``model``: the module holding them, to perturb through forward hooks (weights never
    written); ``noise``: the noise kernel (``zoobj.engine.noise.NOISE_BACKENDS``); ``kind``:
    the directions (``NOISE_KINDS``), the run's own."""
    grid = sorted(float(e) for e in grid)
    if not grid or not all(math.isfinite(e) and e > 0 for e in grid):
        raise ValueError(f"the eps grid must hold finite values > 0, got {list(grid)!r}")
    if not closures:
        raise ValueError("calibrate_eps needs at least one closure (one probe direction each)")
    cal = Calibration(None, len(closures), max_tie_fraction, grid)
    base = [float(c()) for c in closures]  # each probe batch's loss at the unperturbed weights
    lo, hi, best = 0, len(grid), None  # the answer's index lies in [lo, hi), if anywhere
    while lo < hi:
        mid = (lo + hi) // 2
        try:
            row = _probe_round(list(params), closures, base, grid[mid], seed, model, kernel_for(noise, kind))
        except NotReachable:  # a tensor no module's forward owns: write the shifts, copy back
            model = None
            row = _probe_round(list(params), closures, base, grid[mid], seed, model, kernel_for(noise, kind))
        cal.tested.append(row)
        if cal.usable(row):
            best, hi = mid, mid
        elif row["saturated"] + row["nonfinite"] > row["ties"]:  # too far: the loss breaks down; look lower
            hi = mid
        else:  # too close: look higher
            lo = mid + 1
    cal.eps = grid[best] if best is not None else None
    return cal


def _probe_round(params: list, closures, base: list[float], eps: float, seed: int, model, kernel) -> dict:
    """l+ and l- of each probe direction at scale ``eps``: how many tie at the unperturbed
    loss (too small to flip anything), how many tie away from it (saturated: both sides
    broken alike, as F1 is 0 for two garbled answers), how many are not finite."""
    trained = list(enumerate(params))
    held = None if model is not None else [p.detach().to("cpu", copy=True) for p in params]
    perturb = Forward(trained, eps, kernel, model) if model is not None else InPlace(trained, eps, kernel)
    ties = saturated = nonfinite = 0
    try:
        for j, closure in enumerate(closures):
            s = step_seed(seed, CALIBRATION_STEP, j)
            perturb.shift(s, +1.0)
            lp = float(closure())
            perturb.check_reached()
            perturb.shift(s, -2.0)
            lm = float(closure())
            perturb.shift(s, +1.0)
            if not (math.isfinite(lp) and math.isfinite(lm)):
                nonfinite += 1
            elif lp == lm == base[j]:
                ties += 1
            elif lp == lm:
                saturated += 1
    finally:
        if held is None:
            perturb.restore(0)  # the hooks' temporaries dropped; nothing was written
            perturb.release()
        else:  # bit for bit where the round began
            with atomic(), torch.no_grad():
                for p, h in zip(params, held):
                    p.copy_(h.to(p.device))
    return {"eps": eps, "ties": ties, "saturated": saturated, "nonfinite": nonfinite}

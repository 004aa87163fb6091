"""``--eps auto``: the smallest perturbation scale at which the loss notices the perturbation;
``--scale auto``: how much larger lr and eps must be for this model to answer a probe.

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

``calibrate_scale`` measures how far a probe moves the loss against how far the loss
moves from one batch to the next (its spread at the unperturbed weights): a model that
answers the same relative perturbation a quarter as much gets a larger step and probe,
the smallest factor of an ascending grid at which the median probe's ``|l+ - l-| / 2``
reaches ``target`` times the spread (never below 1: the settings it scales were chosen
where the model answers). The grid's first factor is tried first (one round where it is
enough), then a guess from its response, taken as proportional to the factor, and its
neighbours.

>>> import torch
>>> w = torch.zeros(8)
>>> flips = lambda: float((w > 0.05).sum())   # a loss with plateaus
>>> cal = calibrate_eps([w], [flips] * 4, eps_grid(1e-2), seed=0)
>>> cal.eps > 1e-2, bool((w == 0).all())       # too small a shift flips nothing; w untouched
(True, True)
"""

from __future__ import annotations

import contextlib
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from zoobj.engine.noise import kernel_for, step_seed
from zoobj.engine.perturb import Forward, InPlace, NotReachable, atomic

CALIBRATION_STEP = 1 << 40  # the step index of the probe directions: a step no run reaches
MAX_TIE_FRACTION = 0.25
PROBES = 8
SCALES = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0)  # --scale auto's grid
# a probe's median |l+ - l-| / 2 as a share of the loss's spread over batches, at least: Gemma-3-270M's
# template tail gives 0.044 at the default recipe's lr and eps on SST-2's first training batches and
# 0.099 on RTE's, SmolLM2-135M's 0.022 on SST-2's (docs/results.md, the default recipe)
TARGET_RESPONSE = 0.05
DIRECTIONS = 4  # --scale auto: probe directions per batch


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


@dataclass
class ScaleCalibration:
    """What ``calibrate_scale`` found: ``scale``; ``spread``, the standard deviation of the
    closures' losses at the unperturbed weights; ``tested``: each factor tried, in order,
    with ``response``, the median probe's ``|l+ - l-| / 2`` over ``spread``; ``why``: a
    line where the factor was not found by the target (no spread, or none reached it)."""

    scale: float
    spread: float
    target: float
    directions: int
    grid: list[float]
    tested: list[dict] = field(default_factory=list)
    why: str | None = None

    def as_dict(self) -> dict:
        out = {"scale": self.scale, "spread": self.spread, "target": self.target, "directions": self.directions,
               "grid": self.grid, "tested": self.tested}
        return {**out, "why": self.why} if self.why else out


def calibrate_scale(params: Sequence[torch.Tensor], closures: Sequence[Callable[[], float]], eps: float, *,
                    grid: Sequence[float] = SCALES, target: float = TARGET_RESPONSE, directions: int = DIRECTIONS,
                    seed: int = 0, model: torch.nn.Module | None = None, noise: str = "auto", kind: str = "gaussian",
                    probes: Sequence[Callable[[list], list[float] | None]] | None = None) -> ScaleCalibration:
    """The smallest factor ``k`` in ``grid`` at which ``directions`` seeded probes per
    closure at ``k * eps`` move the loss by at least ``target`` times its spread over the
    closures (see the module docstring); the largest where none does, 1 where the losses
    have no spread. ``probes[j]`` (optional): closure ``j``'s points together, as
    ``MeZO.step(probes=)`` takes them (None: one by one). The weights are never left moved."""
    grid = sorted(float(k) for k in grid)
    if not grid or not all(math.isfinite(k) and k > 0 for k in grid):
        raise ValueError(f"the scale grid must hold finite values > 0, got {list(grid)!r}")
    if len(closures) < 2:
        raise ValueError("calibrate_scale needs at least two closures (the loss's spread is over them)")
    base = [float(c()) for c in closures]
    spread = float(torch.tensor(base, dtype=torch.float64).std(unbiased=False)) if all(map(math.isfinite, base)) else 0.0
    cal = ScaleCalibration(grid[0], spread, target, directions, grid)
    if not spread > 0:
        cal.why = "the loss is the same on every batch (or not finite): no spread to measure a probe against"
        return cal
    def response(i: int) -> float:  # one round: the median probe at grid[i], in units of the spread
        pairs = _pairs(list(params), closures, eps * grid[i], seed, directions, model, kernel_for(noise, kind), probes)
        value = statistics.median(abs(lp - lm) / 2 if math.isfinite(lp) and math.isfinite(lm) else 0.0
                                  for lp, lm in pairs) / spread
        cal.tested.append({"scale": grid[i], "response": round(value, 4)})
        return value

    best = _smallest(grid, response, target)
    if best is None:
        best, cal.why = len(grid) - 1, f"no factor up to {grid[-1]:g} moved the loss by {target:g} of its spread"
    cal.scale = grid[best]
    return cal


def _smallest(grid: list[float], response: Callable[[int], float], target: float) -> int | None:
    """The index of the smallest grid value whose ``response`` reaches ``target`` (None:
    none), on the premise that the response grows with the factor: the first value; else a
    guess from its response taken as proportional to the factor, then down or up one value
    at a time (2 or 3 rounds where the guess is near)."""
    def reaches(i: int) -> bool:
        return response(i) >= target

    first = response(0)
    if first >= target:
        return 0
    if len(grid) == 1:
        return None
    want = grid[0] * target / first if first > 0 else grid[-1]
    i = max(1, next((k for k, g in enumerate(grid) if g >= want), len(grid) - 1))
    if reaches(i):
        while i > 1 and reaches(i - 1):
            i -= 1
        return i
    for k in range(i + 1, len(grid)):
        if reaches(k):
            return k
    return None


def _pairs(params: list, closures, eps: float, seed: int, directions: int, model, kernel,
           probes=None) -> list[tuple[float, float]]:
    """``(l+, l-)`` of ``directions`` seeded probes per closure at scale ``eps`` (the scale
    calibration's; its own seeds), together through ``probes[j]`` where it answers."""
    out = []
    for j, closure in enumerate(closures):
        seeds = [step_seed(seed, CALIBRATION_STEP + 1, j * directions + d) for d in range(directions)]
        losses = None
        if probes is not None and probes[j] is not None:
            losses = probes[j](InPlace(list(enumerate(params)), eps, kernel).points(seeds))
        if losses is not None:
            out += [(float(losses[2 * d]), float(losses[2 * d + 1])) for d in range(directions)]
            continue
        for s in seeds:
            out.append(_one_probe(params, closure, eps, s, model, kernel))
    return out


def _one_probe(params: list, closure, eps: float, s: int, model, kernel) -> tuple[float, float]:
    """l+ and l- of one direction, through forward hooks where ``model`` allows, else
    written in place (``_perturbing``)."""
    try:
        with _perturbing(params, eps, kernel, model) as perturb:
            return _plus_minus(perturb, closure, s)
    except NotReachable:  # a tensor no module's forward owns: write the shifts, copy back
        if model is None:
            raise
        with _perturbing(params, eps, kernel, None) as perturb:
            return _plus_minus(perturb, closure, s)


@contextlib.contextmanager
def _perturbing(params: list, eps: float, kernel, model):
    """Shifts of ``params`` at scale ``eps``: by forward hooks with ``model`` (nothing
    written), else in place from a host copy that is copied back; the weights exactly as
    they were afterwards, also when a closure raises."""
    trained = list(enumerate(params))
    held = None if model is not None else [p.detach().to("cpu", copy=True) for p in params]
    perturb = Forward(trained, eps, kernel, model) if model is not None else InPlace(trained, eps, kernel)
    try:
        yield perturb
    finally:
        if held is None:
            perturb.restore(0)  # the hooks' temporaries dropped; nothing was written
            perturb.release()
        else:  # bit for bit where it began
            with atomic(), torch.no_grad():
                for p, h in zip(params, held):
                    p.copy_(h.to(p.device))


def _plus_minus(perturb, closure, s: int) -> tuple[float, float]:
    """l+ at +eps z(s), l- at -eps z(s), then back."""
    perturb.shift(s, +1.0)
    lp = float(closure())
    perturb.check_reached()
    perturb.shift(s, -2.0)
    lm = float(closure())
    perturb.shift(s, +1.0)
    return lp, lm


def _probe_round(params: list, closures, base: list[float], eps: float, seed: int, model, kernel) -> dict:
    """l+ and l- of each probe direction at scale ``eps``: how many tie at the unperturbed
    loss (too small to flip anything), how many tie away from it (saturated: both sides
    broken alike, as F1 is 0 for two garbled answers), how many are not finite."""
    ties = saturated = nonfinite = 0
    with _perturbing(params, eps, kernel, model) as perturb:
        for j, closure in enumerate(closures):
            lp, lm = _plus_minus(perturb, closure, step_seed(seed, CALIBRATION_STEP, j))
            if not (math.isfinite(lp) and math.isfinite(lm)):
                nonfinite += 1
            elif lp == lm == base[j]:
                ties += 1
            elif lp == lm:
                saturated += 1
    return {"eps": eps, "ties": ties, "saturated": saturated, "nonfinite": nonfinite}

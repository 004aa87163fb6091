"""From a step's 2n losses to the update's coefficients, and what a loss may be.

``coefficients(plus, minus, eps, shaping)``: ``"none"``, the projected gradients
``(l+_k - l-_k) / (2 eps)`` (n-SPSA); ``"zscore"`` or ``"rank"``, the difference of the
losses standardised or centre-ranked over the step (``shaped_coefficients``): unit-free,
so ``lr`` is a step length per unit of noise, whatever the scale of the reward.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

SHAPINGS = ("none", "zscore", "rank")


def round8(x: float) -> float:
    """8 significant digits: short in JSON, and the value used is the value stored."""
    return float(f"{x:.8g}")


def finite_or_none(x: float) -> float | None:
    """A loss as a record stores it: rounded, or None where it is not finite."""
    return round8(x) if math.isfinite(x) else None


def as_loss(value: Any, which: str) -> float:
    """A closure's return value as a float: a Python or numpy number, or a one-element tensor."""
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


def coefficients(plus: Sequence[float], minus: Sequence[float], eps: float, shaping: str) -> list[float]:
    """The update's coefficient per direction, rounded as the record stores it."""
    if shaping == "none":
        return [round8((lp - lm) / (2 * eps)) for lp, lm in zip(plus, minus)]
    return [round8(c) for c in shaped_coefficients(plus, minus, shaping)]


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

"""Helpers shared by the metric modules."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence


def check_batch(
    predictions: Sequence, references: Sequence, prompts: Sequence | None = None, rows: Sequence | None = None
) -> int:
    """Return the batch size; raise ValueError if it is empty or the lengths differ."""
    n = len(predictions)
    for label, seq in (("references", references), ("prompts", prompts), ("rows", rows)):
        if seq is not None and len(seq) != n:
            raise ValueError(f"{n} predictions but {len(seq)} {label}")
    if n == 0:
        raise ValueError("empty batch: there are no predictions to score")
    return n


def mean(values: Iterable[float]) -> float:
    """Mean of a non-empty iterable of floats, summed exactly."""
    values = list(values)
    return math.fsum(values) / len(values)

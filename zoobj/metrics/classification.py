"""Classification metrics on class indices: accuracy and macro-F1."""

from __future__ import annotations

from collections.abc import Sequence

from zoobj.metrics._common import check_batch, mean

__all__ = ["accuracy", "correct", "macro_f1"]


def correct(prediction, reference) -> float:
    """1.0 if the predicted class is the reference class, else 0.0.

    >>> correct(2, 2), correct(2, 0)
    (1.0, 0.0)
    """
    return float(prediction == reference)


def accuracy(predictions: Sequence, references: Sequence, *, prompts=None, rows=None) -> float:
    """Fraction of predictions equal to their reference (``prompts``/``rows`` are ignored).

    >>> accuracy([0, 1, 1, 2], [0, 1, 0, 2])
    0.75
    """
    check_batch(predictions, references)
    return mean(correct(p, r) for p, r in zip(predictions, references))


def macro_f1(predictions: Sequence, references: Sequence, *, prompts=None, rows=None) -> float:
    """Unweighted mean of per-class F1 (scikit-learn ``f1_score(average="macro")``).

    A class that is never predicted and never true does not count; an undefined F1
    (no true and no predicted examples of a class) is 0.

    >>> round(macro_f1([0, 1, 1, 1], [0, 0, 1, 1]), 4)  # class 0: 2/3, class 1: 4/5
    0.7333
    """
    from sklearn.metrics import f1_score  # slow to import: only when used

    check_batch(predictions, references)
    return float(f1_score(list(references), list(predictions), average="macro", zero_division=0))

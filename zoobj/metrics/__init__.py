"""Metrics and rewards: built-ins, a plain dict registry, and user functions.

Every metric returned by :func:`get_metric` is called as
``metric(predictions, references, *, prompts=None, rows=None) -> float``, higher is
better; the built-ins return a fraction in [0, 1] and ignore ``prompts`` and ``rows``.

:func:`get_metric` takes a built-in name (:func:`list_metrics`), a
``"package.module:function"``, a ``"path/to/file.py:function"``, an
``"evaluate:NAME[#KEY][%]"`` (Hugging Face evaluate, if installed; ``#KEY`` picks the
result key, ``%`` says it is percent) or the path of a local evaluate metric script
(``path/to/metric.py[#KEY][%]``). User functions are wrapped by their signature:

- first parameter ``completions`` or ``prompts``: TRL reward form,
  ``reward(prompts=..., completions=..., **columns) -> list[float | None]``;
- first parameters ``predictions, references``: one float for the whole batch;
- any other two-argument function, e.g. ``reward(prediction, reference)``: per
  example, averaged over the batch;
- ``@reward(form="example" | "batch" | "trl")`` overrides the rule.

See :mod:`zoobj.metrics.user` for the details and the errors.

>>> round(get_metric("f1")(["Denmark and Norway"], [["Denmark, Iceland and Norway"]]), 4)  # 6/7
0.8571
>>> get_metric("em")(["The Beatles"], ["beatles"])
1.0
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from zoobj.errors import ConfigError
from zoobj.metrics._common import check_batch
from zoobj.metrics.classification import accuracy, correct, macro_f1
from zoobj.metrics.squad import exact_match, f1, normalize_answer, squad_exact_match, squad_f1
from zoobj.metrics.user import FORMS, UserMetric, as_metric, load_callable, load_evaluate, parse_evaluate, reward

__all__ = [
    "FORMS",
    "METRICS",
    "UserMetric",
    "accuracy",
    "as_metric",
    "bootstrap_ci",
    "check_fits",
    "exact_match",
    "f1",
    "get_metric",
    "list_metrics",
    "macro_f1",
    "normalize_answer",
    "per_example_scores",
    "reward",
    "squad_exact_match",
    "squad_f1",
]

METRICS: dict[str, Callable[..., float]] = {
    "accuracy": accuracy,
    "macro_f1": macro_f1,
    "f1": f1,
    "exact_match": exact_match,
    "em": exact_match,
}

# built-in metrics that take one kind of prediction: answer strings, or class indices
_TEXT, _CLASSES = ("f1", "exact_match", "em"), ("macro_f1",)


def check_fits(metric: str, kind: str, task: str) -> None:
    """Refuse, in one line, a built-in metric that cannot read this kind of task's
    predictions (generated strings, or class indices) and name the ones that can.

    >>> check_fits("f1", "generation", "squad")
    >>> check_fits("f1", "classification", "sst2")
    Traceback (most recent call last):
    ...
    zoobj.errors.ConfigError: --metric f1 compares answer strings, but sst2 is a classification task: its predictions are class indices; use accuracy or macro_f1
    """
    if kind == "classification" and metric in _TEXT:
        raise ConfigError(f"--metric {metric} compares answer strings, but {task} is a classification task: its "
                          "predictions are class indices; use accuracy or macro_f1")
    if kind == "generation" and metric in _CLASSES:
        raise ConfigError(f"--metric {metric} compares class indices, but {task} is a generation task: its "
                          "predictions are answer strings; use f1, exact_match or accuracy")


# built-in metrics that are the mean of a per-example score
_PER_EXAMPLE = {accuracy: correct, f1: squad_f1, exact_match: squad_exact_match}


def list_metrics() -> list[str]:
    """Names of the built-in metrics.

    >>> list_metrics()
    ['accuracy', 'em', 'exact_match', 'f1', 'macro_f1']
    """
    return sorted(METRICS)


def get_metric(name: str | Callable) -> Callable[..., float]:
    """The metric named ``name`` (or wrapping the callable ``name``), ready to call.

    >>> get_metric("accuracy")([1, 0, 2], [1, 1, 2])
    0.6666666666666666
    >>> get_metric("operator:eq")(["a", "b"], ["a", "c"])  # per example, averaged
    0.5
    """
    if callable(name):
        return name if _is_builtin(name) else as_metric(name)
    if not isinstance(name, str):
        raise ConfigError(f"a metric is a name or a function, not a {type(name).__name__}")
    if name in METRICS:
        return METRICS[name]
    if name.startswith("evaluate:"):
        return load_evaluate(name)
    script = parse_evaluate(name)[0]
    if script.endswith(".py"):  # a local evaluate metric script, maybe with #KEY and %
        if not Path(script).expanduser().is_file():
            raise ConfigError(f"metric {name!r}: no such file (use path/to/file.py:function for a Python reward)")
        return load_evaluate(name)
    if ":" in name:
        fn = load_callable(name)
        return fn if _is_builtin(fn) else as_metric(fn, name)
    raise ConfigError(
        f"unknown metric {name!r}; valid names: {', '.join(list_metrics())}, "
        "or 'package.module:function', 'path/to/file.py:function', 'evaluate:NAME'"
    )


def per_example_scores(
    metric: str | Callable, predictions: Sequence, references: Sequence, prompts=None, rows=None
) -> list[float | None] | None:
    """Per-example scores if ``metric`` is a mean over examples, else None.

    A TRL reward's None ("not applicable") entries stay None.

    >>> per_example_scores("f1", ["Norway", "blue whale"], [["Norway"], ["whale shark"]])
    [1.0, 0.5]
    >>> per_example_scores("macro_f1", [0, 1], [0, 1]) is None
    True
    """
    metric = get_metric(metric)
    if isinstance(metric, UserMetric):
        return metric.scores(predictions, references, prompts=prompts, rows=rows)
    score = _PER_EXAMPLE.get(metric)
    if score is None:
        return None
    check_batch(predictions, references, prompts, rows)
    return [score(p, r) for p, r in zip(predictions, references)]


def bootstrap_ci(
    metric: str | Callable,
    predictions: Sequence,
    references: Sequence,
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    *,
    prompts=None,
    rows=None,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of ``metric`` over examples.

    Resamples examples with replacement (``numpy.random.default_rng(seed)``); when
    the metric has per-example scores their means are resampled, else the metric is
    recomputed on every resample. Same seed, same interval.

    >>> low, high = bootstrap_ci("accuracy", [1, 0, 1, 1] * 5, [1, 1, 1, 1] * 5)
    >>> low <= 0.75 <= high
    True
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be at least 1, got {n_resamples}")
    metric = get_metric(metric)
    n = check_batch(predictions, references, prompts, rows)
    rng = np.random.default_rng(seed)
    scores = per_example_scores(metric, predictions, references, prompts, rows)
    if scores is not None:
        values = np.array([s for s in scores if s is not None], dtype=float)
        stats = [values[rng.integers(0, len(values), len(values))].mean() for _ in range(n_resamples)]
    else:
        stats = []
        for _ in range(n_resamples):
            idx = rng.integers(0, n, n)
            sample = _take(predictions, idx), _take(references, idx)
            stats.append(metric(*sample, prompts=_take(prompts, idx), rows=_take(rows, idx)))
    alpha = (1 - confidence) / 2
    low, high = np.quantile(stats, [alpha, 1 - alpha])
    return float(low), float(high)


def _take(seq: Sequence | None, idx: np.ndarray) -> list | None:
    return None if seq is None else [seq[i] for i in idx]


def _is_builtin(fn: Callable) -> bool:
    return any(fn is m for m in METRICS.values())

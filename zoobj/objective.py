"""(task, metric) -> a loss for MeZO, and the evaluation that reports it.

The metric objective: the perturbed model predicts the batch (candidate scoring or
greedy generation, forward passes only) and the loss is ``-metric(predictions,
references)``. The cross-entropy objective, the comparison baseline, is the mean
negative log-likelihood of the gold continuation (``task.target(row)``) after its
prompt. Both take a batch of rows and return a float; ``MeZO.step`` wants a closure
of no arguments, so the training loop binds the batch:
``opt.step(lambda: objective(batch))``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from zoobj import inference
from zoobj.metrics import bootstrap_ci, get_metric

OBJECTIVES = ("metric", "ce")


def predict(model, tok, task, rows: Sequence[dict], batch_size: int = 16, max_new_tokens: int | None = None,
            shared=None) -> list:
    """Predictions for ``rows``: class indices (classification) or answer strings (generation).
    ``shared``: a ``zoobj.shared.SharedPrefix`` (the frozen lower blocks computed once per batch)."""
    prompts = [task.prompt(r) for r in rows]
    if task.kind == "generation":
        limit = max_new_tokens or getattr(task, "max_new_tokens", 50)
        return inference.generate(model, tok, prompts, max_new_tokens=limit, batch_size=batch_size, shared=shared)
    scores = inference.score_candidates(
        model, tok, prompts, [task.choices(r) for r in rows],
        length_normalize=getattr(task, "length_normalize", True), batch_size=batch_size, shared=shared,
        relative=True,
    )
    return [int(np.argmax(s)) for s in scores]


def expected_metric(model, tok, task, metric, rows: Sequence[dict], temperature: float,
                    batch_size: int = 16, shared=None) -> tuple[float, int]:
    """``(sum over rows of E[metric], rows counted)`` with the prediction drawn from
    ``softmax(candidate scores / temperature)`` -- a smoothed metric for classification.

    A hard metric changes only when some prediction flips, so most perturbations of a
    small batch see ``l+ == l-`` and the step does nothing. Its expectation under a
    softmax over the candidates moves with every perturbation, and it tends to the
    metric itself as ``temperature -> 0``. Needs a metric that is a mean over examples.
    """
    if not rows:
        return 0.0, 0
    prompts = [task.prompt(r) for r in rows]
    scores = inference.score_candidates(model, tok, prompts, [task.choices(r) for r in rows],
                                        length_normalize=getattr(task, "length_normalize", True), batch_size=batch_size,
                                        shared=shared, relative=True)  # a softmax over the candidates
    refs = [task.reference(r) for r in rows]
    widest = max(len(s) for s in scores)
    value = candidate_values(metric, [[c] * len(rows) for c in range(widest)], refs, prompts, rows)
    return expectation(scores, value, temperature)


def candidate_values(metric, columns: Sequence[list], refs: Sequence, prompts: Sequence[str],
                     rows: Sequence[dict]) -> np.ndarray:
    """``value[i, c]``: the metric of answering ``columns[c][i]`` for row ``i`` (NaN: not
    applicable). Refuses a metric that is not a mean over examples."""
    from zoobj.errors import ConfigError
    from zoobj.metrics import per_example_scores

    value = np.full((len(rows), len(columns)), np.nan)
    for c, answers in enumerate(columns):
        per = per_example_scores(metric, answers, refs, prompts=prompts, rows=list(rows))
        if per is None:
            raise ConfigError(f"--smooth needs a metric that is a mean over examples; "
                              f"{getattr(metric, '__name__', metric)!r} is not")
        value[:, c] = [np.nan if v is None else v for v in per]
    return value


def expectation(scores: Sequence[Sequence[float]], value: np.ndarray, temperature: float,
                counts: Sequence[int] | None = None) -> tuple[float, int]:
    """``(sum over rows of E[value] under softmax(scores / temperature), rows counted)``
    over each row's first ``counts[i]`` candidates (all by default); a row with a NaN
    value ("not applicable") is left out."""
    total, counted = 0.0, 0
    for i, s in enumerate(scores):
        k = len(s) if counts is None else counts[i]
        v = value[i, :k]
        if np.isnan(v).any():
            continue
        z = np.asarray(s[:k], dtype=np.float64) / temperature
        p = np.exp(z - z.max())
        total += float(p @ v / p.sum())
        counted += 1
    return total, counted


def metric_objective(model, tok, task, metric: str | Callable, batch_size: int = 16,
                     max_new_tokens: int | None = None, world=None,
                     smooth: float = 0.0, shared=None) -> Callable[[Sequence[dict]], float]:
    """``batch -> -metric(predictions(batch), references(batch))``.

    With a ``world`` (data-parallel), each rank predicts its shard, the predictions are
    gathered, and rank 0 computes the metric on the whole batch and broadcasts it:
    the loss is exactly the single-process one, for any metric (not only means).

    ``smooth > 0`` (classification): ``-E[metric]`` with predictions drawn from
    ``softmax(scores / smooth)`` (see ``expected_metric``).

    ``shared`` (``zoobj.shared.SharedPrefix``): every call on the same batch reuses the
    frozen lower blocks' work (the probes of one step).
    """
    fn = get_metric(metric) if isinstance(metric, str) else metric
    if smooth and task.kind == "generation":
        return _smoothed_generation(model, tok, task, fn, batch_size, max_new_tokens, world, smooth, shared)
    if smooth:
        def smoothed(rows: Sequence[dict]) -> float:
            mine = rows if world is None else world.shard(rows)
            total, counted = expected_metric(model, tok, task, fn, mine, smooth, batch_size, shared=shared)
            if world is not None:
                total, counted = world.all_reduce_sum([total, counted])
            return -total / counted if counted else float("nan")

        return smoothed

    def value(rows: Sequence[dict], preds: list) -> float:
        refs = [task.reference(r) for r in rows]
        return -float(fn(preds, refs, prompts=[task.prompt(r) for r in rows], rows=list(rows)))

    def loss(rows: Sequence[dict]) -> float:
        if world is None:
            return value(rows, predict(model, tok, task, rows, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                       shared=shared))
        mine = predict(model, tok, task, world.shard(rows), batch_size=batch_size, max_new_tokens=max_new_tokens,
                       shared=shared)
        preds = world.gather_predictions(mine, len(rows), strings=task.kind == "generation")
        result, failure = None, None
        if world.is_main:
            try:
                result = value(rows, preds)
            except Exception as exc:  # every rank must hear of it before rank 0 raises
                failure = exc
        return world.broadcast_loss(result, failure)  # rank 0's failure is raised on every rank

    if world is None and task.kind == "generation" and hasattr(shared, "generate_probes"):
        limit = max_new_tokens or getattr(task, "max_new_tokens", 50)

        def together(rows: Sequence[dict], deltas):
            answers = shared.generate_probes(tok, [task.prompt(r) for r in rows], deltas, limit)
            return [value(rows, a) for a in answers]

        loss.probes = _probes_together(shared, together)
    return loss


def _probes_together(shared, together):
    """``probes(rows, points) -> losses`` for ``MeZO.step(..., probes=)``: every probe of a
    step at once, ``together(rows, deltas)`` given the template tail's points stacked
    (``SharedPromptBody``: per-row deltas, one batch). It returns None (the probes run one
    by one) from the first batch the store cannot serve on, and tells ``probes.on_off`` why."""
    from zoobj.shared import _Unsupported

    state = {"off": None}

    def probes(rows: Sequence[dict], points: list) -> list[float] | None:
        if state["off"] is not None or shared.disabled is not None:
            return None
        import torch

        try:
            return together(rows, torch.stack([p[0] for p in points]))
        except _Unsupported as exc:
            state["off"] = str(exc)
            if probes.on_off is not None:
                probes.on_off(str(exc))
            return None

    probes.on_off = None  # called once with the reason the probes go back to one at a time
    return probes


class AnswerSet:
    """The candidate answers of one batch for the smoothed generation objective: each
    row's greedy answer from the weights as they were before the step's first probe
    (``prepare``), then its reference answers; with the metric of each against the
    references, computed once per batch (no perturbation can change them)."""

    def __init__(self, task, metric, rows: Sequence[dict], greedy: list[str]):
        self.key = _rows_key(task, rows)
        prompts, refs = [task.prompt(r) for r in rows], [task.reference(r) for r in rows]
        texts: list[list[str]] = []
        for g, ref in zip(greedy, refs):
            seen, mine = set(), []
            for a in [g, *(ref if isinstance(ref, (list, tuple)) else [ref])]:
                a = a.strip() if isinstance(a, str) else a
                if isinstance(a, str) and a and a not in seen:
                    seen.add(a)
                    mine.append(a)
            texts.append(mine or [g])
        self.count = [len(t) for t in texts]  # distinct candidates of each row
        widest = max(self.count)
        # every row of a scoring batch needs as many candidates: pad with copies of the
        # row's first, which the softmax below never sees
        self.texts = [t + [t[0]] * (widest - len(t)) for t in texts]
        stop = getattr(task, "stop", "")
        self.continuations = [[" " + a + stop for a in t] for t in self.texts]
        self.value = candidate_values(metric, [[t[c] for t in self.texts] for c in range(widest)], refs, prompts, rows)


def _rows_key(task, rows: Sequence[dict]) -> tuple:
    return tuple(task.prompt(r) for r in rows)


def _smoothed_generation(model, tok, task, metric, batch_size, max_new_tokens, world, temperature, shared):
    """``--smooth T`` for generation (minimum-risk training over a small answer set):
    ``-E[metric]`` with the answer drawn from ``softmax(mean log-probability / T)`` over
    each row's candidates -- its greedy answer before the step, and its references.

    Greedy answers change only where a perturbation flips an argmax, so a hard metric
    of them mostly ties; the probability of each candidate answer moves with every
    perturbation. The candidates and their metric values are fixed for the batch
    (``loss.prepare(rows)``, called by the training loop before each step, with the
    weights unperturbed; a batch nobody prepared takes the greedy answers of the first
    call's weights), so each probe only scores a few short continuations of prompts
    whose lower blocks are shared. An empty greedy answer is left out of the set (it
    has no tokens to score), so its row weighs only the references."""
    held: dict = {}

    def prepare(rows: Sequence[dict]) -> AnswerSet:
        """The answer set of ``rows`` from the weights as they are now (once per step)."""
        mine = rows if world is None else world.shard(rows)
        greedy = predict(model, tok, task, mine, batch_size=batch_size, max_new_tokens=max_new_tokens, shared=shared)
        held["set"] = AnswerSet(task, metric, mine, greedy)
        return held["set"]

    def answers_of(rows: Sequence[dict]) -> AnswerSet:
        """The answer set held for ``rows`` (this rank's share), or one prepared now if it is another batch's."""
        answers = held.get("set")
        mine = rows if world is None else world.shard(rows)
        return answers if answers is not None and answers.key == _rows_key(task, mine) else prepare(rows)

    def loss(rows: Sequence[dict]) -> float:
        mine = rows if world is None else world.shard(rows)
        answers = answers_of(rows)
        total, counted = 0.0, 0
        if mine:
            scores = inference.score_candidates(model, tok, [task.prompt(r) for r in mine], answers.continuations,
                                                length_normalize=True, batch_size=batch_size, shared=shared)
            total, counted = expectation(scores, answers.value, temperature, answers.count)
        if world is not None:
            total, counted = world.all_reduce_sum([total, counted])
        return -total / counted if counted else float("nan")

    loss.prepare = prepare
    if world is None and hasattr(shared, "nll_rows"):
        def together(rows: Sequence[dict], deltas):  # each row's candidates scored at every point at once
            answers, prompts = answers_of(rows), [task.prompt(r) for r in rows]
            pairs = [(i, c) for i, n in enumerate(answers.count) for c in range(n)]
            nll = shared.nll_rows(tok, [prompts[i] for i, _ in pairs], [answers.continuations[i][c] for i, c in pairs],
                                  deltas)
            losses = []
            for point in nll:
                scores: list[list[float]] = [[] for _ in rows]
                for (i, c), (total, count) in zip(pairs, point):
                    if count == 0:
                        raise ValueError(f"candidate {answers.continuations[i][c]!r} encodes to no tokens")
                    scores[i].append(-total / count)  # mean log-probability, as score_candidates gives
                total, counted = expectation(scores, answers.value, temperature, answers.count)
                losses.append(-total / counted if counted else float("nan"))
            return losses

        loss.probes = _probes_together(shared, together)
    return loss


def ce_objective(model, tok, task, batch_size: int = 16, world=None, shared=None) -> Callable[[Sequence[dict]], float]:
    """``batch -> mean NLL of the gold continuation tokens`` (over every target token of
    the batch; data-parallel ranks all-reduce the sum and the count). ``shared``: as for
    the metric objective."""

    def loss(rows: Sequence[dict]) -> float:
        mine = rows if world is None else world.shard(rows)
        total, count = inference.target_nll_sum(model, tok, [task.prompt(r) for r in mine],
                                                [task.target(r) for r in mine], batch_size=batch_size, shared=shared)
        if world is not None:
            total, count = world.all_reduce_sum([total, count])
        if count == 0:
            raise ValueError("no target tokens to score")
        return total / count

    if world is None and hasattr(shared, "nll_probes"):
        def together(rows: Sequence[dict], deltas):
            sums = shared.nll_probes(tok, [task.prompt(r) for r in rows], [task.target(r) for r in rows], deltas)
            if any(count == 0 for _, count in sums):
                raise ValueError("no target tokens to score")
            return [total / count for total, count in sums]

        loss.probes = _probes_together(shared, together)
    return loss


def make_objective(kind: str, model, tok, task, metric, **kw) -> Callable[[Sequence[dict]], float]:
    if kind == "metric":
        return metric_objective(model, tok, task, metric, **kw)
    if kind == "ce":
        kw.pop("max_new_tokens", None)
        kw.pop("smooth", None)
        return ce_objective(model, tok, task, **kw)
    from zoobj.errors import ConfigError

    raise ConfigError(f"unknown objective {kind!r}; choose one of {', '.join(OBJECTIVES)}")


def evaluate(model, tok, task, metric: str | Callable | None = None, split: str | None = None,
             limit: int | None = None, batch_size: int = 16, data: str | None = None,
             rows: Sequence[dict] | None = None, n_resamples: int = 1000,
             predictions: list | None = None) -> dict:
    """The metric of the model's predictions on the first ``limit`` rows of ``split``.

    ``predictions`` may be passed in (e.g. to score one set of predictions with several
    metrics). Returns ``{"task", "metric", "split", "n", "value", "ci95", "predictions"}`` where
    ``ci95`` is a 95% percentile bootstrap interval over examples.
    """
    metric = metric or task.metric
    fn = get_metric(metric) if isinstance(metric, str) else metric
    split = split or task.eval_split
    if rows is None:
        rows = task.load(split, data)
    rows = list(rows)[: limit] if limit else list(rows)
    preds = predictions if predictions is not None else predict(model, tok, task, rows, batch_size=batch_size)
    refs = [task.reference(r) for r in rows]
    extra = {"prompts": [task.prompt(r) for r in rows], "rows": rows}
    value = float(fn(preds, refs, **extra))
    low, high = bootstrap_ci(fn, preds, refs, n_resamples=n_resamples, **extra)
    return {
        "task": task.name,
        "metric": metric if isinstance(metric, str) else getattr(metric, "__name__", "metric"),
        "split": split,
        "n": len(rows),
        "value": value,
        "ci95": [float(low), float(high)],
        "predictions": preds,
    }

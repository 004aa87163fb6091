"""(task, metric) -> a loss for MeZO, and the evaluation that reports it.

The contract is ``Objective``: a small object the training loop calls with a batch of
rows. Four kinds fill it -- the hard metric (``HardMetric``), its expectation over the
candidates of a classification task (``SmoothedChoice``) or over a small answer set of
a generation task (``SmoothedGeneration``), and cross-entropy (``CrossEntropy``, the
comparison baseline: the mean negative log-likelihood of ``task.target(row)`` after
its prompt). Build one with ``make_objective``. ``MeZO.step`` wants a closure of no
arguments, so the training loop binds the batch:
``opt.step(lambda: objective(batch), probes=lambda points: objective.probes(batch, points))``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np
import torch

from zoobj.errors import ConfigError
from zoobj.metrics import bootstrap_ci, get_metric, per_example_scores
from zoobj.model import inference
from zoobj.model.kv import FastPathUnavailable
from zoobj.model.tail_probes import PromptBodyStore

OBJECTIVES = ("metric", "ce")
HELD = 16  # answer sets the smoothed generation objective keeps (one per batch: --eps auto prepares several)
Notify = Callable[[dict], None]  # receives a log event: {"event": "shared", "on": bool, "message": str}


class Objective(Protocol):
    """What the training loop asks of an objective, and nothing more.

    - ``__call__(rows) -> float``: the loss of a batch at the weights as they are now
      (lower is better); one probe of a step.
    - ``prepare(rows)``: called once per step, before its probes, with the weights
      unperturbed: what the step's probes share and no perturbation may change (the
      smoothed generation objective's answer set); nothing for the others.
    - ``probes(rows, points) -> list[float] | None``: every probe of a step at once,
      given the trained tensors at each point (``MeZO.step(closure, probes=)``), or None
      to have them evaluated one by one through ``__call__``.
    - ``together``: whether ``probes`` can answer at all (for the run's header);
      ``fallbacks``: how many batches' probes it left to be evaluated one by one.
    - ``reads_weights``: whether ``prepare`` reads the model (the loop then writes the
      held update of the previous step first; otherwise it joins the step's first pass).

    Events -- the one line it reports when a fast path goes off (its probes back to one
    at a time) -- go to the ``notify`` callback given at construction, once, as a log
    entry."""

    together: bool
    fallbacks: int
    reads_weights: bool

    def __call__(self, rows: Sequence[dict]) -> float: ...

    def prepare(self, rows: Sequence[dict]) -> object: ...

    def probes(self, rows: Sequence[dict], points: Sequence) -> list[float] | None: ...


def predict(model, tok, task, rows: Sequence[dict], batch_size: int = 16, max_new_tokens: int | None = None,
            shared=None, calibrate: bool = False) -> list:
    """Predictions for ``rows``: class indices (classification) or answer strings (generation).
    ``shared``: a fast-path store (``zoobj.model.prefix.SharedPrefix`` or ``PromptBodyStore``).
    ``calibrate`` (classification): contextual calibration, ``content_free_prior``."""
    if calibrate and task.kind == "generation":
        raise ConfigError(f"calibration divides out a prior over a classification task's classes; {task.name} "
                          "is a generation task: leave out --calibrate")
    if task.kind == "generation":
        limit = max_new_tokens or getattr(task, "max_new_tokens", 50)
        return inference.generate(model, tok, [task.prompt(r) for r in rows], max_new_tokens=limit,
                                  batch_size=batch_size, shared=shared)
    scores = choice_scores(model, tok, task, rows, batch_size, shared)
    if calibrate and rows:
        prior = content_free_prior(model, tok, task, rows)
        return [int(np.argmax(_log_softmax(s) - np.log(prior))) for s in scores]
    return [int(np.argmax(s)) for s in scores]


def choice_scores(model, tok, task, rows: Sequence[dict], batch_size: int = 16, shared=None) -> list[list[float]]:
    """Each classification row's candidate scores as the task scores them (each row's may be
    off by one constant of that row: enough for an argmax or a softmax over the candidates)."""
    return inference.score_candidates(model, tok, [task.prompt(r) for r in rows], [task.choices(r) for r in rows],
                                      length_normalize=getattr(task, "length_normalize", True), batch_size=batch_size,
                                      shared=shared, relative=True)


# The content-free inputs of contextual calibration (Zhao et al. 2021, "Calibrate Before Use").
CONTENT_FREE = ("N/A", "", "[MASK]")


def _log_softmax(scores) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64)
    return s - (s.max() + np.log(np.exp(s - s.max()).sum()))


def shared_classes(task, rows: Sequence[dict]) -> list[str] | None:
    """The candidates every row shares (a classification task's classes), or None where
    the rows have candidates of their own (COPA) or there are no rows."""
    if task.kind != "classification" or not rows:
        return None
    first = task.choices(rows[0])
    return first if all(task.choices(r) == first for r in rows) else None


def content_free_prior(model, tok, task, rows: Sequence[dict]) -> np.ndarray:
    """Contextual calibration's prior (Zhao et al. 2021): the model's distribution over
    the classes (softmax of the candidates' scores) for prompts whose every text field is
    content-free -- ``"N/A"``, ``""``, ``"[MASK]"`` -- averaged over the three. A calibrated
    prediction is ``argmax(p(class | x) / prior)``: a model that leans to one class
    whatever the input is pulled back. Needs one set of classes for every row."""
    first = shared_classes(task, rows)
    if first is None:
        raise ConfigError(f"calibration needs the same classes for every row; {task.name}'s rows have candidates "
                          "of their own: leave out --calibrate")
    keep = getattr(task, "label_field", "label")
    prompts = [task.prompt({k: (text if isinstance(v, str) and k != keep else v) for k, v in rows[0].items()})
               for text in CONTENT_FREE]
    scores = inference.score_candidates(model, tok, prompts, [first] * len(prompts),
                                        length_normalize=getattr(task, "length_normalize", True), relative=True)
    return np.mean([np.exp(_log_softmax(s)) for s in scores], axis=0)


def as_read(metric, task, predictions: list, rows: Sequence[dict]) -> list:
    """The predictions as ``metric`` reads them: a reward in TRL's form gets text
    completions, so on a classification task each class index becomes its candidate's
    text (``task.choices(row)[index]``, stripped); every other metric gets them as they are."""
    if task.kind != "classification" or getattr(metric, "form", None) != "trl":
        return predictions
    return [_choice(task.choices(r), p) for p, r in zip(predictions, rows)]


def _choice(choices: list[str], index: int) -> str:
    return choices[index].strip() if index < len(choices) else ""  # a row with fewer candidates: never counted


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
    scores = choice_scores(model, tok, task, rows, batch_size, shared)  # a softmax over the candidates
    return expectation(scores, choice_values(metric, task, rows), temperature)


def choice_values(metric, task, rows: Sequence[dict]) -> np.ndarray:
    """``value[i, c]``: the metric of answering candidate ``c`` on classification row ``i``
    (NaN: the row has fewer candidates); what ``expected_metric`` weighs."""
    widest = max(len(task.choices(r)) for r in rows)
    columns = [as_read(metric, task, [c] * len(rows), rows) for c in range(widest)]  # text for TRL's form
    return candidate_values(metric, columns, [task.reference(r) for r in rows], [task.prompt(r) for r in rows], rows)


def candidate_values(metric, columns: Sequence[list], refs: Sequence, prompts: Sequence[str],
                     rows: Sequence[dict]) -> np.ndarray:
    """``value[i, c]``: the metric of answering ``columns[c][i]`` for row ``i`` (NaN: not
    applicable). Refuses a metric that is not a mean over examples."""
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


def _mean_over_ranks(world, total: float, counted: float) -> float:
    """``-total / counted`` over every data-parallel rank's share (NaN: nothing counted)."""
    if world is not None:
        total, counted = world.all_reduce_sum([total, counted])
    return -total / counted if counted else float("nan")


class ProbesTogether:
    """``probes(rows, points)`` for an objective whose store is a ``PromptBodyStore``:
    ``together(rows, deltas)`` gets the template tail's points stacked. A batch the store
    cannot serve (a prompt that does not end with the tail, a cache that cannot be
    stacked) has its probes evaluated one by one -- that batch only: the next batch tries
    together again. ``fallbacks`` counts such batches; ``notify`` hears of the first."""

    def __init__(self, store, together: Callable, notify: Notify | None) -> None:
        self.store, self.together, self.notify = store, together, notify
        self.fallbacks = 0

    def _fall_back(self, why: str) -> None:
        self.fallbacks += 1
        if self.fallbacks == 1 and self.notify is not None:
            self.notify({"event": "shared", "on": True, "message": f"a batch's probes evaluated one at a time ({why}); "
                         "later batches run together again, and the summary counts such batches"})

    def __call__(self, rows: Sequence[dict], points: Sequence) -> list[float] | None:
        # (a store the one-at-a-time path turned off still serves these: each batch decides for itself)
        try:
            return self.together(rows, torch.stack([p[0] for p in points]))
        except FastPathUnavailable as exc:  # the store's own check of the batch's prompts, or a cache
            self._fall_back(str(exc))
            return None


def _together(store, world, together: Callable, notify: Notify | None) -> ProbesTogether | None:
    """Probes together where the store is a template tail's and the run is one process."""
    if world is None and isinstance(store, PromptBodyStore):
        return ProbesTogether(store, together, notify)
    return None


def _probes_of(self, rows: Sequence[dict], points: Sequence) -> list[float] | None:
    """``Objective.probes`` of an objective holding a ``ProbesTogether`` (or None) in ``_probes``."""
    return self._probes(rows, points) if self._probes is not None else None


def _fallbacks_of(self) -> int:
    """``Objective.fallbacks`` of the same: the batches its probes left to be run one by one."""
    return self._probes.fallbacks if self._probes is not None else 0


class HardMetric:
    """``batch -> -metric(predictions(batch), references(batch))``.

    With a ``world`` (data-parallel), each rank predicts its shard, the predictions are
    gathered, and rank 0 computes the metric on the whole batch and broadcasts it: the
    loss is exactly the single-process one, for any metric (not only means). On a
    template tail (a ``PromptBodyStore``) the probes run together."""

    reads_weights = False  # prepare reads nothing of the model

    def __init__(self, model, tok, task, metric: Callable, batch_size: int = 16, max_new_tokens: int | None = None,
                 world=None, shared=None, notify: Notify | None = None) -> None:
        self.model, self.tok, self.task, self.metric = model, tok, task, metric
        self.batch_size, self.max_new_tokens, self.world, self.shared = batch_size, max_new_tokens, world, shared
        self._probes = _together(shared, world, self._at_points, notify)
        self.together = self._probes is not None

    def _value(self, rows: Sequence[dict], preds: list) -> float:
        refs = [self.task.reference(r) for r in rows]
        return -float(self.metric(as_read(self.metric, self.task, preds, rows), refs,
                                  prompts=[self.task.prompt(r) for r in rows], rows=list(rows)))

    def _predict(self, rows: Sequence[dict]) -> list:
        return predict(self.model, self.tok, self.task, rows, batch_size=self.batch_size,
                       max_new_tokens=self.max_new_tokens, shared=self.shared)

    def __call__(self, rows: Sequence[dict]) -> float:
        world = self.world
        if world is None:
            return self._value(rows, self._predict(rows))
        preds = world.gather_predictions(self._predict(world.shard(rows)), len(rows),
                                         strings=self.task.kind == "generation")
        result, failure = None, None
        if world.is_main:
            try:
                result = self._value(rows, preds)
            except Exception as exc:  # every rank must hear of it before rank 0 raises
                failure = exc
        return world.broadcast_loss(result, failure)  # rank 0's failure is raised on every rank

    def prepare(self, rows: Sequence[dict]) -> None:
        """Nothing: a hard metric's probes share no prepared inputs."""

    probes = _probes_of  # ProbesTogether where it applies, else None
    fallbacks = property(_fallbacks_of)

    def _at_points(self, rows: Sequence[dict], deltas) -> list[float]:
        if self.task.kind == "classification":  # each point's prediction: its best-scored candidate
            return [self._value(rows, [int(np.argmax(s)) for s in point])
                    for point in _choice_scores(self.shared, self.tok, self.task, rows, deltas)]
        limit = self.max_new_tokens or getattr(self.task, "max_new_tokens", 50)
        answers = self.shared.generate_probes(self.tok, [self.task.prompt(r) for r in rows], deltas, limit)
        return [self._value(rows, a) for a in answers]


class SmoothedChoice:
    """``--smooth T`` for classification: ``-E[metric]`` with predictions drawn from
    ``softmax(scores / T)`` (see ``expected_metric``). On a template tail (a
    ``PromptBodyStore``) the probes run together: every candidate scored at every point."""

    reads_weights = False  # prepare reads nothing of the model

    def __init__(self, model, tok, task, metric: Callable, temperature: float, batch_size: int = 16,
                 world=None, shared=None, notify: Notify | None = None) -> None:
        self.model, self.tok, self.task, self.metric = model, tok, task, metric
        self.temperature, self.batch_size, self.world, self.shared = temperature, batch_size, world, shared
        self._probes = _together(shared, world, self._at_points, notify)
        self.together = self._probes is not None

    def __call__(self, rows: Sequence[dict]) -> float:
        mine = rows if self.world is None else self.world.shard(rows)
        total, counted = expected_metric(self.model, self.tok, self.task, self.metric, mine, self.temperature,
                                         self.batch_size, shared=self.shared)
        return _mean_over_ranks(self.world, total, counted)

    def prepare(self, rows: Sequence[dict]) -> None:
        """Nothing: the candidates are the task's."""

    probes = _probes_of  # ProbesTogether where it applies, else None
    fallbacks = property(_fallbacks_of)

    def _at_points(self, rows: Sequence[dict], deltas) -> list[float]:
        value = choice_values(self.metric, self.task, rows)
        return [-total / counted if counted else float("nan")
                for total, counted in (expectation(scores, value, self.temperature)
                                       for scores in _choice_scores(self.shared, self.tok, self.task, rows, deltas))]


def _choice_scores(store, tok, task, rows: Sequence[dict], deltas) -> list[list[list[float]]]:
    """Each classification row's candidate scores at every point of the tail at once."""
    return store.choice_probes(tok, [task.prompt(r) for r in rows], [task.choices(r) for r in rows], deltas,
                               length_normalize=getattr(task, "length_normalize", True))


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


class SmoothedGeneration:
    """``--smooth T`` for generation (minimum-risk training over a small answer set):
    ``-E[metric]`` with the answer drawn from ``softmax(mean log-probability / T)`` over
    each row's candidates -- its greedy answer before the step, and its references.

    Greedy answers change only where a perturbation flips an argmax, so a hard metric
    of them mostly ties; the probability of each candidate answer moves with every
    perturbation. The candidates and their metric values are fixed for the batch
    (``prepare(rows)``, called by the training loop before each step, with the weights
    unperturbed; a batch nobody prepared takes the greedy answers of the first call's
    weights), so each probe only scores a few short continuations of prompts whose
    lower blocks are shared. An empty greedy answer is left out of the set (it has no
    tokens to score), so its row weighs only the references. On a template tail the
    probes score every candidate at every point together."""

    reads_weights = True  # prepare reads the model

    def __init__(self, model, tok, task, metric: Callable, temperature: float, batch_size: int = 16,
                 max_new_tokens: int | None = None, world=None, shared=None, notify: Notify | None = None) -> None:
        self.model, self.tok, self.task, self.metric = model, tok, task, metric
        self.temperature, self.batch_size, self.max_new_tokens = temperature, batch_size, max_new_tokens
        self.world, self.shared = world, shared
        self.held: dict[tuple, AnswerSet] = {}  # by batch: the answer sets prepared, the newest HELD
        self._probes = _together(shared, world, self._at_points, notify)
        self.together = self._probes is not None

    def _mine(self, rows: Sequence[dict]) -> Sequence[dict]:
        return rows if self.world is None else self.world.shard(rows)

    def prepare(self, rows: Sequence[dict]) -> AnswerSet:
        """The answer set of ``rows`` (this rank's share) from the weights as they are now (once per step)."""
        mine = self._mine(rows)
        greedy = predict(self.model, self.tok, self.task, mine, batch_size=self.batch_size,
                         max_new_tokens=self.max_new_tokens, shared=self.shared)
        answers = AnswerSet(self.task, self.metric, mine, greedy)
        self.held.pop(answers.key, None)
        self.held[answers.key] = answers
        while len(self.held) > HELD:  # the oldest batch goes first
            self.held.pop(next(iter(self.held)))
        return answers

    def answers_of(self, rows: Sequence[dict]) -> AnswerSet:
        """The answer set held for ``rows``, or one prepared now for a batch nobody prepared."""
        answers = self.held.get(_rows_key(self.task, self._mine(rows)))
        return answers if answers is not None else self.prepare(rows)

    def __call__(self, rows: Sequence[dict]) -> float:
        mine, answers = self._mine(rows), self.answers_of(rows)
        total, counted = 0.0, 0
        if mine:
            scores = inference.score_candidates(self.model, self.tok, [self.task.prompt(r) for r in mine],
                                                answers.continuations, length_normalize=True,
                                                batch_size=self.batch_size, shared=self.shared)
            total, counted = expectation(scores, answers.value, self.temperature, answers.count)
        return _mean_over_ranks(self.world, total, counted)

    probes = _probes_of  # ProbesTogether where it applies, else None
    fallbacks = property(_fallbacks_of)

    def _at_points(self, rows: Sequence[dict], deltas) -> list[float]:
        """Each row's candidates scored at every point at once."""
        answers, prompts = self.answers_of(rows), [self.task.prompt(r) for r in rows]
        pairs = [(i, c) for i, n in enumerate(answers.count) for c in range(n)]
        nll = self.shared.nll_rows(self.tok, [prompts[i] for i, _ in pairs],
                                   [answers.continuations[i][c] for i, c in pairs], deltas)
        losses = []
        for point in nll:
            scores: list[list[float]] = [[] for _ in rows]
            for (i, c), (total, count) in zip(pairs, point):
                if count == 0:
                    raise ValueError(f"candidate {answers.continuations[i][c]!r} encodes to no tokens")
                scores[i].append(-total / count)  # mean log-probability, as score_candidates gives
            total, counted = expectation(scores, answers.value, self.temperature, answers.count)
            losses.append(-total / counted if counted else float("nan"))
        return losses


CE_OVER = ("candidates", "vocabulary")  # what --objective ce normalises over (--ce-over)


class CrossEntropy:
    """``batch -> mean NLL of the gold continuation tokens`` (over every target token of
    the batch; data-parallel ranks all-reduce the sum and the count) -- ``over="vocabulary"``;
    or, for a classification task, ``over="candidates"``: the mean over rows of minus the
    log of the gold candidate's share of a softmax over the candidates' scores (MeZO's
    ``train_as_classification``: a loss that only separating the classes lowers). On a
    template tail the probes run together."""

    reads_weights = False  # prepare reads nothing of the model

    def __init__(self, model, tok, task, batch_size: int = 16, world=None, shared=None,
                 notify: Notify | None = None, over: str = "vocabulary") -> None:
        check_ce_over(over, task)
        self.model, self.tok, self.task, self.over = model, tok, task, over
        self.batch_size, self.world, self.shared = batch_size, world, shared
        self._probes = _together(shared, world, self._at_points, notify)
        self.together = self._probes is not None

    def _choice_nll(self, scores: Sequence[Sequence[float]], rows: Sequence[dict]) -> tuple[float, int]:
        return sum(-_log_softmax(s)[self.task.reference(r)] for s, r in zip(scores, rows)), len(rows)

    def __call__(self, rows: Sequence[dict]) -> float:
        mine = rows if self.world is None else self.world.shard(rows)
        if self.over == "candidates":
            total, count = self._choice_nll(choice_scores(self.model, self.tok, self.task, mine, self.batch_size,
                                                          self.shared), mine) if mine else (0.0, 0)
            return -_mean_over_ranks(self.world, total, count)  # (it negates: a mean NLL)
        total, count = inference.target_nll_sum(self.model, self.tok, [self.task.prompt(r) for r in mine],
                                                [self.task.target(r) for r in mine], batch_size=self.batch_size,
                                                shared=self.shared)
        if self.world is not None:
            total, count = self.world.all_reduce_sum([total, count])
        if count == 0:
            raise ValueError("no target tokens to score")
        return total / count

    def prepare(self, rows: Sequence[dict]) -> None:
        """Nothing: the targets are the task's."""

    probes = _probes_of  # ProbesTogether where it applies, else None
    fallbacks = property(_fallbacks_of)

    def _at_points(self, rows: Sequence[dict], deltas) -> list[float]:
        if self.over == "candidates":
            return [total / count for total, count in (self._choice_nll(point, rows) for point in
                                                       _choice_scores(self.shared, self.tok, self.task, rows, deltas))]
        sums = self.shared.nll_probes(self.tok, [self.task.prompt(r) for r in rows],
                                      [self.task.target(r) for r in rows], deltas)
        if any(count == 0 for _, count in sums):
            raise ValueError("no target tokens to score")
        return [total / count for total, count in sums]


def metric_objective(model, tok, task, metric: str | Callable, batch_size: int = 16,
                     max_new_tokens: int | None = None, world=None, smooth: float = 0.0, shared=None,
                     notify: Notify | None = None) -> Objective:
    """The metric objective: ``HardMetric``, or with ``smooth > 0`` its expectation
    (``SmoothedChoice`` for classification, ``SmoothedGeneration`` for generation)."""
    fn = get_metric(metric) if isinstance(metric, str) else metric
    if smooth and task.kind == "generation":
        return SmoothedGeneration(model, tok, task, fn, smooth, batch_size, max_new_tokens, world, shared, notify)
    if smooth:
        return SmoothedChoice(model, tok, task, fn, smooth, batch_size, world, shared, notify)
    return HardMetric(model, tok, task, fn, batch_size, max_new_tokens, world, shared, notify)


def ce_objective(model, tok, task, batch_size: int = 16, world=None, shared=None,
                 notify: Notify | None = None, over: str | None = None) -> Objective:
    """The cross-entropy objective (``CrossEntropy``); ``over`` None: ``ce_over_for(task)``."""
    return CrossEntropy(model, tok, task, batch_size, world, shared, notify, over or ce_over_for(task))


def check_ce_over(over: str, task) -> None:
    """A ConfigError for an unknown ``--ce-over`` or candidates on a task without them."""
    if over not in CE_OVER:
        raise ConfigError(f"unknown --ce-over {over!r}; choose one of {', '.join(CE_OVER)}")
    if over == "candidates" and task.kind != "classification":
        raise ConfigError(f"--ce-over candidates needs a classification task; {task.name} is a {task.kind} task: "
                          "use --ce-over vocabulary")


def ce_over_for(task) -> str:
    """What cross-entropy normalises over where unset: the candidates for a classification
    task (as MeZO trained classification), the vocabulary for generation."""
    return "candidates" if task.kind == "classification" else "vocabulary"


def make_objective(kind: str, model, tok, task, metric, **kw) -> Objective:
    """``kind``: ``"metric"`` or ``"ce"``; ``kw`` as ``metric_objective`` takes (the metric's
    own settings are ignored for ``ce``), and ``over`` for ``ce`` (``--ce-over``)."""
    over = kw.pop("over", None)
    if kind == "metric":
        return metric_objective(model, tok, task, metric, **kw)
    if kind == "ce":
        kw.pop("max_new_tokens", None)
        kw.pop("smooth", None)
        return ce_objective(model, tok, task, over=over, **kw)
    raise ConfigError(f"unknown objective {kind!r}; choose one of {', '.join(OBJECTIVES)}")
def evaluate(model, tok, task, metric: str | Callable | None = None, split: str | None = None,
             limit: int | None = None, batch_size: int = 16, data: str | None = None,
             rows: Sequence[dict] | None = None, n_resamples: int = 1000,
             predictions: list | None = None, calibrate: bool = False) -> dict:
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
    preds = predictions if predictions is not None else predict(model, tok, task, rows, batch_size=batch_size,
                                                                calibrate=calibrate)
    refs = [task.reference(r) for r in rows]
    extra = {"prompts": [task.prompt(r) for r in rows], "rows": rows}
    read = as_read(fn, task, preds, rows)
    value = float(fn(read, refs, **extra))
    low, high = bootstrap_ci(fn, read, refs, n_resamples=n_resamples, **extra)
    out = {
        "task": task.name,
        "metric": metric if isinstance(metric, str) else getattr(metric, "__name__", "metric"),
        "split": split,
        "n": len(rows),
        "value": value,
        "ci95": [float(low), float(high)],
    }
    if task.kind == "classification" and rows:
        out.update(class_counts(task, rows, preds))
    out["predictions"] = preds
    return out


COLLAPSED = 0.8  # one class taking this share of the predictions, well above its share of the labels: a collapse


def class_counts(task, rows: Sequence[dict], preds: Sequence[int]) -> dict:
    """How a classification task's predictions and labels spread over its classes:
    ``predicted`` and ``labels`` (counts by class name: the candidate's text, or
    ``choice k`` where the rows have candidates of their own), ``majority_label_share`` (what
    always answering the most frequent label would score in accuracy), and ``collapsed``:
    the class that takes at least ``COLLAPSED`` of the predictions and 0.2 more than
    its share of the labels, or None.

    >>> from zoobj.tasks import get_task
    >>> t = get_task("sst2")
    >>> rows = [{"sentence": "a", "label": 1}, {"sentence": "b", "label": 0}, {"sentence": "c", "label": 1}]
    >>> c = class_counts(t, rows, [1, 1, 1])
    >>> c["predicted"], c["labels"], round(c["majority_label_share"], 3), c["collapsed"]
    ({'great': 3}, {'great': 2, 'terrible': 1}, 0.667, 'great')
    """
    classes = shared_classes(task, rows)

    def name(row, k):
        return classes[k].strip() if classes is not None else f"choice {k + 1}"

    predicted, labels = Counter(), Counter()
    for row, p in zip(rows, preds):
        predicted[name(row, int(p))] += 1
        labels[name(row, task.label(row))] += 1
    n = len(rows)
    top, count = predicted.most_common(1)[0]
    collapsed = top if count / n >= COLLAPSED and count / n >= labels.get(top, 0) / n + 0.2 else None
    return {"predicted": dict(predicted.most_common()), "labels": dict(labels.most_common()),
            "majority_label_share": labels.most_common(1)[0][1] / n, "collapsed": collapsed}

"""SQuAD v1.1 exact match and token F1, as the official ``evaluate-v1.1.py`` computes them.

Answers are normalised (lower case, punctuation and the articles a/an/the removed,
whitespace collapsed); each example scores its best gold answer; a batch scores the
mean over examples. The official script reports percent, these return fractions.

A reference is a list of gold answers, a single answer string, or a Hugging Face
``answers`` dict (its ``"text"`` list).

>>> round(f1(["Denmark and Norway"], [["Denmark, Iceland and Norway"]]), 4)  # 6/7
0.8571
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Mapping, Sequence

from zoobj.errors import DataError
from zoobj.metrics._common import check_batch, mean

__all__ = ["exact_match", "f1", "normalize_answer", "squad_exact_match", "squad_f1"]

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lower case, remove punctuation, remove articles, collapse whitespace.

    >>> normalize_answer("  The  Eiffel-Tower, in PARIS! ")
    'eiffeltower in paris'
    """
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _golds(reference) -> list[str]:
    """The gold answers of one reference, as a non-empty list of strings."""
    if isinstance(reference, str):
        return [reference]
    if isinstance(reference, Mapping):
        reference = reference["text"]
    golds = list(reference)
    if not golds:
        raise DataError("a reference has no gold answers; SQuAD v1.1 scoring needs at least one")
    return golds


def _token_f1(prediction: str, gold: str) -> float:
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    same = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if same == 0:
        return 0.0
    precision = same / len(pred_tokens)
    recall = same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_f1(prediction: str, gold_answers: Sequence[str] | str) -> float:
    """Token F1 of one prediction against its best gold answer.

    >>> squad_f1("the cat sat", ["a dog sat", "cat"])  # vs "cat": P = 1/2, R = 1
    0.6666666666666666
    """
    return max(_token_f1(prediction, gold) for gold in _golds(gold_answers))


def squad_exact_match(prediction: str, gold_answers: Sequence[str] | str) -> float:
    """1.0 if the normalised prediction equals any normalised gold answer, else 0.0.

    >>> squad_exact_match("The Beatles!", ["beatles", "Fab Four"])
    1.0
    """
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(gold) for gold in _golds(gold_answers)))


def f1(predictions: Sequence[str], references: Sequence, *, prompts=None, rows=None) -> float:
    """Mean SQuAD token F1 over examples (``prompts``/``rows`` are ignored).

    >>> f1(["Norway", "blue whale"], [["Norway"], ["whale shark"]])  # (1 + 1/2) / 2
    0.75
    """
    check_batch(predictions, references)
    return mean(squad_f1(p, r) for p, r in zip(predictions, references))


def exact_match(predictions: Sequence[str], references: Sequence, *, prompts=None, rows=None) -> float:
    """Mean SQuAD exact match over examples (``prompts``/``rows`` are ignored).

    >>> exact_match(["an apple", "pear"], [["Apple"], ["plum", "peach"]])
    0.5
    """
    check_batch(predictions, references)
    return mean(squad_exact_match(p, r) for p, r in zip(predictions, references))

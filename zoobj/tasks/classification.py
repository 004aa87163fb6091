"""Classification as scoring candidate continuations of a prompt (MeZO's prompt + verbalizer)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from zoobj.errors import DataError
from zoobj.tasks.sources import Source


@dataclass(frozen=True)
class ClassificationTask:
    """A task whose prediction is the best-scoring candidate continuation of the prompt.

    The candidates are `words` (the same for every row) or, when given,
    `candidates(row)` (COPA). They are the exact strings appended to the prompt,
    separator included: " great" after "... It was", "Yes" after a trailing newline.
    `labels` lists the raw label values in the order of the candidates (e.g.
    ("entailment", "not_entailment")); None means a label is a candidate index or the
    candidate's text (stripped). `length_normalize`: score a candidate by the mean
    log-likelihood of its tokens rather than the sum.
    """

    name: str
    template: Callable[[dict], str]
    source: Source
    words: tuple[str, ...] = ()
    labels: tuple[Any, ...] | None = None
    candidates: Callable[[dict], list[str]] | None = None
    label_field: str = "label"
    eval_split: str = "validation"
    metric: str = "accuracy"
    length_normalize: bool = True
    description: str = ""
    kind: ClassVar[str] = "classification"

    def prompt(self, row: dict) -> str:
        return self.template(row)

    def choices(self, row: dict) -> list[str]:
        return list(self.candidates(row)) if self.candidates is not None else list(self.words)

    def label(self, row: dict) -> int:
        """The index into `choices(row)` of the gold candidate."""
        raw, choices = row[self.label_field], self.choices(row)
        if self.labels is not None:
            for i, value in enumerate(self.labels):
                if raw == value:
                    return i
            raise DataError(f"label {raw!r} is not one of {list(self.labels)}")
        if isinstance(raw, float) and raw.is_integer():
            raw = int(raw)
        if isinstance(raw, int):  # an index (bool counts as 0/1)
            if 0 <= raw < len(choices):
                return int(raw)
            raise DataError(f"label {raw} is out of range for {len(choices)} choices")
        stripped = [c.strip() for c in choices]
        if isinstance(raw, str) and raw.strip() in stripped:
            return stripped.index(raw.strip())
        raise DataError(f"label {raw!r} is neither a choice index nor one of the choices {stripped}")

    def reference(self, row: dict) -> int:
        return self.label(row)

    def target(self, row: dict) -> str:
        return self.choices(row)[self.label(row)]

    def splits(self, data: str | None = None) -> tuple[str, ...]:
        return self.source.splits(data)

    @property
    def has_dev(self) -> bool:
        """Whether the task's own data has a "dev" split (else train_dev holds one out)."""
        return "dev" in self.splits()

    def load(self, split: str, data: str | None = None) -> list[dict]:
        """Rows of a split: data=None the task's files, "hub" the Hub, or a folder path."""
        return self.source.load(split, data, check=lambda row: (self.prompt(row), self.target(row)))

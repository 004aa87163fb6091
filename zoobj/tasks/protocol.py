"""What zoobj expects of a task: a structural Protocol, never a base class to inherit.

A task is any object with these members; the built-in ones are frozen dataclasses
(`ClassificationTask`, `GenerationTask`). A user's task, loaded with
"package.module:object", only needs to have them.
"""

from __future__ import annotations

from typing import Any, Literal, Protocol

COMMON = ("name", "kind", "metric", "eval_split", "load", "prompt", "reference", "target")
BY_KIND = {
    "classification": ("choices", "label", "length_normalize"),
    "generation": ("answers", "max_new_tokens", "stop"),
}


class Task(Protocol):
    name: str
    kind: Literal["classification", "generation"]
    metric: str  # default metric name: "accuracy", "f1", ...
    eval_split: str  # the split reported at the end; never used for dev

    def load(self, split: str, data: str | None = None) -> list[dict]: ...
    def prompt(self, row: dict) -> str: ...
    def reference(self, row: dict) -> Any: ...  # label index, or the list of gold answers
    def target(self, row: dict) -> str: ...  # the continuation trained on by cross-entropy

    # classification: choices(row) -> list[str], label(row) -> int, length_normalize: bool
    # generation: answers(row) -> list[str], max_new_tokens: int, stop: str
    # optional: splits(data=None) -> tuple[str, ...] and has_dev: bool


def missing_members(obj: object) -> list[str]:
    """The members of the task protocol that `obj` lacks (empty: it is a task)."""
    missing = [m for m in COMMON if not hasattr(obj, m)]
    kind = getattr(obj, "kind", None)
    if kind is not None and kind not in BY_KIND:
        return missing + [f"kind 'classification' or 'generation' (not {kind!r})"]
    return missing + [m for m in BY_KIND.get(kind, ()) if not hasattr(obj, m)]

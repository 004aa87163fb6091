"""Generation tasks: the model continues the prompt greedily; the output is compared with gold answers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from zoobj.errors import DataError
from zoobj.tasks.sources import Source


@dataclass(frozen=True)
class GenerationTask:
    """A task whose prediction is generated text, scored against all gold answers.

    Generation is greedy, at most `max_new_tokens` new tokens, and stops at `stop`
    (a newline: `target` ends each training answer with one, so the model learns it).
    The `answer_field` of a row holds a string or a list of strings.
    """

    name: str
    template: Callable[[dict], str]
    source: Source
    answer_field: str = "answers"
    eval_split: str = "validation"
    metric: str = "f1"
    max_new_tokens: int = 50
    stop: str = "\n"
    description: str = ""
    # settings that worked for this task, used where a run leaves them unset (zoobj.run.config):
    # (name, value) pairs of peft, n, shaping, lr, eps, steps, batch_size
    recipe: tuple = ()
    kind: ClassVar[str] = "generation"

    def prompt(self, row: dict) -> str:
        return self.template(row)

    def answers(self, row: dict) -> list[str]:
        """All gold answers of a row."""
        value = row[self.answer_field]
        answers = [value] if isinstance(value, str) else value
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
            raise DataError(f"field {self.answer_field!r} must be a string or a non-empty list of strings, "
                            f"not {value!r}")
        return list(answers)

    def reference(self, row: dict) -> list[str]:
        return self.answers(row)

    def target(self, row: dict) -> str:
        """The cross-entropy continuation: " <first answer>" and the stop string."""
        return " " + self.answers(row)[0].strip() + self.stop

    def splits(self, data: str | None = None) -> tuple[str, ...]:
        return self.source.splits(data)

    @property
    def has_dev(self) -> bool:
        """Whether the task's own data has a "dev" split (else train_dev holds one out)."""
        return "dev" in self.splits()

    def load(self, split: str, data: str | None = None) -> list[dict]:
        """Rows of a split: data=None the task's files, "hub" the Hub, or a folder path."""
        return self.source.load(split, data, check=lambda row: (self.prompt(row), self.answers(row)))

"""Building prompts from rows: a stripped field, and `str.format` templates for task files."""

from __future__ import annotations

import string
from dataclasses import dataclass

from zoobj.errors import ConfigError


def text(row: dict, name: str) -> str:
    """The field `name` of a row as a stripped string (KeyError when it is missing).

    >>> text({"sentence": "clean-cut "}, "sentence")
    'clean-cut'
    """
    return str(row[name]).strip()


@dataclass(frozen=True)
class FormatTemplate:
    """A `str.format` template over a row's fields; string values are stripped first.

    >>> FormatTemplate("{text}\\nTopic:")({"text": " Rain in Spain ", "label": 0})
    'Rain in Spain\\nTopic:'
    """

    source: str

    def __post_init__(self) -> None:
        self.fields  # raise ConfigError now for a malformed template

    @property
    def fields(self) -> tuple[str, ...]:
        """The row fields the template reads (`{title}`, `{meta[year]}` -> title, meta)."""
        try:
            parsed = [name for _, name, _, _ in string.Formatter().parse(self.source) if name is not None]
        except ValueError as e:
            raise ConfigError(f"template {self.source!r} is malformed: {e}") from None
        roots = [name.split(".")[0].split("[")[0] for name in parsed]
        if any(not root or root.isdigit() for root in roots):
            raise ConfigError(f"template {self.source!r} has a positional field: name every field, e.g. {{text}}")
        return tuple(dict.fromkeys(roots))

    def __call__(self, row: dict) -> str:
        values = {k: v.strip() if isinstance(v, str) else v for k, v in row.items()}
        return self.source.format_map(values)

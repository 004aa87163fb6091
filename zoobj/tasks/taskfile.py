"""Tasks described by a TOML file: a template over the data's fields plus choices or answers.

    name = "topics"                       # optional: defaults to the file name
    description = "news topics"           # optional
    data_files = { train = "train.jsonl", validation = "test.jsonl" }   # relative to this file
    template = "{text}\\nTopic:"           # {field} placeholders, filled with str.format_map
    choices = [" world", " sports"]       # classification: candidates used exactly as written
    label_field = "label"                 # default "label": an index into choices, or a choice's text
    metric = "accuracy"                   # default: "accuracy" (classification), "f1" (generation)
    length_normalize = true               # optional, classification only (default true)
    eval_split = "validation"             # optional: default "validation", else "test"

A generation task gives `answer_field = "answers"` (a string or a list of strings per
row) instead of `choices`, and optionally `max_new_tokens` (default 50). Choices are
appended to the prompt exactly as written: give the leading space yourself (" world")
when the template does not end with a newline. String fields are stripped before
templating. Data files may be .jsonl, .json or .csv.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from zoobj.errors import ConfigError
from zoobj.tasks.classification import ClassificationTask
from zoobj.tasks.generation import GenerationTask
from zoobj.tasks.sources import SPLITS, Source
from zoobj.tasks.templates import FormatTemplate

TYPES = {
    "name": str, "description": str, "data_files": dict, "template": str, "choices": list,
    "label_field": str, "answer_field": str, "metric": str, "length_normalize": bool,
    "eval_split": str, "max_new_tokens": int,
}


def load_task_file(path: str | Path) -> ClassificationTask | GenerationTask:
    """Read a TOML task file; any problem with the file is a one-line ConfigError naming it."""
    path = Path(path)
    try:
        spec = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"task file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the task file: {e}") from None

    def fail(message: str) -> ConfigError:
        return ConfigError(f"{path}: {message}")

    unknown = sorted(set(spec) - set(TYPES))
    if unknown:
        raise fail(f"unknown key {', '.join(map(repr, unknown))}; allowed keys: {', '.join(TYPES)}")
    for key, kind in TYPES.items():
        if key in spec and (not isinstance(spec[key], kind) or (kind is int and isinstance(spec[key], bool))):
            raise fail(f"{key} must be a {'table' if kind is dict else kind.__name__}, not {spec[key]!r}")
    for key in ("data_files", "template"):
        if key not in spec:
            raise fail(f"missing required key {key!r}")
    if ("choices" in spec) == ("answer_field" in spec):
        raise fail("give exactly one of 'choices' (classification) or 'answer_field' (generation)")

    try:
        template = FormatTemplate(spec["template"])
    except ConfigError as e:
        raise fail(str(e)) from None
    source = Source(_data_files(spec["data_files"], path, fail), origin=str(path))
    eval_split = spec.get("eval_split") or next((s for s in ("validation", "test") if s in source.files), None)
    if eval_split not in source.files:
        raise fail(f"eval split {eval_split or 'validation'!r} has no file in data_files "
                   f"(has {', '.join(source.files)}); add one or set eval_split")
    common = dict(name=spec.get("name", path.stem), template=template, source=source, eval_split=eval_split,
                  description=spec.get("description", ""))

    if "choices" in spec:
        choices = spec["choices"]
        if len(choices) < 2 or not all(isinstance(c, str) and c.strip() for c in choices):
            raise fail("choices must be a list of at least two non-empty strings")
        if "max_new_tokens" in spec:
            raise fail("max_new_tokens applies only to generation tasks (answer_field)")
        return ClassificationTask(words=tuple(choices), label_field=spec.get("label_field", "label"),
                                  metric=spec.get("metric", "accuracy"),
                                  length_normalize=spec.get("length_normalize", True), **common)
    for key in ("label_field", "length_normalize"):
        if key in spec:
            raise fail(f"{key} applies only to classification tasks (choices)")
    max_new_tokens = spec.get("max_new_tokens", 50)
    if max_new_tokens < 1:
        raise fail(f"max_new_tokens must be positive, not {max_new_tokens}")
    return GenerationTask(answer_field=spec["answer_field"], metric=spec.get("metric", "f1"),
                          max_new_tokens=max_new_tokens, **common)


def _data_files(table: dict, path: Path, fail) -> dict[str, Path]:
    files = {}
    for split, name in table.items():
        if split not in SPLITS:
            raise fail(f"data_files has an unknown split {split!r}; splits: {', '.join(SPLITS)}")
        if not isinstance(name, str):
            raise fail(f"data_files.{split} must be a file path, not {name!r}")
        file = (path.parent / name).resolve()
        if not file.is_file():
            raise fail(f"data file {name!r} for the {split} split does not exist (looked for {file})")
        files[split] = file
    return files

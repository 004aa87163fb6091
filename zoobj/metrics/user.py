"""User rewards: loading them by name and wrapping them by their signature.

A user function is wrapped into a :class:`UserMetric`, called like every metric as
``metric(predictions, references, *, prompts=None, rows=None) -> float``. Its form
comes from its signature:

- first parameter named ``completions`` or ``prompts``: the TRL reward form, called
  once per batch as ``reward(prompts=..., completions=..., references=..., **columns)``
  where ``columns = {key: [row[key] for row in rows]}``; it must accept ``**kwargs``
  and returns one float or None per example (None: not applicable, left out of the
  mean). ``prompts`` is a list of None when the caller has none. The three arguments
  always win: a data column named ``prompts``, ``completions`` or ``references`` is
  passed as ``column_prompts``, ``column_completions`` or ``column_references``
  (rows that also have a column of that new name are a DataError).
- first two parameters named ``predictions, references``: batch form, one float.
- any other function callable with two arguments, e.g. ``(prediction, reference)``:
  example form, called per example and averaged over the batch. A callable whose
  signature cannot be read is taken to be of this form.
- ``@reward(form="example" | "batch" | "trl")`` (bare ``@reward``: "example") states
  the form and overrides the rule.

A reward may return any finite number (bools count as 0/1; numpy and 0-d tensors are
fine). Raising, or returning None (outside the TRL form), NaN, infinity or a
non-number is a :class:`~zoobj.errors.RewardError` naming the reward and the example.

A Hugging Face evaluate metric, ``evaluate:NAME[#KEY][%]`` (:func:`load_evaluate`), is
of the batch form. Its score is the result's ``KEY``, which must be named when the
result holds several numbers; it is divided by 100 for the keys known to be percent
(:data:`PERCENT_SCORES`: squad, squad_v2, sacrebleu, chrf, ter) or with the trailing
``%``, and is otherwise a fraction: a value outside [-1, 1] is then an error asking for
the ``%``, never silently reread as percent.

>>> def overlap(prediction, reference):
...     return len(set(prediction.split()) & set(reference.split())) / len(set(reference.split()))
>>> m = as_metric(overlap)
>>> m.form, m(["a b", "c"], ["a b", "d e"])
('example', 0.5)
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import math
import numbers
import reprlib
import sys
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from zoobj.errors import ConfigError, DataError, RewardError, ZoobjError
from zoobj.metrics._common import check_batch, mean

__all__ = [
    "FORMS",
    "import_user_module",
    "PERCENT_SCORES",
    "UserMetric",
    "as_metric",
    "load_callable",
    "load_evaluate",
    "parse_evaluate",
    "reward",
]

FORMS = ("example", "batch", "trl")
_TRL_ARGS = ("prompts", "completions", "references")  # a data column of that name comes as column_NAME
_COLUMN_PREFIX = "column_"
_FORM_ATTR = "__zoobj_form__"


def reward(fn: Callable | str | None = None, *, form: str = "example"):
    """Mark a function's form explicitly: ``@reward``, ``@reward(form="batch")``, ...

    >>> @reward(form="batch")
    ... def share_long(preds, refs):
    ...     return sum(len(p) > 3 for p in preds) / len(preds)
    >>> as_metric(share_long).form
    'batch'
    """
    if isinstance(fn, str):  # @reward("batch")
        fn, form = None, fn
    if form not in FORMS:
        raise ConfigError(f"unknown reward form {form!r}; valid forms: {', '.join(FORMS)}")

    def mark(f: Callable) -> Callable:
        try:
            setattr(f, _FORM_ATTR, form)
        except (AttributeError, TypeError):  # a builtin or other object without __dict__
            f = functools.wraps(f)(functools.partial(f))
            setattr(f, _FORM_ATTR, form)
        return f

    return mark if fn is None else mark(fn)


@dataclass(frozen=True)
class UserMetric:
    """A user function wrapped to the uniform metric signature."""

    fn: Callable
    form: str
    name: str

    def __call__(self, predictions: Sequence, references: Sequence, *, prompts=None, rows=None) -> float:
        if self.form == "batch":
            check_batch(predictions, references, prompts, rows)
            try:
                value = self.fn(predictions, references)
            except ZoobjError:  # already one line naming the metric (e.g. an evaluate metric's key or scale)
                raise
            except Exception as exc:
                raise RewardError(f"metric '{self.name}' raised {_oneline(exc)}") from exc
            return _score(value, f"metric '{self.name}'")
        scores = [s for s in self.scores(predictions, references, prompts=prompts, rows=rows) if s is not None]
        return mean(scores)

    def scores(
        self, predictions: Sequence, references: Sequence, *, prompts=None, rows=None
    ) -> list[float | None] | None:
        """Per-example scores (None where a TRL reward said not applicable); None for the batch form."""
        n = check_batch(predictions, references, prompts, rows)
        if self.form == "batch":
            return None
        what = f"reward '{self.name}'"
        if self.form == "example":
            out = []
            for i, (p, r) in enumerate(zip(predictions, references)):
                try:
                    value = self.fn(p, r)
                except Exception as exc:
                    raise RewardError(f"{what} raised {_oneline(exc)} on example {i}") from exc
                out.append(_score(value, what, i))
            return out
        # TRL form: one call for the whole batch; a column named like an argument is renamed
        kwargs = {
            "prompts": list(prompts) if prompts is not None else [None] * n,
            "completions": list(predictions),
            "references": list(references),
        }
        for key in rows[0] if rows else ():
            name = f"{_COLUMN_PREFIX}{key}" if key in _TRL_ARGS else key
            if name in kwargs:
                clash = name.removeprefix(_COLUMN_PREFIX)
                raise DataError(
                    f"{what}: the rows have both {clash!r} and {name!r} columns, but a TRL reward gets the column "
                    f"{clash!r} as {name!r}; rename one of them"
                )
            kwargs[name] = [row.get(key) for row in rows]
        try:
            values = self.fn(**kwargs)
        except Exception as exc:
            raise RewardError(f"{what} raised {_oneline(exc)} on a batch of {n} examples") from exc
        if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
            raise RewardError(
                f"{what} returned {type(values).__name__}; a TRL reward returns a list of one float or None per example"
            )
        values = list(values)
        if len(values) != n:
            raise RewardError(f"{what} returned {len(values)} scores for {n} examples")
        out = [None if v is None else _score(v, what, i) for i, v in enumerate(values)]
        if all(s is None for s in out):
            raise RewardError(f"{what} returned None for all {n} examples of the batch: nothing to score")
        return out


def as_metric(fn: Callable, name: str | None = None) -> UserMetric:
    """Wrap a user function by its signature (see the module docstring).

    >>> as_metric(lambda completions, **kw: [len(c) for c in completions]).form
    'trl'
    """
    if isinstance(fn, UserMetric):
        return fn
    name = name or _describe(fn)
    if not callable(fn):
        raise ConfigError(f"metric '{name}' is a {type(fn).__name__}, not a function")
    form = getattr(fn, _FORM_ATTR, None)
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins: trust the stated or default form
        return UserMetric(fn, form or "example", name)
    params = [p for p in signature.parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    first = [p.name for p in params[:2]]
    if form is None:
        if first and first[0] in ("completions", "prompts"):
            form = "trl"
        elif first == ["predictions", "references"]:
            form = "batch"
        else:
            form = "example"
    if form == "trl":
        if not any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
            raise ConfigError(
                f"reward '{name}{signature}' has the TRL form but no **kwargs; "
                "add **kwargs to receive the dataset columns"
            )
    else:
        try:
            signature.bind(None, None)
        except TypeError:
            raise ConfigError(
                f"reward '{name}{signature}' cannot be called with two arguments; expected (prediction, reference), "
                "(predictions, references) or (prompts, completions, **kwargs), or mark it with @reward(form=...)"
            ) from None
    return UserMetric(fn, form, name)


def load_callable(spec: str) -> Callable:
    """Load ``"package.module:function"`` or ``"path/to/file.py:function"``.

    >>> load_callable("math:hypot")(3, 4)
    5.0
    """
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise ConfigError(
            f"malformed metric {spec!r}; expected 'package.module:function' or 'path/to/file.py:function'"
        )
    is_path = target.endswith(".py") or "/" in target or "\\" in target
    obj = _load_file(target, spec) if is_path else _import(target, spec)
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(f"metric {spec!r}: {target} has no attribute {attr!r}") from None
    if not callable(obj):
        raise ConfigError(f"metric {spec!r}: {attr} is a {type(obj).__name__}, not a function")
    return obj


# Hugging Face evaluate metrics that report percent (0-100), by metric name: the result
# keys in percent. Every other evaluate score is a fraction unless the spec ends in "%".
PERCENT_SCORES = {
    "squad": {"exact_match", "f1"},
    "squad_v2": {"exact", "f1", "HasAns_exact", "HasAns_f1", "NoAns_exact", "NoAns_f1", "best_exact", "best_f1"},
    "sacrebleu": {"score"},
    "chrf": {"score"},
    "ter": {"score"},
}


def parse_evaluate(spec: str) -> tuple[str, str | None, bool]:
    """Split ``"[evaluate:]NAME[#KEY][%]"`` into ``(NAME, KEY or None, percent)``.

    >>> parse_evaluate("evaluate:squad#f1"), parse_evaluate("path/to/metric.py#score%")
    (('squad', 'f1', False), ('path/to/metric.py', 'score', True))
    """
    text = spec.removeprefix("evaluate:")
    target, hash_, key = text.removesuffix("%").rpartition("#")
    return (target, key, text.endswith("%")) if hash_ else (key, None, text.endswith("%"))


def load_evaluate(spec: str) -> UserMetric:
    """Wrap ``evaluate.load(NAME)`` for ``spec = "[evaluate:]NAME[#KEY][%]"``.

    NAME is a Hub metric name or a local metric script. The score is the result's KEY,
    else the key named like the metric, else its only number (several numbers and no
    KEY: a ConfigError listing them). It is read as a fraction, except for the percent
    keys of :data:`PERCENT_SCORES` or with a trailing ``%``, which are divided by 100;
    a fraction outside [-1, 1] is a RewardError asking for the ``%``. The key and the
    scale are fixed by the first result: the same metric never switches between calls.
    """
    target, key, percent = parse_evaluate(spec)
    if not target or key == "":
        raise ConfigError(
            f"malformed metric {spec!r}; expected evaluate:NAME or evaluate:NAME#KEY (the result key to use), "
            "with a trailing % if the metric reports percent"
        )
    try:
        import evaluate
    except ImportError as exc:
        raise ConfigError(f"metric {spec!r} needs the evaluate library: pip install evaluate") from exc
    try:
        module = evaluate.load(target)
    except Exception as exc:
        raise ConfigError(
            f"could not load evaluate metric {target!r} ({_oneline(exc)}); evaluate needs the Hugging Face Hub "
            "or a local metric script (path/to/metric.py)"
        ) from exc
    name = Path(target).stem if target.endswith(".py") else target.rstrip("/").rsplit("/", 1)[-1]
    prefix = "evaluate:" if spec.startswith("evaluate:") else ""
    fixed: dict = {}  # the key and the scale, set by the first result

    def compute(predictions, references):
        result = module.compute(predictions=predictions, references=references)
        if not fixed:
            fixed["key"] = key if key is not None else _main_key(result, name, spec, f"{prefix}{target}#")
            fixed["percent"] = percent or fixed["key"] in PERCENT_SCORES.get(name, ())
        k = fixed["key"]
        value = _score(result if k is None else _result_key(result, k, spec), f"metric {spec!r}")
        if fixed["percent"]:
            return value / 100
        if not -1 <= value <= 1:
            raise RewardError(
                f"metric {spec!r} returned {value}, outside [-1, 1] for a fraction; "
                f"if it reports percent, write '{prefix}{target}{'' if key is None else '#' + key}%'"
            )
        return value

    return UserMetric(compute, "batch", spec)


def _main_key(result, name: str, spec: str, stem: str) -> str | None:
    """The key of an evaluate result that holds the score, none being named (None: the result is the score)."""
    if not isinstance(result, Mapping):
        return None
    numbers = [k for k, v in result.items() if _is_number(v)]
    if _is_number(result.get(name)):
        return name
    if len(numbers) == 1:
        return numbers[0]
    if not numbers:
        raise RewardError(f"metric {spec!r} returned no number (keys: {', '.join(map(str, result))})")
    raise ConfigError(
        f"metric {spec!r} returns several scores ({', '.join(map(str, numbers))}); name one, e.g. '{stem}{numbers[0]}'"
    )


def _result_key(result, key: str, spec: str):
    if not isinstance(result, Mapping):
        raise ConfigError(f"metric {spec!r} returns one {type(result).__name__}, not keys; drop #{key}")
    if key not in result:
        raise ConfigError(f"metric {spec!r}: the result has no key {key!r} (keys: {', '.join(map(str, result))})")
    if not _is_number(result[key]):
        raise RewardError(
            f"metric {spec!r}: key {key!r} holds {reprlib.repr(result[key])}, not a number; name a score with #KEY"
        )
    return result[key]


def import_user_module(module_name: str):
    """``importlib.import_module``, where a module not found on the import path is also
    looked for in the current folder (as ``python -m`` would find it; the installed
    ``zoobj`` command does not put the folder on the path itself). The folder comes last,
    so it never shadows an installed package."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        here = str(Path.cwd())
        if here in sys.path or not (exc.name and module_name.split(".")[0] == exc.name.split(".")[0]):
            raise
        sys.path.append(here)
        return importlib.import_module(module_name)


def _import(module_name: str, spec: str):
    try:
        return import_user_module(module_name)
    except ModuleNotFoundError as exc:
        raise ConfigError(f"metric {spec!r}: cannot import {module_name} ({_oneline(exc)}); run zoobj in the folder "
                          "that holds it, install it (pip install -e .), or add its folder to PYTHONPATH") from exc
    except Exception as exc:
        raise ConfigError(f"metric {spec!r}: cannot import {module_name} ({_oneline(exc)})") from exc


def _load_file(path_str: str, spec: str):
    path = Path(path_str).expanduser()
    if not path.is_file():
        raise ConfigError(f"metric {spec!r}: no such file {path_str}")
    path = path.resolve()
    module_name = f"_zoobj_reward_{path.stem}_{zlib.crc32(str(path).encode()):08x}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise ConfigError(f"metric {spec!r}: {path_str} cannot be loaded as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module  # dataclasses and pickling look modules up here
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[module_name]
        raise ConfigError(f"metric {spec!r}: loading {path_str} failed: {_oneline(exc)}") from exc
    return module


def _score(value, what: str, index: int | None = None) -> float:
    where = "" if index is None else f" on example {index}"
    if value is None:
        raise RewardError(
            f"{what} returned None{where}; return a number (None means 'not applicable' only in the TRL form)"
        )
    try:
        if isinstance(value, (str, bytes)):
            raise TypeError
        score = float(value)
    except (TypeError, ValueError):
        shown = f"{reprlib.repr(value)} ({type(value).__name__})"
        raise RewardError(f"{what} returned {shown}{where}; return a number") from None
    if not math.isfinite(score):
        raise RewardError(f"{what} returned {score}{where}; return a finite number")
    return score


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _oneline(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _describe(fn) -> str:
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    if module and qualname:
        return f"{module}:{qualname}"
    return qualname or repr(fn)

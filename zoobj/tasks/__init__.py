"""Tasks: how to load examples, build prompts, list candidates or generate, give references.

A plain dict registry of the built-in tasks, with MeZO's prompts (paper App. E), and
`get_task`, which also accepts a TOML task file or a "package.module:object" path.

>>> task = get_task("sst2")
>>> row = {"sentence": "clean-cut ", "label": 1}
>>> task.prompt(row), task.choices(row), task.label(row)
('clean-cut It was', [' terrible', ' great'], 1)
>>> list_tasks()
['sst2', 'sst5', 'rte', 'cb', 'boolq', 'wic', 'copa', 'squad']
"""

from __future__ import annotations

import random

from zoobj.errors import ConfigError, DataError
from zoobj.metrics.user import import_user_module
from zoobj.tasks.classification import ClassificationTask
from zoobj.tasks.generation import GenerationTask
from zoobj.tasks.protocol import Task, missing_members
from zoobj.tasks.sentiment import SST2, SST5
from zoobj.tasks.squad import SQUAD
from zoobj.tasks.superglue import BOOLQ, CB, COPA, RTE, WIC
from zoobj.tasks.taskfile import load_task_file

__all__ = ["TASKS", "ClassificationTask", "GenerationTask", "Task", "get_task", "list_tasks",
           "load_task_file", "train_dev"]

TASKS: dict[str, Task] = {task.name: task for task in (SST2, SST5, RTE, CB, BOOLQ, WIC, COPA, SQUAD)}


def list_tasks() -> list[str]:
    """The names of the built-in tasks."""
    return list(TASKS)


def get_task(spec: str | Task) -> Task:
    """A task from a registry name, a `.toml` task file, or "package.module:object".

    The dotted object is a task, or a class or zero-argument callable returning one.
    """
    if not isinstance(spec, str):
        return _checked(spec, repr(spec))
    if spec in TASKS:
        return TASKS[spec]
    if spec.endswith(".toml"):
        return load_task_file(spec)
    if ":" in spec:
        return _import_task(spec)
    raise ConfigError(f"unknown task {spec!r}; choose one of {', '.join(TASKS)}, "
                      "or give a .toml task file or 'package.module:object'")


def _import_task(spec: str) -> Task:
    module_name, _, attribute = spec.partition(":")
    try:
        obj = import_user_module(module_name)
        for part in attribute.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError, ValueError) as e:
        hint = ("; run zoobj in the folder that holds it, install it (pip install -e .), or add its folder to "
                "PYTHONPATH") if isinstance(e, ModuleNotFoundError) else ""
        raise ConfigError(f"cannot import task {spec!r}: {type(e).__name__}: {e}{hint}") from None
    if isinstance(obj, type) or (callable(obj) and missing_members(obj)):
        try:
            obj = obj()
        except Exception as e:
            raise ConfigError(f"calling task factory {spec!r} failed: {type(e).__name__}: {e}") from e
    return _checked(obj, spec)


def _checked(obj: object, where: str) -> Task:
    missing = missing_members(obj)
    if missing:
        raise ConfigError(f"{where} is not a task: it lacks {', '.join(missing)}")
    return obj  # type: ignore[return-value]


def train_dev(task: Task, data: str | None = None, seed: int = 0,
              dev_size: int = 500) -> tuple[list[dict], list[dict], str | None]:
    """Training rows and dev rows (for model selection), and a note when dev was held out.

    The task's "dev" split is used when `data` has one. Otherwise a seeded slice of
    train, min(dev_size, 20% of train) rows, is held out as dev, and the note says so.
    The eval split is never used for dev.
    """
    splits = task.splits(data) if hasattr(task, "splits") else (("dev",) if getattr(task, "has_dev", False) else ())
    train = task.load("train", data)
    if "dev" in splits and task.eval_split != "dev":
        return train, task.load("dev", data), None
    n_dev = min(dev_size, len(train) // 5)
    if n_dev < 1:
        raise DataError(f"task {task.name} has no dev split and {len(train)} train rows: too few to hold out a dev set")
    held = set(random.Random(seed).sample(range(len(train)), n_dev))
    note = (f"task {task.name} has no dev split here: held out {n_dev} of {len(train)} train rows "
            f"as dev (seed {seed}); training on the other {len(train) - n_dev}")
    return ([row for i, row in enumerate(train) if i not in held],
            [row for i, row in enumerate(train) if i in held], note)

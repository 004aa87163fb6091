"""Run directories on disk: atomic JSON files, append-only JSONL with a flush per record.

``trajectory.jsonl`` holds exactly one engine record per step (``zoobj.engine.mezo.RECORD_KEYS``)
and is the source of truth of a run: the base model plus this file rebuild the
weights. ``read_trajectory`` drops a truncated last line (a run killed mid-write) with
a warning, and refuses a damaged line anywhere else.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

from zoobj.engine.mezo import RECORD_KEYS
from zoobj.errors import DataError

CONFIG, TRAJECTORY, LOG, EVAL, CURVE = "config.json", "trajectory.jsonl", "log.jsonl", "eval.json", "curve.png"
PREDICTIONS = "predictions.jsonl"


def shown_step(record: dict) -> int:
    """The step of a trajectory or log record as zoobj shows it (progress lines, curves,
    tables, ``kept_steps``): counted from 1. Records store the 0-based index ``s`` of the
    step; a dev evaluation stored with ``s`` was made after ``s + 1`` steps.

    >>> shown_step({"event": "dev", "step": 9})
    10
    """
    return record["step"] + 1


def write_jsonl(path: str | Path, rows: list) -> None:
    """Write one JSON value per line, atomically (the file is whole or absent)."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp"
    with open(tmp, "w") as fh:
        fh.writelines(json.dumps(row) + "\n" for row in rows)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as JSON atomically: a temp file in the same folder, then rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; a run file is an ordinary file
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(obj, fh, indent=2, sort_keys=False)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: str | Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DataError(f"{path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None


class JsonlWriter:
    """Append one JSON object per line, flushed and fsynced per record."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._fh = open(self.path, "a", encoding="utf-8")

    def append(self, record: dict) -> None:
        self._fh.write(json.dumps(record, separators=(", ", ": ")) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        self._fh.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class NullWriter:
    """What ranks other than 0 write to: nothing."""

    def append(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


def read_jsonl(path: str | Path) -> list[dict]:
    """All complete records. A truncated LAST line is dropped (and cut from the file)."""
    path = Path(path)
    if not path.exists():
        return []
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    records, good_bytes = [], 0
    for i, line in enumerate(lines):
        last = i == len(lines) - 1
        if not line.strip():
            good_bytes += len(line) + (0 if last else 1)
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError("not an object")
            if last:  # no newline after it: written, but the write may not have finished
                raise ValueError("no trailing newline")
        except ValueError as exc:
            if last or all(not rest.strip() for rest in lines[i + 1 :]):
                warnings.warn(f"{path}:{i + 1}: dropping a truncated last line (the run was killed mid-write)",
                              RuntimeWarning, stacklevel=2)
                with open(path, "r+b") as fh:
                    fh.truncate(good_bytes)
                break
            raise DataError(f"{path}:{i + 1}: damaged record in the middle of the file ({exc}); "
                            "restore the file or start a new run") from None
        records.append(rec)
        good_bytes += len(line) + 1
    return records


def read_trajectory(path: str | Path) -> list[dict]:
    """The engine records, checked: every key present, steps 0, 1, 2, ... in order."""
    records = read_jsonl(path)
    for i, rec in enumerate(records):
        missing = [k for k in RECORD_KEYS if k not in rec]
        if missing:
            raise DataError(f"{path}:{i + 1}: record lacks {', '.join(missing)}")
        if rec["step"] != i:
            raise DataError(f"{path}:{i + 1}: record for step {rec['step']} where step {i} was expected")
    return records

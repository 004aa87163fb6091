"""Where a task's rows come from: shipped files, a user's folder, or the Hugging Face Hub.

JSON and JSON Lines files are parsed line by line with the `json` module, so a malformed
line is reported as `file:line` and every value comes back exactly as written (an Arrow
round trip would turn big integers into errors and cut digits off large floats). CSV
files are read through `datasets.load_dataset("csv")`, quietly and with no network
access. Either way the rows are plain dicts; fields that are absent or null in a row are
left out of its dict, so a template sees both as missing.
"""

from __future__ import annotations

import contextlib
import json
import random
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from zoobj.errors import DataError

Row = dict
SPLITS = ("train", "dev", "validation", "test")
SUFFIXES = (".jsonl", ".json", ".csv")
DATA_DIR = Path(__file__).resolve().parent.parent / "data"  # the shipped subsets


@dataclass(frozen=True)
class Hub:
    """A dataset on the Hugging Face Hub and how its rows map to the shipped schema.

    `convert(row, index)` returns the row as the shipped files write it (e.g. string
    labels where the Hub has class ids). Only splits with public labels are listed.
    """

    id: str
    config: str | None = None
    splits: tuple[str, ...] = ("train", "validation")
    convert: Callable[[Row, int], Row] | None = None

    def __str__(self) -> str:
        return f"{self.id} ({self.config})" if self.config else self.id


@dataclass(frozen=True)
class Source:
    """A task's own data: one file per split, optionally a Hub copy of the full dataset.

    `carve=(n_train, n_dev)` replaces the train split by `n_train` rows drawn from the
    train file with `random.Random(0)` and adds a "dev" split of the next `n_dev` drawn
    rows (disjoint from train); this applies to the task's own files only.
    """

    files: Mapping[str, Path] = field(hash=False)
    origin: str  # named in messages: a folder or a task file
    hub: Hub | None = None
    carve: tuple[int, int] | None = None

    def splits(self, data: str | None = None) -> tuple[str, ...]:
        """The splits available from `data` (None: own files, "hub", or a folder)."""
        if data is None:
            names = set(self.files) | ({"dev"} if self.carve else set())
        elif data == "hub":
            names = set(self.hub.splits) if self.hub else set()
        else:
            names = set(folder_files(Path(data)))
        return tuple(s for s in SPLITS if s in names)

    def load(self, split: str, data: str | None, check: Callable[[Row], object]) -> list[Row]:
        """The rows of `split`, each passed through `check` (which raises on a bad row)."""
        if data == "hub":
            if self.hub is None:
                raise DataError(f"{self.origin} has no Hugging Face Hub source; leave data unset or pass a folder")
            where = f"{self.hub} {split} on the Hub"
            rows = read_hub(self.hub, _available(split, self.hub.splits, f"the Hub copy {self.hub}"))
        elif data is not None:
            files = folder_files(Path(data))
            path = files[_available(split, files, data)]
            where, rows = str(path), read_rows(path)
        elif self.carve and split in ("train", "dev"):
            path = self.files["train"]
            where, rows = str(path), _carved(read_rows(path), split, *self.carve)
        else:
            path = self.files[_available(split, self.splits(), self.origin)]
            where, rows = str(path), read_rows(path)
        if not rows:
            raise DataError(f"{where}: the {split} split is empty")
        for n, row in enumerate(rows, 1):
            _check_row(check, row, f"{where}: row {n}")
        return rows


def shipped(folder: str, hub: Hub | None = None, carve: tuple[int, int] | None = None) -> Source:
    """The Source for a folder of zoobj/data (files `<split>.jsonl`)."""
    path = DATA_DIR / folder
    return Source(folder_files(path), origin=str(path), hub=hub, carve=carve)


def folder_files(folder: Path) -> dict[str, Path]:
    """`{split: file}` for the files `<split>.jsonl|.json|.csv` in a folder."""
    if not folder.is_dir():
        raise DataError(f"data folder {folder} does not exist")
    files = {}
    for split in SPLITS:
        found = [folder / (split + suffix) for suffix in SUFFIXES if (folder / (split + suffix)).is_file()]
        if len(found) > 1:
            raise DataError(f"{folder} has several files for the {split} split: {', '.join(p.name for p in found)}")
        if found:
            files[split] = found[0]
    return files


def _available(split: str, available, where: str) -> str:
    if split not in available:
        names = ", ".join(s for s in SPLITS if s in available) or "none"
        raise DataError(f"no {split!r} split in {where}; available splits: {names}")
    return split


def _carved(rows: list[Row], split: str, n_train: int, n_dev: int) -> list[Row]:
    if len(rows) < n_train + n_dev:
        raise DataError(f"need {n_train + n_dev} train rows to draw train and dev from, found {len(rows)}")
    order = random.Random(0).sample(range(len(rows)), n_train + n_dev)
    picked = order[:n_train] if split == "train" else order[n_train:]
    return [rows[i] for i in picked]


def _check_row(check: Callable[[Row], object], row: Row, where: str) -> None:
    try:
        check(row)
    except KeyError as e:
        raise DataError(f"{where}: missing field {e.args[0]!r}") from None
    except DataError as e:
        raise DataError(f"{where}: {e}") from None
    except (TypeError, ValueError, AttributeError, IndexError) as e:
        raise DataError(f"{where}: {type(e).__name__}: {e}") from None


# ----------------------------------------------------------------------------- reading


def read_rows(path: Path) -> list[Row]:
    """All rows of one .jsonl / .json / .csv file as dicts (JSON exactly as written)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    parsed = None if path.suffix == ".csv" else _parse_json(path)
    if parsed == []:
        raise DataError(f"{path}: the split is empty (no rows)")
    if parsed is not None:
        return [_present(row) for row in parsed]
    import datasets

    try:
        with _quiet():
            table = datasets.load_dataset("csv", data_files=str(path), split="train")
    except Exception as e:
        raise DataError(f"cannot read {path}: {type(e).__name__}: {_first_line(e)}") from e
    return [_present(row) for row in table.to_list()]


def _parse_json(path: Path) -> list[Row]:
    """The objects of a JSON Lines file (or a JSON array), reporting a bad line as file:line."""
    raw = path.read_bytes()
    if raw.lstrip()[:1] == b"[":  # a JSON array of objects
        try:
            items = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 ({e.reason} at byte {e.start})") from None
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
        for i, item in enumerate(items, 1):
            if not isinstance(item, dict):
                raise DataError(f"{path}: item {i} of the array is not a JSON object")
        return items
    rows = []
    for n, line in enumerate(raw.splitlines(), 1):
        try:
            text = line.decode("utf-8").strip()
        except UnicodeDecodeError as e:
            raise DataError(f"{path}:{n}: not UTF-8 ({e.reason})") from None
        if not text:
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: invalid JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
        rows.append(obj)
    return rows


def read_hub(hub: Hub, split: str) -> list[Row]:
    """One split of a Hub dataset, converted to the shipped schema.

    Unless offline mode is on (HF_HUB_OFFLINE=1 reads the local cache only), the Hub
    is asked once with a short timeout first, so an unreachable network fails at once
    instead of after `datasets`' retries.
    """
    import datasets

    if not datasets.config.HF_HUB_OFFLINE:
        _probe_hub(hub)
    try:
        with _quiet():
            table = datasets.load_dataset(hub.id, hub.config, split=split)
    except Exception as e:
        raise DataError(f"cannot load {hub} {split} from the Hugging Face Hub: {type(e).__name__}: "
                        f"{_first_line(e)} (leave data unset to use the shipped subset)") from e
    rows = table.to_list()
    if hub.convert is not None:
        try:
            rows = [hub.convert(row, i) for i, row in enumerate(rows)]
        except (KeyError, IndexError, TypeError) as e:
            raise DataError(f"{hub} {split} from the Hub has an unexpected layout: {type(e).__name__}: {e}") from e
    return [_present(row) for row in rows]


def _probe_hub(hub: Hub, timeout: float = 10.0) -> None:
    import huggingface_hub

    try:
        huggingface_hub.HfApi().dataset_info(hub.id, timeout=timeout)
    except Exception as e:
        raise DataError(f"cannot reach {hub.id} on the Hugging Face Hub: {type(e).__name__}: {_first_line(e)} "
                        "(check the network, set HF_HUB_OFFLINE=1 to use a cached copy, "
                        "or leave data unset to use the shipped subset)") from e


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence `datasets`' progress bars and info logs, restoring them afterwards."""
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from datasets.utils import logging as ds_logging

    bars_were_off, level = are_progress_bars_disabled(), ds_logging.get_verbosity()
    disable_progress_bars()
    ds_logging.set_verbosity_error()
    try:
        yield
    finally:
        ds_logging.set_verbosity(level)
        if not bars_were_off:
            enable_progress_bars()


def _present(row: Row) -> Row:
    return {k: v for k, v in row.items() if v is not None}


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else "no details"

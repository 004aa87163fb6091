"""Data-parallel MeZO on this machine: 2 processes (torchrun, gloo) against 1, same global batch.

Both arms run the real command line, ``zoobj train``, with the same settings (default
model, SST-2, cross-entropy, global batch 16), one after the other; each arm's step
times come from its own ``log.jsonl`` (the first step, which compiles the noise
kernel, is left out) and the bytes each rank sends per step from the 2-process log.
Under torchrun each process gets one thread (OMP_NUM_THREADS=1); alone, the process
gets both cores. The LAST line is one JSON object.

    python bench/dp_speed.py                    # Gemma-3-270M, 8 steps per arm (~3 minutes)
    python bench/dp_speed.py --model DIR --steps 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def arm(nproc: int, args, out: Path) -> dict:
    train = ["train", "--task", "sst2", "--objective", "ce", "--model", args.model, "--steps", str(args.steps),
             "--batch-size", str(args.batch_size), "--eval-limit", "16", "--eval-every", "0", "--output", str(out)]
    if nproc == 1:
        cmd = [sys.executable, "-m", "zoobj", *train]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               "-m", "zoobj", *train]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "ZOOBJ_DIST_BACKEND": "gloo"})
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    steps = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    steps = [r for r in steps if r.get("event") == "step"][1:]
    return {"step_seconds": statistics.median(r["seconds"] for r in steps),
            "comm_bytes": statistics.median(r.get("comm_bytes", 0) for r in steps), "wall": time.time() - t0,
            "grads": [r["grad"] for r in steps]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        one = arm(1, args, Path(tmp) / "one")
        two = arm(2, args, Path(tmp) / "two")
    close = all(abs(a - b) <= 1e-3 * max(1.0, abs(a)) for a, b in zip(one["grads"], two["grads"]))
    print(f"{'':24}{'1 process':>12}{'2 processes':>14}")
    print(f"{'median step (s)':24}{one['step_seconds']:>12.3f}{two['step_seconds']:>14.3f}")
    print(f"{'bytes sent per step':24}{0:>12}{two['comm_bytes']:>14.0f}")
    print(f"{'arm wall time (s)':24}{one['wall']:>12.1f}{two['wall']:>14.1f}")
    print(f"same projected gradients (rel 1e-3): {close}")
    print(json.dumps({"model": args.model, "global_batch": args.batch_size,
                      "steps_per_s_2proc_over_1proc": round(one["step_seconds"] / two["step_seconds"], 3),
                      "comm_bytes_per_step_per_rank": two["comm_bytes"], "same_grads": close}))


if __name__ == "__main__":
    main()

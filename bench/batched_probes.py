"""Would evaluating a step's 2N probes as one batch pay? The upper bound, on this machine.

Batched probes (issue 15, item 3): where the trained set is small (LoRA, prefix), the
2N perturbed copies could run as one batch, rows grouped by probe, each group seeing
its own perturbation (a per-group LoRA product). Whatever the grouping costs, such a
batch cannot be cheaper than the same batch with no perturbation at all, so this bench
measures that bound: k copies of a batch run as one batch of k x 16 rows, against k
separate batches of 16 rows (the loop the engine runs), on the default model with
LoRA on the top 4 blocks. Ratio = one batch of k x 16 / (k x one batch of 16); 1.0
means batching saves nothing, and a grouped implementation could only be slower.

- ``prefill``: the 16 SQuAD prompts (train split, ~200 tokens each), each prompt
  alone (as ``inference.generate`` prefills them) against that prompt repeated k times;
- ``decode``: 8 greedy decoding steps of the 16 questions with their prompts cached,
  at batch 16 against batch k x 16 (the part of a SQuAD probe where a batch of 16 is
  small: one token per row per step);
- ``score``: SST-2 candidate scoring (``score_candidates``, relative scores), batch 16
  against k x 16.

Arms interleaved round by round, median of rounds. Last line: one JSON object.

    python bench/batched_probes.py              # a few minutes on 2 CPU cores
    python bench/batched_probes.py --k 4 --rounds 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_cost import cpu_label  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--k", type=int, nargs="+", default=[4, 16], help="copies per batch")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    warnings.simplefilter("ignore")

    from zoobj.model import inference, kv
    from zoobj.model.kv import cache_out as _cache_out, left_pad as _left_pad, positions as _positions
    from zoobj.model.loading import load_model
    from zoobj.model.params import trainable_parameters
    from zoobj.tasks import get_task

    model, tok = load_model(args.model)
    model, named = trainable_parameters(model, "lora", seed=0, tok=tok, layers="top:4")
    with torch.no_grad():
        for _, p in named:
            p.normal_(0, 0.02, generator=torch.Generator().manual_seed(p.numel()))
    squad, sst2 = get_task("squad"), get_task("sst2")
    questions = [squad.prompt(r) for r in squad.load("train")[:16]]
    sentences = sst2.load("train")[:16]
    q_ids = [tok(q)["input_ids"] for q in questions]
    kw = kv.cache_kw(model)

    @torch.inference_mode()
    def prefill(k: int) -> None:
        for ids in q_ids:
            model(input_ids=torch.tensor([ids] * k), use_cache=True, logits_to_keep=1)

    @torch.inference_mode()
    def decode(k: int, steps: int = 8) -> None:
        ids, mask = _left_pad(q_ids, tok.pad_token_id, "cpu")
        out = model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask), use_cache=True, logits_to_keep=1)
        cache, logits = _cache_out(out), out.logits[:, -1].repeat_interleave(k, 0)
        cache.batch_repeat_interleave(k)  # k copies of each row's cache (the order does not matter here)
        mask, last = mask.repeat_interleave(k, 0), mask.sum(-1).repeat_interleave(k, 0) - 1
        t = time.perf_counter()  # the decoding steps only
        for _ in range(steps):
            nxt = logits.argmax(-1)
            mask = torch.cat([mask, torch.ones((len(nxt), 1), dtype=mask.dtype)], dim=1)
            last = last + 1
            out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=last[:, None], use_cache=True,
                        **{kw: cache})
            cache, logits = _cache_out(out), out.logits[:, -1]
        return time.perf_counter() - t

    def score(k: int) -> None:
        rows = sentences * k
        inference.score_candidates(model, tok, [sst2.prompt(r) for r in rows], [sst2.choices(r) for r in rows],
                                   batch_size=len(rows), relative=True)

    parts = {"prefill": prefill, "decode": decode, "score": score}
    arms = [(part, k) for part in parts for k in sorted({1, *args.k})]
    for part, k in arms:  # warm-up
        parts[part](min(k, 2))
    times: dict = {a: [] for a in arms}
    for r in range(args.rounds):
        for part, k in arms[r % len(arms):] + arms[: r % len(arms)]:
            t = time.perf_counter()
            inner = parts[part](k)
            times[(part, k)].append(inner if inner is not None else time.perf_counter() - t)
            print(f"  round {r}: {part} k={k} {times[(part, k)][-1]:.2f} s", file=sys.stderr, flush=True)

    print(f"CPU: {cpu_label()}, {torch.get_num_threads()} threads; LoRA r=8 on q/v of the top 4 blocks; "
          f"median of {args.rounds} rounds; ratio = one batch of k x 16 / (k x one batch of 16)")
    print(f"{'part':8} {'batch 16 s':>11} " + " ".join(f"{f'k={k}':>8}" for k in sorted(args.k)))
    summary = {"cpu": cpu_label(), "threads": torch.get_num_threads(), "rounds": args.rounds}
    for part in parts:
        unit = statistics.median(times[(part, 1)])
        ratios = {k: statistics.median(times[(part, k)]) / (k * unit) for k in sorted(args.k)}
        print(f"{part:8} {unit:11.3f} " + " ".join(f"{ratios[k]:8.3f}" for k in sorted(args.k)))
        summary[f"{part}_unit_s"] = round(unit, 4)
        for k, v in ratios.items():
            summary[f"{part}_k{k}_ratio"] = round(v, 4)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

"""Predictions per second: zoobj's batched forward passes vs plain one-at-a-time code.

On the default model (Gemma-3-270M, fp32, CPU), side by side in one run:

- candidate scoring, SST-2 validation (first 64): zoobj encodes each prompt once in a
  batch and keeps the last position's logits only; the baseline runs one full forward
  per (example, candidate) with the whole logits tensor, as a first attempt would.
- generation, SQuAD validation (first 32): zoobj's batched greedy decoding with the KV
  cache; the baseline is plain ``model.generate`` one example at a time with the SAME
  stopping rule (a newline or eos) and ``max_new_tokens``.

Predictions are compared (padding may flip a near-tie). Last line on stdout: one JSON
object with ``scoring_speedup``, ``generation_speedup`` and ``agreement``.

    python bench/predict_cost.py [--model gemma-3-270m] [--n-score 64] [--n-generate 32]
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import torch


def baseline_scores(model, tok, prompt, candidates, length_normalize=True):
    scores = []
    for cand in candidates:
        p = tok(prompt)["input_ids"]
        c = tok(cand, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([p + c])).logits[0]  # every position, whole vocabulary
        logp = torch.log_softmax(logits.float(), -1)
        total = sum(float(logp[len(p) - 1 + k, t]) for k, t in enumerate(c))
        scores.append(total / len(c) if length_normalize else total)
    return scores


def baseline_generate(model, tok, prompt, max_new_tokens, stop_ids):
    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=sorted(stop_ids), pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).split("\n", 1)[0].strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--n-score", type=int, default=64)
    ap.add_argument("--n-generate", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    warnings.simplefilter("ignore")

    from zoobj.model import inference, kv
    from zoobj.model.loading import load_model
    from zoobj.run.objective import predict
    from zoobj.tasks import get_task

    model, tok = load_model(args.model)
    sst2, squad = get_task("sst2"), get_task("squad")
    s_rows = sst2.load("validation")[: args.n_score]
    g_rows = squad.load("validation")[: args.n_generate]
    predict(model, tok, sst2, s_rows[:2])  # warm-up

    t = time.perf_counter()
    z_scores = predict(model, tok, sst2, s_rows, batch_size=args.batch_size)
    z_score_s = time.perf_counter() - t
    t = time.perf_counter()
    b_scores = [int(torch.tensor(baseline_scores(model, tok, sst2.prompt(r), sst2.choices(r))).argmax()) for r in s_rows]
    b_score_s = time.perf_counter() - t

    stop_ids = kv.stop_ids(tok)
    t = time.perf_counter()
    z_gen = predict(model, tok, squad, g_rows, batch_size=args.batch_size)
    z_gen_s = time.perf_counter() - t
    t = time.perf_counter()
    b_gen = [baseline_generate(model, tok, squad.prompt(r), squad.max_new_tokens, stop_ids) for r in g_rows]
    b_gen_s = time.perf_counter() - t

    agree_s = sum(a == b for a, b in zip(z_scores, b_scores))
    agree_g = sum(a == b for a, b in zip(z_gen, b_gen))
    n_s, n_g = len(s_rows), len(g_rows)
    print(f"model {args.model}, {torch.get_num_threads()} threads, zoobj batch size {args.batch_size}")
    print(f"{'':34} {'zoobj ex/s':>10} {'baseline ex/s':>13} {'speedup':>8} {'agree':>7}")
    print(f"{'scoring  (SST-2 val, ' + str(n_s) + ')':34} {n_s / z_score_s:>10.2f} {n_s / b_score_s:>13.2f} "
          f"{b_score_s / z_score_s:>8.2f} {agree_s / n_s:>7.3f}")
    print(f"{'generation (SQuAD val, ' + str(n_g) + ')':34} {n_g / z_gen_s:>10.2f} {n_g / b_gen_s:>13.2f} "
          f"{b_gen_s / z_gen_s:>8.2f} {agree_g / n_g:>7.3f}")
    for a, b in zip(z_gen, b_gen):
        if a != b:
            print(f"  differs: zoobj {a!r} | baseline {b!r}")
    print(json.dumps({
        "scoring_speedup": round(b_score_s / z_score_s, 3),
        "generation_speedup": round(b_gen_s / z_gen_s, 3),
        "agreement": round((agree_s + agree_g) / (n_s + n_g), 4),
    }))


if __name__ == "__main__":
    main()

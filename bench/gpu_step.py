"""A MeZO step on a GPU next to inference and an AdamW step: time and peak memory.

An OPT-1.3B-shaped model built from its config (random init, no download), bf16,
batch 16 x 256, every parameter trained. Arms, interleaved round by round so that
clock and thermal drift hit every arm alike, each timed with CUDA synchronisation:

- two inference forwards with the loss (the unit: a MeZO step cannot do with less),
- a zoobj step, ``perturb="inplace"`` (the paper's three writes, fused noise kernel),
- a zoobj step, ``perturb="forward"`` (exact in bf16: perturbed weights are built
  per module during the forward),
- one AdamW backprop step (forward, backward, update) for the memory comparison.

Peak memory is ``torch.cuda.max_memory_allocated`` over each arm, reset in between.
The LAST line is one JSON object.

    python bench/gpu_step.py                        # needs a CUDA device (about 2 minutes on an H100)
    python bench/gpu_step.py --device cpu --quick   # a smoke test of the script itself
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

OPT_1_3B = dict(batch=16, seq=256, hidden=2048, layers=24, ffn=8192, heads=32, vocab=50272, rounds=5)
QUICK = dict(batch=4, seq=32, hidden=64, layers=2, ffn=128, heads=4, vocab=512, rounds=2)


def build(shape, device, dtype):
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    cfg = OPTConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"], num_hidden_layers=shape["layers"],
                    ffn_dim=shape["ffn"], num_attention_heads=shape["heads"], word_embed_proj_dim=shape["hidden"],
                    max_position_embeddings=2048, dropout=0.0, attention_dropout=0.0)
    model = OPTForCausalLM(cfg).to(device=device, dtype=dtype).eval()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, shape["vocab"], (shape["batch"], shape["seq"]), generator=gen).to(device)
    return model, ids


def main() -> None:
    import torch

    from zoobj import MeZO

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    shape = QUICK if args.quick else OPT_1_3B
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here; run with --device cpu --quick to check the script")
    model, ids = build(shape, dev, torch.bfloat16)
    params = list(model.parameters())

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def forward():
        with torch.inference_mode():
            return model(input_ids=ids, labels=ids).loss.float()

    inplace = MeZO(params, lr=1e-7, eps=1e-3, seed=0, perturb="inplace")
    exact = MeZO(params, lr=1e-7, eps=1e-3, seed=1, perturb="forward", model=model)
    # its hooks stay on the model but do nothing outside its own steps (they check its offset)

    def exact_step():
        exact.step(forward)

    def adamw_step(opt):
        model.train()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.eval()

    peaks = {}

    def measured(name, fn):
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        sync()
        t = time.perf_counter()
        fn()
        sync()
        elapsed = time.perf_counter() - t
        if cuda:
            peaks[name] = max(peaks.get(name, 0), torch.cuda.max_memory_allocated())
        return elapsed

    # warm-up: kernels, allocator, the compiled noise kernel
    forward()
    inplace.step(forward, settle=False)  # as the training loop steps: the update joins the next step's first pass
    exact_step()
    arms = {"two_forwards": lambda: (forward(), forward()), "inplace": lambda: inplace.step(forward, settle=False),
            "forward": exact_step}
    times = {k: [] for k in arms}
    names = list(arms)
    for r in range(shape["rounds"]):
        for name in names[r % 3 :] + names[: r % 3]:
            times[name].append(measured(name, arms[name]))
    inference_peak = peaks.get("two_forwards", 0)
    adamw = torch.optim.AdamW(params, lr=1e-5)
    adamw_s = measured("adamw", lambda: adamw_step(adamw))

    ratio = {k: statistics.median(a / b for a, b in zip(times[k], times["two_forwards"])) for k in ("inplace", "forward")}
    n_params = sum(p.numel() for p in params) / 1e9
    print(f"OPT-1.3B shape{' (quick)' if args.quick else ''}: {n_params:.2f}B parameters, bf16, batch "
          f"{shape['batch']} x {shape['seq']}, {torch.cuda.get_device_name(dev) if cuda else 'cpu'}, "
          f"noise {inplace.noise_backend}, median of {shape['rounds']} interleaved rounds")
    print(f"{'':26}{'time (s)':>10}{'/ 2 fwd':>9}{'peak GiB':>10}{'/ infer':>9}")
    gib = 2**30
    for label, key, t in (("two inference forwards", "two_forwards", statistics.median(times["two_forwards"])),
                          ("MeZO step, inplace", "inplace", statistics.median(times["inplace"])),
                          ("MeZO step, forward", "forward", statistics.median(times["forward"])),
                          ("AdamW backprop step", "adamw", adamw_s)):
        r = ratio.get(key, 1.0 if key == "two_forwards" else float("nan"))
        p = peaks.get(key, 0) / gib
        rel = peaks.get(key, 0) / inference_peak if inference_peak else float("nan")
        print(f"{label:26}{t:>10.3f}{r:>9.3f}{p:>10.2f}{rel:>9.3f}")
    out = {
        "device": torch.cuda.get_device_name(dev) if cuda else "cpu",
        "step_over_two_forwards_inplace": round(ratio["inplace"], 4),
        "step_over_two_forwards_forward": round(ratio["forward"], 4),
    }
    if cuda:
        out.update({
            "inference_peak_gib": round(inference_peak / gib, 3),
            "mezo_peak_over_inference_inplace": round(peaks["inplace"] / inference_peak, 4),
            "mezo_peak_over_inference_forward": round(peaks["forward"] / inference_peak, 4),
            "adamw_peak_over_inference": round(peaks["adamw"] / inference_peak, 4),
        })
    print(json.dumps(out))


if __name__ == "__main__":
    main()

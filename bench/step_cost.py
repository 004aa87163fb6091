"""What a MeZO step costs next to inference: time and peak memory.

An OPT-125m-shaped model built from its config (random weights: timing does not
depend on them), batch 16 x 128, fp32, every parameter perturbed. Side by side in
one run, interleaved round by round so that machine noise hits every arm alike:

- two inference forwards (the unit: a MeZO step cannot do with less),
- a zoobj step as the training loop makes it (``zoobj.MeZO`` with its defaults:
  Rademacher directions, ``step(closure, settle=False)``: the update held and written in
  the next step's first pass, so two passes over the weights a step),
- the same step with ``passes="separate"`` (three passes a step, as zoobj made them
  before: +eps z, -2 eps z, then the restore with the update),
- one noise pass alone (``p <- p + b*z`` over every parameter, as a step makes it: small
  tensors grouped into one call), reported in ns per element: the part of a step that
  depends on the CPU's vector unit (the hash works in int32 lanes, so AVX2 vectorises
  it as AVX-512 does),
- one plain pass over the same weights (``p <- 1.0 * p``, read and written once, no
  noise): the memory floor a noise pass cannot go below, in ns per element,
- a zoobj step with ``perturb="forward"`` (the exact scheme for bf16/fp16: the
  perturbed weights are built per module during the forward; run here in fp32 to
  show its cost),
- a zoobj step and a noise pass with Gaussian directions (``noise="gaussian"``, the
  paper's, the default before: two hashes and a Box-Muller transform per element),
- a reference step written as the paper's Algorithm 1 does it (global
  ``torch.manual_seed``, ``torch.normal`` per parameter, four noise passes).

Peak RSS, each in a fresh subprocess: inference only; MeZO steps; one AdamW
backprop step. The table goes to stdout; the LAST line is one JSON object.

    python bench/step_cost.py            # full shape (a few minutes on 2 cores)
    python bench/step_cost.py --quick    # a smaller shape, under a minute
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings

FULL = dict(batch=16, seq=128, hidden=768, layers=12, ffn=3072, heads=12, vocab=50272, rounds=6)
QUICK = dict(batch=8, seq=64, hidden=256, layers=4, ffn=1024, heads=4, vocab=8192, rounds=3)


def build(shape):
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    cfg = OPTConfig(
        vocab_size=shape["vocab"], hidden_size=shape["hidden"], num_hidden_layers=shape["layers"],
        ffn_dim=shape["ffn"], num_attention_heads=shape["heads"], word_embed_proj_dim=shape["hidden"],
        max_position_embeddings=2048,
    )
    model = OPTForCausalLM(cfg).eval()
    ids = torch.randint(0, shape["vocab"], (shape["batch"], shape["seq"]), generator=torch.Generator().manual_seed(1))

    def forward():
        with torch.no_grad():
            return model(input_ids=ids, labels=ids).loss

    return model, ids, forward


def reference_step(params, forward, seed, lr, eps):
    """MeZO as the paper's Algorithm 1 writes it: z redrawn from the global RNG 4 times."""
    import torch

    def perturb(scale):
        torch.manual_seed(seed)
        for p in params:
            z = torch.normal(mean=0, std=1, size=p.size(), device=p.device, dtype=p.dtype)
            p.data = p.data + scale * z * eps

    perturb(1)
    lp = forward()
    perturb(-2)
    lm = forward()
    perturb(1)
    g = float(lp - lm) / (2 * eps)
    torch.manual_seed(seed)
    for p in params:
        z = torch.normal(mean=0, std=1, size=p.size(), device=p.device, dtype=p.dtype)
        p.data = p.data - lr * g * z
    return (float(lp) + float(lm)) / 2


def timing(shape):
    import torch

    from zoobj import MeZO

    model, _, forward = build(shape)
    params = list(model.parameters())
    opt = MeZO(params, lr=1e-7, eps=1e-3, seed=0)  # the defaults
    apart = MeZO(params, lr=1e-7, eps=1e-3, seed=3, passes="separate")  # one pass per move
    gauss = MeZO(params, lr=1e-7, eps=1e-3, seed=2, noise="gaussian")  # the paper's directions
    exact = MeZO(params, lr=1e-7, eps=1e-3, seed=1, perturb="forward", model=model)
    # its hooks stay on the model but do nothing outside its own steps (they check its offset)

    def exact_step():
        exact.step(forward)

    forward()  # warm-up: allocator, kernels, compile
    opt.step(forward, settle=False)
    opt.step(forward, settle=False)  # the held update joins this step's first pass
    apart.step(forward)
    exact_step()
    reference_step(params, forward, 0, 1e-7, 1e-3)
    gauss.step(forward, settle=False)
    gauss.step(forward, settle=False)
    from zoobj.engine.noise import kernel_for, moves_params

    default = kernel_for("auto", opt.noise)
    gaussian = kernel_for("auto", "gaussian")

    def noise_pass(r, kernel=default):
        sign = 1.0 if r % 2 == 0 else -1.0  # alternate, so the weights wander no further than one pass
        moves_params([(i, p, [(12345, 1.0, sign * 1e-3)]) for i, p in enumerate(params)], kernel)

    noise_pass(1, gaussian)

    def copy_pass(r):
        with torch.no_grad():
            for p in params:
                p.mul_(1.0)  # read and write every element once: the memory traffic of a pass, nothing else

    noise_pass(1)
    copy_pass(0)
    two_fwd, zo, zs, fw, ref, npass, cpass, gpass, zg = [], [], [], [], [], [], [], [], []
    arms = [
        (npass, noise_pass),
        (cpass, copy_pass),
        (gpass, lambda r: noise_pass(r, gaussian)),
        (zg, lambda r: gauss.step(forward, settle=False)),
        (two_fwd, lambda r: (forward(), forward())),
        (zo, lambda r: opt.step(forward, settle=False)),
        (zs, lambda r: apart.step(forward)),
        (fw, lambda r: exact_step()),
        (ref, lambda r: reference_step(params, forward, r + 1, 1e-7, 1e-3)),
    ]
    for r in range(shape["rounds"]):
        # the order turns each round, so no arm always runs first or last
        for times, fn in arms[r % len(arms) :] + arms[: r % len(arms)]:
            t = time.perf_counter()
            fn(r)
            times.append(time.perf_counter() - t)
    return {
        "params_millions": sum(p.numel() for p in params) / 1e6,
        "two_forwards_s": statistics.median(two_fwd),
        # each round's own ratio, then the median: robust to a slow spell on a shared VM
        "step_ratio": statistics.median(z / t for z, t in zip(zo, two_fwd)),
        "reference_ratio": statistics.median(z / t for z, t in zip(ref, two_fwd)),
        "separate_ratio": statistics.median(z / t for z, t in zip(zs, two_fwd)),
        "separate_step_s": statistics.median(zs),
        "forward_ratio": statistics.median(z / t for z, t in zip(fw, two_fwd)),
        "zoobj_step_s": statistics.median(zo),
        "forward_step_s": statistics.median(fw),
        "reference_step_s": statistics.median(ref),
        "noise_backend": opt.noise_backend,
        "noise_kind": opt.noise,
        "noise_ns_per_element": statistics.median(npass) * 1e9 / sum(p.numel() for p in params),
        "copy_ns_per_element": statistics.median(cpass) * 1e9 / sum(p.numel() for p in params),
        "gaussian_ns_per_element": statistics.median(gpass) * 1e9 / sum(p.numel() for p in params),
        "gaussian_ratio": statistics.median(z / t for z, t in zip(zg, two_fwd)),
        "gaussian_step_s": statistics.median(zg),
        "threads": torch.get_num_threads(),
    }


def cpu_label() -> str:
    """The CPU's model name and its widest vector extension (the noise pass depends on it)."""
    try:
        info = open("/proc/cpuinfo").read()
    except OSError:
        return "unknown CPU"
    name = next((l.split(":", 1)[1].strip() for l in info.splitlines() if l.startswith("model name")), "unknown CPU")
    flags = next((l.split(":", 1)[1].split() for l in info.splitlines() if l.startswith("flags")), [])
    vec = "AVX-512" if "avx512f" in flags else "AVX2 (no AVX-512)" if "avx2" in flags else "no AVX2"
    return f"{name}, {vec}"


def peak(mode, shape):
    """Runs in a fresh subprocess: build, run one kind of work, report peak RSS (MiB)."""
    import torch

    model, ids, forward = build(shape)
    if mode == "inference":
        for _ in range(2):
            forward()
    elif mode == "mezo":
        from zoobj import MeZO

        opt = MeZO(model.parameters(), lr=1e-7, eps=1e-3, seed=0)
        for _ in range(2):
            opt.step(forward, settle=False)
        opt.settle()
    elif mode == "mezo-forward":
        from zoobj import MeZO

        opt = MeZO(model.parameters(), lr=1e-7, eps=1e-3, seed=0, perturb="forward", model=model)
        for _ in range(2):
            opt.step(forward)
    elif mode == "adamw":
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a smaller shape, under a minute")
    ap.add_argument("--_peak", help=argparse.SUPPRESS)
    args = ap.parse_args()
    shape = QUICK if args.quick else FULL
    if args._peak:
        print(json.dumps({"peak_mib": peak(args._peak, shape)}))
        return
    warnings.simplefilter("ignore")

    t = timing(shape)
    rss = {}
    for mode in ("inference", "mezo", "mezo-forward", "adamw"):
        cmd = [sys.executable, __file__, "--_peak", mode] + (["--quick"] if args.quick else [])
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=os.environ)
        rss[mode] = json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]

    two = t["two_forwards_s"]
    rows = [
        ("two inference forwards", f"{two:.3f} s", "1.00", f"{rss['inference']:.0f} MiB", "1.00"),
        ("zoobj MeZO step", f"{t['zoobj_step_s']:.3f} s", f"{t['step_ratio']:.3f}",
         f"{rss['mezo']:.0f} MiB", f"{rss['mezo'] / rss['inference']:.3f}"),
        ("zoobj, separate passes", f"{t['separate_step_s']:.3f} s", f"{t['separate_ratio']:.3f}", "", ""),
        ("zoobj, gaussian noise", f"{t['gaussian_step_s']:.3f} s", f"{t['gaussian_ratio']:.3f}", "", ""),
        ("zoobj, perturb=forward", f"{t['forward_step_s']:.3f} s", f"{t['forward_ratio']:.3f}",
         f"{rss['mezo-forward']:.0f} MiB", f"{rss['mezo-forward'] / rss['inference']:.3f}"),
        ("paper-style MeZO step", f"{t['reference_step_s']:.3f} s", f"{t['reference_ratio']:.3f}", "", ""),
        ("AdamW backprop step", "", "", f"{rss['adamw']:.0f} MiB", f"{rss['adamw'] / rss['inference']:.3f}"),
    ]
    label = "quick" if args.quick else "OPT-125m"
    print(f"shape {label}: {t['params_millions']:.1f}M parameters, batch {shape['batch']} x {shape['seq']}, fp32, "
          f"{t['threads']} threads, {t['noise_kind']} noise {t['noise_backend']}, median of {shape['rounds']} rounds (ratios per round)")
    print(f"CPU: {cpu_label()}; one noise pass: {t['noise_ns_per_element']:.2f} ns per element, one plain "
          f"read-modify-write pass: {t['copy_ns_per_element']:.2f} ns per element "
          f"(noise / plain {t['noise_ns_per_element'] / t['copy_ns_per_element']:.2f}x); a Gaussian pass: "
          f"{t['gaussian_ns_per_element']:.2f} ns per element")
    print(f"{'':24} {'time':>10} {'/ 2 fwd':>8} {'peak RSS':>11} {'/ infer':>8}")
    for r in rows:
        print(f"{r[0]:24} {r[1]:>10} {r[2]:>8} {r[3]:>11} {r[4]:>8}")
    print(json.dumps({
        "step_over_two_forwards": round(t["step_ratio"], 4),
        "reference_step_over_two_forwards": round(t["reference_ratio"], 4),
        "separate_passes_step_over_two_forwards": round(t["separate_ratio"], 4),
        "forward_perturb_step_over_two_forwards": round(t["forward_ratio"], 4),
        "peak_rss_over_inference": round(rss["mezo"] / rss["inference"], 4),
        "forward_perturb_peak_rss_over_inference": round(rss["mezo-forward"] / rss["inference"], 4),
        "adamw_peak_rss_over_inference": round(rss["adamw"] / rss["inference"], 4),
        "noise_ns_per_element": round(t["noise_ns_per_element"], 3),
        "noise_pass_ns_per_element": round(t["noise_ns_per_element"], 3),
        "copy_pass_ns_per_element": round(t["copy_ns_per_element"], 3),
        "noise_over_copy_pass": round(t["noise_ns_per_element"] / t["copy_ns_per_element"], 3),
        "noise_kind": t["noise_kind"],
        "gaussian_pass_ns_per_element": round(t["gaussian_ns_per_element"], 3),
        "gaussian_step_over_two_forwards": round(t["gaussian_ratio"], 4),
        "cpu": cpu_label(),
    }))


if __name__ == "__main__":
    main()

"""MeZO's settings: the names each one takes, and the check that refuses any other in one line."""

from __future__ import annotations

import math

import torch

from zoobj.engine.noise import NOISE_BACKENDS, NOISE_KINDS
from zoobj.engine.rules import RULES
from zoobj.engine.shaping import SHAPINGS

PERTURB = ("inplace", "forward")
PASSES = ("fused", "separate")  # recorded in a run's config.json; runs made before it: "separate"


def check_settings(lr, eps, n, rule, on_nonfinite, perturb, shaping, noise, backend, passes, model, shard,
                   exchange) -> None:
    """MeZO's arguments, each refused with one line naming what it takes."""
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0):
        raise ValueError(f"lr must be a finite number >= 0, got {lr!r}")
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
    if not (isinstance(n, int) and n >= 1):
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    if rule not in RULES:
        raise ValueError(f"unknown update rule {rule!r}; choose one of {', '.join(RULES)}")
    if on_nonfinite not in ("skip", "raise"):
        raise ValueError(f"on_nonfinite must be 'skip' or 'raise', got {on_nonfinite!r}")
    if perturb not in PERTURB:
        raise ValueError(f"unknown perturb {perturb!r}; choose one of {', '.join(PERTURB)}")
    if shaping not in SHAPINGS:
        raise ValueError(f"unknown shaping {shaping!r}; choose one of {', '.join(SHAPINGS)}")
    if noise not in NOISE_KINDS:
        raise ValueError(f"unknown noise {noise!r}; choose one of {', '.join(NOISE_KINDS)}")
    if backend not in NOISE_BACKENDS:
        raise ValueError(f"unknown noise backend {backend!r}; choose one of {', '.join(NOISE_BACKENDS)}")
    if passes not in PASSES:
        raise ValueError(f"unknown passes {passes!r}; choose one of {', '.join(PASSES)}")
    if perturb == "forward" and not isinstance(model, torch.nn.Module):
        raise ValueError("perturb='forward' needs model=<the torch.nn.Module that holds the parameters>")
    if shard is not None:
        rank, world = shard
        if not (0 <= rank < world) or exchange is None:
            raise ValueError(f"shard=(rank, world) needs 0 <= rank < world and an exchange function, got {shard!r}")
        if n % world:
            raise ValueError(f"query-parallel n-SPSA needs n to be a multiple of the world size ({world}), got n={n}")

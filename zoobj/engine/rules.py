"""How a step's estimate moves the weights: parameter groups, and one update rule per tensor.

The estimate is ``g_hat = sum_k c_k z_k / n`` over a step's directions (``z_k`` rebuilt
from its seed, never stored). ``sgd`` subtracts ``lr * g_hat`` one direction at a time
(no memory) as moves ``sgd_moves`` hands to the perturber, which writes them in one pass
(with ``restore``: in the move that also restores the weights from ``theta - eps z``, n = 1,
in place); ``Stateful`` keeps momentum or adam buffers (fp32,
the size of the trained tensors: meant for PEFT-sized sets) and builds ``g_hat`` chunk by
chunk. ``param_groups`` and ``decay_groups`` shape ``MeZO``'s ``params``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from zoobj.engine.noise import Kernel, chunk_axpz, flat_view

RULES = ("sgd", "momentum", "adam")
STATE_CHUNK = 1 << 20  # elements per chunk for the momentum / adam updates


def decay_groups(named_parameters: Iterable[tuple[str, torch.Tensor]], weight_decay: float) -> list[dict]:
    """Split parameters into a decayed group and a group without weight decay.

    As in the MeZO paper, biases and normalisation weights (any 1-D tensor, or a name
    ending in ``bias`` or containing ``norm``) are not decayed. Pass the result to
    ``MeZO`` as its ``params``.

    >>> import torch
    >>> lin, ln = torch.nn.Linear(2, 2), torch.nn.LayerNorm(2)
    >>> named = [("lin." + n, p) for n, p in lin.named_parameters()]
    >>> named += [("ln." + n, p) for n, p in ln.named_parameters()]
    >>> [len(g["params"]) for g in decay_groups(named, 0.1)]
    [1, 3]
    """
    decay, no_decay = [], []
    for name, p in named_parameters:
        lowered = name.lower()
        if p.ndim < 2 or lowered.endswith("bias") or "norm" in lowered:
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def param_groups(params: Iterable, lr: float, weight_decay: float) -> list[dict]:
    """torch-style groups (``params``, ``lr``, ``weight_decay``) with ``index``: each trained
    tensor's position in the run, which keys its noise. Frozen ``Parameter``s are left out."""
    if isinstance(params, torch.Tensor):
        raise TypeError("params must be an iterable of tensors or of param groups, not a tensor")
    params = list(params)
    if not params:
        raise ValueError("MeZO got an empty parameter list")
    raw = params if isinstance(params[0], dict) else [{"params": params}]
    groups, seen, index = [], set(), 0
    for g in raw:
        g = dict(g)
        ps = [g["params"]] if isinstance(g["params"], torch.Tensor) else list(g["params"])
        kept, indices = [], []
        for p in ps:
            if not isinstance(p, torch.Tensor) or not p.is_floating_point():
                raise TypeError(f"MeZO trains floating-point tensors, got {type(p).__name__}")
            if id(p) in seen:
                raise ValueError("a tensor appears in more than one parameter group")
            seen.add(id(p))
            if isinstance(p, torch.nn.Parameter) and not p.requires_grad:
                continue
            kept.append(p)
            indices.append(index)
            index += 1
        g["params"], g["index"] = kept, indices
        g.setdefault("lr", lr)
        g.setdefault("weight_decay", weight_decay)
        groups.append(g)
    if index == 0:
        raise ValueError("MeZO got no trainable tensors (all frozen?)")
    return groups


def sgd_moves(seeds: Sequence[int], grads: Sequence[float], glr: float, decay: float, eps: float,
              restore: bool) -> list[tuple[int, float, float]]:
    """The ``(seed, a, b)`` moves of rule sgd for one tensor (``theta <- a * theta + b * z``).

    ``restore`` (n = 1, in place): from theta - eps*z to decay*theta - lr*g*z in one move, the
    probe's restore and the update together. Otherwise, at the restored base point, one move
    per direction, the decay in the first."""
    if restore:
        return [(seeds[0], decay, decay * eps - glr * grads[0])]
    n = len(seeds)
    return [(s, decay if k == 0 else 1.0, -glr * g / n) for k, (s, g) in enumerate(zip(seeds, grads))]


class Stateful:
    """Momentum or adam on the estimate, with its buffers in ``state`` (per tensor index)."""

    def __init__(self, rule: str, momentum: float, betas: tuple[float, float], adam_eps: float) -> None:
        self.rule, self.momentum, self.betas, self.adam_eps = rule, momentum, betas, adam_eps
        self.state: dict[int, dict[str, torch.Tensor]] = {}

    def _buffers(self, i: int, p: torch.Tensor) -> dict[str, torch.Tensor]:
        st = self.state.setdefault(i, {})
        if not st:
            st["exp_avg"] = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
            if self.rule == "adam":
                st["exp_avg_sq"] = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
            st["t"] = torch.zeros((), dtype=torch.int64)
        st["t"] += 1
        return st

    def __call__(self, i: int, p: torch.Tensor, seeds: Sequence[int], grads: Sequence[float], glr: float,
                 decay: float, eps: float, kernel: Kernel) -> None:
        """The estimate sum_k g_k z_k / n, built chunk by chunk in fp32, through the rule."""
        st = self._buffers(i, p)
        t = int(st["t"])
        flat, n = flat_view(p), len(seeds)
        if decay != 1.0:
            flat.mul_(decay)
        buf = torch.zeros(min(flat.numel(), STATE_CHUNK), dtype=torch.float32, device=p.device)
        b1, b2 = self.betas
        for off in range(0, flat.numel(), STATE_CHUNK):
            size = min(STATE_CHUNK, flat.numel() - off)
            ghat = buf[:size].zero_()  # the chunk of sum_k g_k z_k / n
            for s, g in zip(seeds, grads):
                chunk_axpz(ghat, s, i, off, g / n, kernel)
            m = st["exp_avg"][off : off + size]
            target = flat[off : off + size]
            if self.rule == "momentum":
                m.mul_(self.momentum).add_(ghat)
                target.add_((-glr * m).to(target.dtype))
            else:
                v = st["exp_avg_sq"][off : off + size]
                m.mul_(b1).add_(ghat, alpha=1 - b1)
                v.mul_(b2).addcmul_(ghat, ghat, value=1 - b2)
                denom = (v / (1 - b2**t)).sqrt_().add_(self.adam_eps)
                target.add_((-glr / (1 - b1**t) * m / denom).to(target.dtype))

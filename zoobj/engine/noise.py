"""Counter-based noise: the perturbation directions ``z`` of MeZO.

Element ``i`` of parameter ``j`` at step seed ``s`` is a hash of ``(s, j, i)`` turned
into a normal deviate (Box-Muller; kind ``"gaussian"``, the paper's) or into a sign
(kind ``"rademacher"``: +-1, the directions of Spall's original SPSA, one hash and no
transcendental per element), so any slice of ``z`` can be regenerated on its own, the
result does not depend on the thread count, and the global RNG is never touched.
Nothing the size of the model is stored: ``z`` is rebuilt on every pass.

- seeds: ``step_seed(seed, step, k)`` names direction ``k`` of a step; ``_param_key``
  derives two 32-bit keys per parameter (and per 2**31-element span of it).
- the arithmetic: ``_axpz(flat, ...)`` does ``flat <- a * flat + b * z`` in fp32 (``_axpr``
  for the Rademacher kind).
- the kernel: ``Kernel`` runs ``_axpz`` compiled (``torch.compile``, one fused kernel)
  where that works and eagerly in chunks elsewhere; the two agree to within a float32
  rounding of ``z``. ``KERNEL`` is the process's choice, ``EAGER_KERNEL`` the eager
  form (to replay a run that ran eagerly); ``kernel_for(backend)`` picks one.
- several moves in one pass: ``Kernel.moves`` / ``moves_param`` apply ``(seed, a, b)``
  moves in turn with one read and one write of the weights, rounding to the weights'
  dtype after each move as separate passes would: the same bits, fewer passes.
- callers: ``axpz_param`` (a whole parameter, in place), ``moves_param`` (several moves,
  one pass), ``chunk_axpz`` (a slice of ``z`` added to a buffer), ``noise`` (``z`` itself,
  for inspection and tests).

>>> z = noise(5, seed=1)
>>> bool((noise(5, seed=1) == z).all()), bool((noise(5, seed=2) != z).any())
(True, True)
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Sequence

import torch

NOISE_BACKENDS = ("auto", "compiled", "eager")
NOISE_KINDS = ("gaussian", "rademacher")  # what z is; recorded in a run's config.json as "noise"
# The noise function's version, recorded in a run's config.json. 1: Mueller hash of
# (key, index) twice, Box-Muller on the top 24 bits of each (the int32-lane form here
# gives the same bits as the int64 form it replaced). A new version must keep the old
# function for replay or have runs made with it refused.
NOISE_VERSION = 1
NOISE_VERSIONS = (1,)

_M32 = 0xFFFFFFFF
_M64 = 0xFFFFFFFFFFFFFFFF
_HASH_MUL = 0x45D9F3B  # < 2**31: an int32 literal
_TWO_PI = 2.0 * math.pi
_EAGER_CHUNK = 1 << 20  # elements per chunk on the eager path
_MAX_SPAN = 1 << 31  # element indices are hashed as 32-bit counters: re-key past this


# ----------------------------------------------------------------------------- seeds


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def step_seed(seed: int, step: int, k: int = 0) -> int:
    """The seed of perturbation ``k`` at ``step``: a pure function of its arguments.

    A 32-bit integer, so it is short in a trajectory file and exact in any JSON reader.

    >>> step_seed(0, 5) == step_seed(0, 5)
    True
    >>> step_seed(0, 5) != step_seed(0, 6) != step_seed(1, 5)
    True
    """
    return _splitmix64(_splitmix64(_splitmix64(seed & _M64) ^ step) ^ k) & _M32


def _param_key(seed: int, index: int, span: int) -> tuple[int, int]:
    """Two 32-bit keys for parameter ``index`` (and its ``span``-th 2**31 slice)."""
    h = _splitmix64(_splitmix64((seed << 20) ^ index) ^ span)
    return h & _M32, h >> 32


# ----------------------------------------------------------------------------- the arithmetic


def _hash32(x: torch.Tensor) -> torch.Tensor:
    # Thomas Mueller's 32-bit integer hash in int32 lanes: the multiply wraps modulo
    # 2**32 and the shifts are made logical by masking, so the bits are those of the
    # unsigned hash. (int32, not int64: AVX2 has a 32-bit vector multiply but no 64-bit
    # one, and the int64 form ran scalar there, ~4x slower per element.)
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * _HASH_MUL
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * _HASH_MUL
    return x ^ ((x >> 16) & 0xFFFF)


def _signed32(k: int) -> int:
    return k - (1 << 32) if k >= 1 << 31 else k


def _key(k: int, device) -> torch.Tensor:
    """A 32-bit key (or offset) as an int32 tensor holding the same bits."""
    return torch.tensor(_signed32(k), dtype=torch.int32, device=device)


def _gauss(i: torch.Tensor, k1, k2) -> torch.Tensor:
    """z for element indices ``i``: two hashes, Box-Muller on the top 24 bits of each."""
    u = _hash32(i ^ k1)
    v = _hash32(u ^ k2)
    u1 = (((u >> 8) & 0xFFFFFF).to(torch.float32) + 0.5) * (2.0**-24)  # (0, 1): log is finite
    u2 = ((v >> 8) & 0xFFFFFF).to(torch.float32) * (2.0**-24)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(_TWO_PI * u2)


def _sign_bit(i: torch.Tensor, k1) -> torch.Tensor:
    """Bit 8 of the Mueller hash of ``i ^ k1``, as 0 or 1: where a Rademacher ``z`` is -1."""
    return (_hash32(i ^ k1) >> 8) & 1


def _gauss_times(i: torch.Tensor, k1, k2, b) -> torch.Tensor:
    return _gauss(i, k1, k2) * b


def _sign_times(i: torch.Tensor, k1, k2, b) -> torch.Tensor:
    """``b * r`` as a choice between ``b`` and ``-b`` (exactly the product: r is +-1),
    with no conversion or multiply per element."""
    return torch.where(_sign_bit(i, k1) == 0, b, -b)


def _axpz(flat: torch.Tensor, k1, k2, offset, a, b) -> None:
    """``flat <- a * flat + b * z[offset : offset + len(flat)]``, in place, computed in fp32."""
    i = torch.arange(flat.numel(), device=flat.device, dtype=torch.int32) + offset  # < 2**31
    flat.copy_((flat.to(torch.float32) * a + _gauss_times(i, k1, k2, b)).to(flat.dtype))


def _axpr(flat: torch.Tensor, k1, k2, offset, a, b) -> None:
    """``flat <- a * flat + b * r`` with Rademacher ``r = +-1``, in place, computed in fp32."""
    i = torch.arange(flat.numel(), device=flat.device, dtype=torch.int32) + offset  # < 2**31
    flat.copy_((flat.to(torch.float32) * a + _sign_times(i, k1, k2, b)).to(flat.dtype))


def _moves_form(times: Callable) -> Callable:
    """Several moves ``flat <- a_j * flat + b_j * z_j`` in ONE read and write of ``flat``:
    ``moves`` is ``(k1, k2, a, b)`` four at a time. Each move's result is rounded to
    ``flat``'s dtype before the next, so the bits are those of the moves made as separate
    passes (compiled with ``emulate_precision_casts``, which keeps those roundings)."""

    def form(flat: torch.Tensor, offset, *moves) -> None:
        i = torch.arange(flat.numel(), device=flat.device, dtype=torch.int32) + offset  # < 2**31
        x = flat.to(torch.float32)
        for j in range(0, len(moves), 4):
            k1, k2, a, b = moves[j : j + 4]
            x = (x * a + times(i, k1, k2, b)).to(flat.dtype).to(torch.float32)
        flat.copy_(x.to(flat.dtype))

    return form


FORMS = {"gaussian": _axpz, "rademacher": _axpr}  # each kind's arithmetic, one move
MOVES_FORMS = {"gaussian": _moves_form(_gauss_times), "rademacher": _moves_form(_sign_times)}  # several moves, one pass


# ----------------------------------------------------------------------------- the kernel


class Kernel:
    """Chooses, once per process and device type, the compiled or the eager form of a
    kind's arithmetic (``FORMS``; ``eager`` is the eager one)."""

    def __init__(self, compile: bool = True, kind: str = "gaussian") -> None:
        self._compiled: dict[str, Callable | None] = {}
        self.backend = "eager"
        self.compile = compile  # False: always the eager form (replaying a run that ran eagerly)
        self.kind, self.eager = kind, FORMS[kind]
        self.eager_moves = MOVES_FORMS[kind]
        self._compiled_moves: dict[str, Callable | None] = {}

    def compiled_for(self, device_type: str = "cpu") -> Callable | None:
        if device_type not in self._compiled:
            self._compiled[device_type] = None
            wanted = self.compile and os.environ.get("ZOOBJ_COMPILE", "1") not in ("0", "false", "no")
            if wanted and device_type != "meta":
                try:
                    # one graph per dtype and device; leave room for fp32, bf16 and fp16
                    limit = getattr(torch._dynamo.config, "recompile_limit", None)
                    if isinstance(limit, int) and limit < 32:
                        torch._dynamo.config.recompile_limit = 32
                    fn = torch.compile(self.eager, dynamic=True)
                    probe = torch.zeros(8, device=device_type)
                    t = _key(0, device_type)
                    fn(probe, t, t, t, torch.ones((), device=device_type), torch.ones((), device=device_type))
                    self._compiled[device_type] = fn
                except Exception as exc:  # no C++ compiler / triton, unsupported platform, ...
                    warnings.warn(
                        f"zoobj: torch.compile unavailable on {device_type} ({type(exc).__name__}); "
                        "noise runs eagerly (slower, same numbers to float32 rounding). "
                        "Set ZOOBJ_COMPILE=0 to skip the attempt.",
                        RuntimeWarning,
                        stacklevel=3,
                    )
            if device_type == "cpu" or len(self._compiled) == 1:
                self.backend = "compiled" if self._compiled[device_type] is not None else "eager"
        return self._compiled[device_type]

    def __call__(self, flat: torch.Tensor, seed: int, index: int, a: float, b: float) -> None:
        dev = flat.device
        fa = torch.tensor(a, dtype=torch.float32, device=dev)
        fb = torch.tensor(b, dtype=torch.float32, device=dev)
        compiled = self.compiled_for(dev.type)
        for span, start in enumerate(range(0, flat.numel(), _MAX_SPAN)):
            part = flat[start : start + _MAX_SPAN]
            k1, k2 = (_key(k, dev) for k in _param_key(seed, index, span))
            if compiled is not None:
                compiled(part, k1, k2, _key(0, dev), fa, fb)
                continue
            for off in range(0, part.numel(), _EAGER_CHUNK):
                self.eager(part[off : off + _EAGER_CHUNK], k1, k2, off, fa, fb)

    def moves_for(self, device_type: str = "cpu") -> Callable | None:
        """The compiled several-moves form where the one-move form compiled (else None)."""
        if device_type not in self._compiled_moves:
            one = self.compiled_for(device_type)
            self._compiled_moves[device_type] = None if one is None else torch.compile(
                self.eager_moves, dynamic=True, options={"emulate_precision_casts": True})
        return self._compiled_moves[device_type]

    def moves(self, flat: torch.Tensor, index: int, moves: Sequence[tuple[int, float, float]]) -> None:
        """``flat <- a * flat + b * z(seed, index)`` for each ``(seed, a, b)`` in turn, in one
        pass over ``flat``: the same bits as one ``__call__`` per move, one read and write."""
        if len(moves) == 1:
            self(flat, moves[0][0], index, *moves[0][1:])
            return
        dev = flat.device
        form = self.moves_for(dev.type)
        for span, start in enumerate(range(0, flat.numel(), _MAX_SPAN)):
            part = flat[start : start + _MAX_SPAN]
            args = []
            for seed, a, b in moves:
                args += [_key(k, dev) for k in _param_key(seed, index, span)]
                args += [torch.tensor(x, dtype=torch.float32, device=dev) for x in (a, b)]
            if form is not None:
                form(part, _key(0, dev), *args)
                continue
            for off in range(0, part.numel(), _EAGER_CHUNK):
                self.eager_moves(part[off : off + _EAGER_CHUNK], off, *args)


    def grouped(self, flats: Sequence[torch.Tensor], indices: Sequence[int],
                moves: Sequence[tuple[int, float, float]]) -> None:
        """``moves`` on several small flat tensors (one dtype and device, each under 2**31
        elements) in ONE call: copied into one buffer whose elements carry their own
        tensor's keys and their index within it, so ``z`` and the bits are those of one
        call per tensor. For tensors so small that a call costs more than its arithmetic."""
        sizes = [f.numel() for f in flats]
        buf = torch.cat(list(flats))
        dev = buf.device
        seg = torch.repeat_interleave(torch.arange(len(sizes), device=dev), torch.tensor(sizes, device=dev))
        starts = [0]
        for n in sizes[:-1]:
            starts.append(starts[-1] + n)
        offset = torch.tensor([-x for x in starts], dtype=torch.int32, device=dev)[seg]  # arange + offset: own index
        args = []
        for seed, a, b in moves:
            keys = [_param_key(seed, index, 0) for index in indices]
            for part in zip(*keys):
                args.append(torch.tensor([_signed32(k) for k in part], dtype=torch.int32, device=dev)[seg])
            args += [torch.tensor(x, dtype=torch.float32, device=dev) for x in (a, b)]
        if len(moves) == 1:
            form = self.compiled_for(dev.type) or self.eager
            form(buf, args[0], args[1], offset, args[2], args[3])
        else:
            form = self.moves_for(dev.type) or self.eager_moves
            form(buf, offset, *args)
        for f, part in zip(flats, buf.split(sizes)):
            f.copy_(part)


KERNEL = Kernel()
EAGER_KERNEL = Kernel(compile=False)


_OTHER_KINDS: dict[tuple[str, bool], Kernel] = {}  # the kernels of the kinds other than gaussian


def kernel_for(backend: str, kind: str = "gaussian") -> Kernel:
    """The kernel for a ``NOISE_BACKENDS`` name and a ``NOISE_KINDS`` kind (the Gaussian
    ones looked up at call time, so a patched ``KERNEL`` is the one used)."""
    if kind not in FORMS:
        raise ValueError(f"unknown noise kind {kind!r}; choose one of {', '.join(NOISE_KINDS)}")
    if kind == "gaussian":
        return EAGER_KERNEL if backend == "eager" else KERNEL
    key = (kind, backend != "eager")
    if key not in _OTHER_KINDS:
        _OTHER_KINDS[key] = Kernel(compile=key[1], kind=kind)
    return _OTHER_KINDS[key]


# ----------------------------------------------------------------------------- callers


def flat_view(p: torch.Tensor) -> torch.Tensor:
    return p.detach().view(-1)


def _in_place(p: torch.Tensor, write: Callable[[torch.Tensor], None]) -> None:
    """Run ``write`` on ``p``'s elements as one flat tensor: a view of ``p``, or for a
    non-contiguous ``p`` (rare) a contiguous copy that is written back."""
    if p.is_contiguous():
        write(flat_view(p))
    else:
        tmp = p.detach().contiguous()
        write(tmp.view(-1))
        p.detach().copy_(tmp)


def axpz_param(p: torch.Tensor, seed: int, index: int, a: float, b: float, kernel: Kernel) -> None:
    """``p <- a * p + b * z(seed, index)``, in place, for a whole parameter."""
    if a == 1.0 and b == 0.0:  # nothing to do (and -0.0 stays -0.0)
        return
    _in_place(p, lambda flat: kernel(flat, seed, index, a, b))


def _live(moves: Sequence[tuple[int, float, float]]) -> list[tuple[int, float, float]]:
    """The moves that change anything (``a = 1, b = 0`` is left out, so -0.0 stays -0.0)."""
    return [m for m in moves if not (m[1] == 1.0 and m[2] == 0.0)]


def moves_param(p: torch.Tensor, index: int, moves: Sequence[tuple[int, float, float]], kernel: Kernel,
                fuse: bool = True) -> None:
    """``p <- a * p + b * z(seed, index)`` for each ``(seed, a, b)`` in turn, in place: one
    pass over ``p`` (``fuse``) or one pass per move, with the same bits either way."""
    moves = _live(moves)
    if not fuse:
        for seed, a, b in moves:
            axpz_param(p, seed, index, a, b, kernel)
    elif moves:
        _in_place(p, lambda flat: kernel.moves(flat, index, moves))


SMALL = 1 << 16  # elements: a tensor this small costs more in call overhead than in arithmetic
_GROUP = 1 << 20  # elements per grouped call (the eager form's temporaries stay this size)


def moves_params(items: Sequence[tuple[int, torch.Tensor, Sequence[tuple[int, float, float]]]], kernel: Kernel,
                 fuse: bool = True) -> None:
    """``moves_param`` for each ``(index, p, moves)``, the same bits, fewer calls: small
    contiguous tensors that share dtype, device and moves go through ``Kernel.grouped``
    together (a model's norms and biases are most of its tensors and almost none of its
    elements; one call each cost more than the noise over all the rest)."""
    groups: dict[tuple, list[tuple[int, torch.Tensor]]] = {}
    for index, p, moves in items:
        moves = _live(moves)
        if not moves:
            continue
        if p.numel() <= SMALL and p.is_contiguous():
            groups.setdefault((p.dtype, p.device, tuple(moves)), []).append((index, p))
        else:
            moves_param(p, index, moves, kernel, fuse)
    for (_, _, moves), members in groups.items():
        if len(members) == 1:
            moves_param(members[0][1], members[0][0], moves, kernel, fuse)
            continue
        chunks, size = [[]], 0
        for index, p in members:
            if size and size + p.numel() > _GROUP:
                chunks, size = [*chunks, []], 0
            chunks[-1].append((index, p))
            size += p.numel()
        for chunk in chunks:
            flats, indices = [flat_view(p) for _, p in chunk], [i for i, _ in chunk]
            for part in ([moves] if fuse else [[m] for m in moves]):
                kernel.grouped(flats, indices, part)


def chunk_axpz(buf: torch.Tensor, seed: int, index: int, offset: int, b: float, kernel: Kernel) -> None:
    """buf += b * z(seed, index)[offset : offset + len(buf)] (offset < 2**31 per span)."""
    span, local = divmod(offset, _MAX_SPAN)
    if local + buf.numel() > _MAX_SPAN:  # straddles a re-keyed span: split it
        cut = _MAX_SPAN - local
        chunk_axpz(buf[:cut], seed, index, offset, b, kernel)
        chunk_axpz(buf[cut:], seed, index, offset + cut, b, kernel)
        return
    dev = buf.device
    k1, k2 = (_key(k, dev) for k in _param_key(seed, index, span))
    one = torch.ones((), dtype=torch.float32, device=dev)
    fb = torch.tensor(b, dtype=torch.float32, device=dev)
    off = _key(local, dev)
    fn = kernel.compiled_for(dev.type) or kernel.eager
    fn(buf, k1, k2, off, one, fb)


def noise(shape: Sequence[int] | int, seed: int, index: int = 0, dtype=torch.float32, device=None,
          kind: str = "gaussian") -> torch.Tensor:
    """The perturbation direction ``z`` for parameter ``index`` under step seed ``seed``.

    This is exactly what the optimizer adds (scaled by eps); it is materialised here
    only for inspection and tests.

    >>> z = noise(100_000, seed=7)
    >>> abs(float(z.mean())) < 0.02 and abs(float(z.std()) - 1) < 0.02
    True
    >>> bool((noise(10, seed=7) == z[:10]).all())
    True
    >>> r = noise(100_000, seed=7, kind="rademacher")
    >>> sorted(set(r.tolist())), abs(float(r.mean())) < 0.02
    ([-1.0, 1.0], True)
    """
    out = torch.zeros(shape, dtype=dtype, device=device)
    kernel_for("auto", kind)(out.view(-1), seed, index, 0.0, 1.0)
    return out

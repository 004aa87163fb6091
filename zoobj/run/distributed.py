"""MeZO across processes with ``torch.distributed`` (launched by ``torchrun``).

Data-parallel: every rank draws the same step seed and perturbs the same way; each
evaluates its shard of the global batch, and a few scalars (or the shard's
predictions, a few hundred bytes) are exchanged so that every rank gets the loss of
the whole batch -- the same projected gradient, the same update, no weight traffic.

Query-parallel: every rank evaluates the whole batch under its own perturbations
(``k % world == rank``) and the ``(k, l+, l-)`` rows are all-gathered as one float64
tensor; every rank applies all ``n`` updates (see ``MeZO(shard=, exchange=)``).

Everything is a tensor collective (``all_reduce``, ``all_gather``, ``broadcast``):
nothing is pickled. ``World.bytes`` counts the payload this rank has sent.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from zoobj.errors import ConfigError, DataError, ModelError, RewardError, ZoobjError


@dataclass
class World:
    rank: int
    size: int
    backend: str
    device: torch.device
    bytes: int = 0  # payload bytes this rank has put into collectives

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- sharding ----------------------------------------------------------------

    def shard(self, items: Sequence) -> list:
        """This rank's share: items ``rank, rank + size, ...`` (``unshard`` undoes it)."""
        return list(items[self.rank :: self.size])

    @staticmethod
    def unshard(parts: Sequence[Sequence], total: int) -> list:
        out: list = [None] * total
        for r, part in enumerate(parts):
            out[r :: len(parts)] = part
        return out

    # -- collectives ---------------------------------------------------------------

    def _t(self, values, dtype=torch.float64) -> torch.Tensor:
        return torch.as_tensor(values, dtype=dtype, device=self.device)

    def all_reduce_sum(self, values: Sequence[float]) -> list[float]:
        import torch.distributed as dist

        t = self._t(list(values))
        self.bytes += t.numel() * t.element_size()
        dist.all_reduce(t)
        return t.cpu().tolist()

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Gather tensors of the same dtype whose first dimension may differ by rank."""
        import torch.distributed as dist

        t = t.to(self.device)
        sizes = self._t([t.shape[0]], torch.int64)
        got = [torch.zeros_like(sizes) for _ in range(self.size)]
        dist.all_gather(got, sizes)
        sizes = [int(s) for s in got]
        width = max(sizes)
        padded = torch.zeros((width, *t.shape[1:]), dtype=t.dtype, device=self.device)
        padded[: t.shape[0]] = t
        parts = [torch.zeros_like(padded) for _ in range(self.size)]
        self.bytes += 8 + padded.numel() * padded.element_size()
        dist.all_gather(parts, padded)
        return [p[:s].cpu() for p, s in zip(parts, sizes)]

    def exchange_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Query-parallel: every rank's ``(k, l+, l-)`` rows, as one float64 tensor."""
        return torch.cat(self.all_gather(rows.to(torch.float64)))

    def gather_predictions(self, local: Sequence, total: int, strings: bool) -> list:
        """Every rank's predictions (class indices, or strings when ``strings``), back in
        the global batch order. Strings travel as UTF-8 bytes with their lengths."""
        if not strings:
            parts = self.all_gather(self._t([int(p) for p in local], torch.int64))
            return self.unshard([[int(x) for x in p] for p in parts], total)
        blobs = [str(p).encode("utf-8") for p in local]
        lengths = self.all_gather(self._t([len(b) for b in blobs], torch.int64))
        joined = b"".join(blobs)
        raw = torch.tensor(list(joined), dtype=torch.uint8) if joined else torch.zeros(0, dtype=torch.uint8)
        decoded = []
        for lens, data in zip(lengths, self.all_gather(raw)):
            data, start, texts = bytes(data.tolist()), 0, []
            for n in lens.tolist():
                texts.append(data[start : start + n].decode("utf-8"))
                start += n
            decoded.append(texts)
        return self.unshard(decoded, total)

    def broadcast_loss(self, value: float | None, failure: BaseException | None = None) -> float:
        """Rank 0's loss to every rank; if rank 0 failed (``failure``), every rank raises
        the same one-line error (rank 0 its own exception)."""
        import torch.distributed as dist

        t = self._t([value if value is not None else float("nan"), 0.0 if failure is None else 1.0])
        if self.is_main:
            self.bytes += 16
        dist.broadcast(t, src=0)
        if float(t[1]):
            self.share_failure(failure)
        return float(t[0])

    def share_failure(self, failure: BaseException | None) -> None:
        """Called by every rank after a step only rank 0 ran (scoring, an evaluation's
        metric): when rank 0 failed, every rank raises its error -- the same class for
        zoobj's errors (else RuntimeError) and the same one-line message -- so all exit
        together instead of waiting in the next collective."""
        import torch.distributed as dist

        code, text = 0, b""
        if self.is_main and failure is not None:
            code = 1 + next((i for i, c in enumerate(_SHARED_ERRORS) if type(failure) is c), len(_SHARED_ERRORS))
            text = _one_line(failure).encode("utf-8")
        head = self._t([code, len(text)], torch.int64)
        if self.is_main:
            self.bytes += 16
        dist.broadcast(head, src=0)
        code, size = (int(x) for x in head.tolist())
        if not code:
            return
        raw = torch.tensor(list(text), dtype=torch.uint8) if self.is_main else torch.zeros(size, dtype=torch.uint8)
        raw = raw.to(self.device)
        if self.is_main:
            self.bytes += size
        dist.broadcast(raw, src=0)
        if self.is_main:
            raise failure
        kind = _SHARED_ERRORS[code - 1] if code <= len(_SHARED_ERRORS) else RuntimeError
        raise kind(bytes(raw.cpu().tolist()).decode("utf-8"))

    def agree(self, failed: bool) -> bool:
        """True when any rank failed (every rank learns it, so all can stop together)."""
        return self.all_reduce_sum([1.0 if failed else 0.0])[0] > 0


# zoobj's own error classes keep their class on every rank (so the CLI exits with 2 everywhere)
_SHARED_ERRORS = (ConfigError, DataError, ModelError, RewardError, ZoobjError)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    return first if isinstance(exc, ZoobjError) else f"{type(exc).__name__}: {first}"


def from_env(device: str | None = None) -> World | None:
    """The process group ``torchrun`` describes in the environment, or None when alone.

    Backend: ``nccl`` when CUDA is there, ``gloo`` otherwise (``ZOOBJ_DIST_BACKEND``
    overrides it)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return None
    import torch.distributed as dist

    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    backend = os.environ.get("ZOOBJ_DIST_BACKEND") or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        try:
            # long timeout: rank 0 alone runs the evaluations while the others wait
            dist.init_process_group(backend, timeout=datetime.timedelta(hours=2))
        except (RuntimeError, ValueError) as exc:
            raise ConfigError(f"could not join the torchrun process group ({backend}): {exc}") from exc
    return World(rank=rank, size=size, backend=backend, device=dev)


def settle(world: World, seconds: float = 30.0) -> None:
    """Wait (at most ``seconds``) until every rank gets here: after an error that every
    rank raised (``World.share_failure``), so each prints its line before any exits.
    A rank that never arrives (it failed alone) only costs the wait. Only gloo has a
    barrier with a time limit; under nccl the ranks do not wait for each other here."""
    import torch.distributed as dist

    if world.backend != "gloo":
        return
    try:
        dist.monitored_barrier(timeout=datetime.timedelta(seconds=seconds))
    except Exception:  # the others are gone or elsewhere: nothing more to wait for
        pass


def close(world: World | None, together: bool = False) -> None:
    """Leave the process group. ``together``: wait for every rank first (after a
    successful run), so that no rank exits while another still talks to it -- gloo
    aborts a process whose peer has vanished."""
    import torch.distributed as dist

    if world is not None and dist.is_initialized():
        if together:
            dist.barrier()
        dist.destroy_process_group()

"""Process groups for ``torchrun``: setup from its environment and the few collectives the
trainer needs.

``torchrun --nproc_per_node N -m gigagan_train.cli train RUN`` (or ``torchrun ... $(which
gigagan) train RUN``) starts N processes with ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE`` and a
rendezvous in the environment; :func:`init_from_env` joins them into one group (``nccl`` on
CUDA, ``gloo`` on the CPU). Every function here is a collective when the group has more than
one process, and a no-op returning the local value when it does not, so the trainer calls
them unconditionally and every rank enters every collective in the same order.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from gigagan_train.errors import RunError

__all__ = [
    "DistInfo",
    "all_gather_strings",
    "all_gather_tensor",
    "any_true",
    "barrier",
    "check_environment",
    "destroy",
    "init_from_env",
    "is_distributed",
    "mean_buffers",
    "module_digest",
    "sum_ints",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: global rank, rank on its node, number of processes."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError as exc:
        raise RunError(f"environment variable {name}={value!r} is not an integer") from exc


def check_environment(world_size: int | None, rank: int | None, local_rank: int | None) -> None:
    """Refuse a torchrun environment that cannot work, before any collective (a rank
    outside the group would otherwise wait for the rendezvous timeout): one line each."""
    if world_size is None:
        if rank not in (None, 0):
            raise RunError(f"RANK={rank} is set but WORLD_SIZE is not: start with torchrun")
        return
    if world_size < 1:
        raise RunError(f"WORLD_SIZE={world_size}: a group needs at least one process")
    if world_size == 1:
        if rank not in (None, 0) or local_rank not in (None, 0):
            raise RunError(
                f"WORLD_SIZE=1 but RANK={rank} / LOCAL_RANK={local_rank}: a group of one "
                "process has rank 0"
            )
        return
    if rank is None or local_rank is None:
        raise RunError(
            "WORLD_SIZE is set but RANK / LOCAL_RANK are not: start distributed runs with "
            "torchrun (see docs/distributed.md)"
        )
    if not 0 <= rank < world_size:
        raise RunError(f"RANK={rank} is not in [0, WORLD_SIZE={world_size})")
    if not 0 <= local_rank < world_size:
        raise RunError(f"LOCAL_RANK={local_rank} is not in [0, WORLD_SIZE={world_size})")
    master = os.environ.get("MASTER_ADDR")
    if not master:
        raise RunError(
            "MASTER_ADDR is not set: the processes cannot find each other (torchrun sets it; "
            "see docs/distributed.md)"
        )
    port = os.environ.get("MASTER_PORT")
    if port is None or not port.isdigit() or not 0 < int(port) < 65536:
        raise RunError(f"MASTER_PORT={port!r} is not a TCP port (1-65535)")


def init_from_env(device: str = "auto", timeout_minutes: float = 30.0) -> DistInfo:
    """Join the process group ``torchrun`` describes in the environment.

    Without ``WORLD_SIZE`` (a plain ``gigagan train``), or with ``WORLD_SIZE=1``, nothing is
    initialised and rank 0 of 1 is returned. ``device`` is the run's device setting: CUDA
    processes use ``nccl`` and bind to ``cuda:LOCAL_RANK``; CPU processes use ``gloo``.
    """
    world_size = _env_int("WORLD_SIZE")
    rank = _env_int("RANK")
    local_rank = _env_int("LOCAL_RANK")
    check_environment(world_size, rank, local_rank)
    if world_size is None or world_size == 1:
        return DistInfo()
    assert rank is not None and local_rank is not None
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise RunError(
                "device = 'cuda' but this machine has no CUDA device; use 'auto' or 'cpu'"
            )
        if local_rank >= torch.cuda.device_count():
            raise RunError(
                f"LOCAL_RANK {local_rank} but this node has {torch.cuda.device_count()} CUDA "
                "devices: start at most one process per GPU (--nproc_per_node)"
            )
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    log.info("process %d of %d (local rank %d) joined the group", rank, world_size, local_rank)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def destroy() -> None:
    """Leave the process group (after the last collective)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def any_true(flags: Iterable[bool]) -> list[bool]:
    """Element-wise OR of ``flags`` over all processes (one collective for all of them)."""
    values = [bool(f) for f in flags]
    if not is_distributed() or not values:
        return values
    t = torch.tensor([float(v) for v in values], device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v > 0) for v in t.tolist()]


def sum_ints(values: Iterable[int]) -> list[int]:
    """Element-wise sum of integer counters over all processes."""
    ints = [int(v) for v in values]
    if not is_distributed() or not ints:
        return ints
    t = torch.tensor(ints, dtype=torch.float64, device=_device())
    dist.all_reduce(t)
    return [round(v) for v in t.tolist()]


def all_gather_strings(value: str) -> list[str]:
    """Every process's ``value``, in rank order."""
    if not is_distributed():
        return [value]
    out: list[str] = [""] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def all_gather_tensor(t: Tensor) -> list[Tensor]:
    """Every process's copy of a same-shaped CPU tensor (RNG states), in rank order."""
    if not is_distributed():
        return [t]
    device = _device()
    local = t.to(device)
    out = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(out, local)
    return [x.cpu() for x in out]


@torch.no_grad()
def mean_buffers(module: nn.Module) -> None:
    """Average the floating-point buffers of ``module`` over all processes.

    Buffers updated from each process's own batch (the generator's running ``w_avg``)
    would otherwise drift apart; averaging running means of equal-sized batches gives the
    running mean of the global batch exactly (the update is linear in the batch mean).
    """
    if not is_distributed():
        return
    buffers = [b for b in module.buffers() if b.is_floating_point()]
    if not buffers:
        return
    flat = torch.cat([b.reshape(-1).float() for b in buffers])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for b in buffers:
        n = b.numel()
        b.copy_(flat[offset : offset + n].view_as(b).to(b.dtype))
        offset += n


def module_digest(module: nn.Module) -> str:
    """SHA-256 of every parameter and buffer of ``module`` (names, dtypes, shapes and bytes
    in state-dict order): equal digests on two processes mean bit-identical replicas."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        t = t.detach().contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()

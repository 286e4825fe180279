"""The process group: rank, world size and device from the launcher's environment.

Rank and world size are read in exactly one place, :func:`init_distributed`: first the variables
torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), then SLURM's (``SLURM_PROCID``,
``SLURM_NTASKS``, ``SLURM_LOCALID``). The rendezvous address always comes from ``MASTER_ADDR`` /
``MASTER_PORT`` set by the launcher; this module never writes them (nor ``CUDA_VISIBLE_DEVICES``).

A single process started without any of these variables runs without a process group, and every
helper below then degrades to the identity (or a no-op), so library code can call them freely.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, Optional, Tuple

import torch
import torch.distributed as dist

from pretrain.errors import IMSVDError

__all__ = [
    "DistInfo",
    "DistributedSetupError",
    "init_distributed",
    "get_rank",
    "get_world_size",
    "is_main_process",
    "is_distributed",
    "barrier",
    "shard_range",
    "cleanup",
]


class DistributedSetupError(IMSVDError, ValueError):
    """The launcher's environment does not describe a usable process group."""


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job.

    Attributes:
        rank: global rank (0 for a single process).
        world_size: number of processes.
        local_rank: rank on this node (selects the GPU).
        device: the torch device this process should compute on.
        backend: "nccl" or "gloo" when a process group exists, None for a single process.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: Optional[str]

    @property
    def is_main(self) -> bool:
        """True on global rank 0."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when a process group with more than one process is in use."""
        return self.world_size > 1


def _env_int(env: Mapping[str, str], name: str) -> int:
    raw = env[name]
    try:
        return int(raw)
    except ValueError:
        raise DistributedSetupError(
            f"environment variable {name}={raw!r} is not an integer"
        ) from None


def _read_launch_env(env: Mapping[str, str]) -> Tuple[int, int, int, str]:
    """Return (rank, world_size, local_rank, source) from torchrun or SLURM variables."""
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = _env_int(env, "RANK"), _env_int(env, "WORLD_SIZE")
        local = _env_int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0
        source = "torchrun (RANK/WORLD_SIZE)"
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world = _env_int(env, "SLURM_PROCID"), _env_int(env, "SLURM_NTASKS")
        local = _env_int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
        source = "SLURM (SLURM_PROCID/SLURM_NTASKS)"
    else:
        return 0, 1, 0, "default (single process)"
    if world < 1:
        raise DistributedSetupError(f"{source}: world size must be >= 1, got {world}")
    if not 0 <= rank < world:
        raise DistributedSetupError(f"{source}: rank {rank} is outside [0, {world})")
    if local < 0:
        raise DistributedSetupError(f"{source}: local rank must be >= 0, got {local}")
    return rank, world, local, source


def _resolve_device(device: str | torch.device, local_rank: int) -> torch.device:
    if isinstance(device, torch.device):
        dev = device
    elif device == "auto":
        dev = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    elif device == "cuda":
        dev = torch.device("cuda", local_rank)
    else:
        try:
            dev = torch.device(device)
        except RuntimeError:
            raise DistributedSetupError(
                f"device={device!r} is not a valid torch device (use 'auto', 'cpu', 'cuda' or "
                f"'cuda:N')"
            ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DistributedSetupError(
                f"device={str(device)!r} requested but CUDA is not available"
            )
        index = dev.index if dev.index is not None else local_rank
        if index >= torch.cuda.device_count():
            raise DistributedSetupError(
                f"device cuda:{index} requested but only {torch.cuda.device_count()} CUDA "
                f"device(s) are visible (LOCAL_RANK/SLURM_LOCALID={local_rank})"
            )
        dev = torch.device("cuda", index)
    return dev


def init_distributed(device: str | torch.device = "auto") -> DistInfo:
    """Join the process group described by the launcher's environment.

    Args:
        device: "auto" (cuda:LOCAL_RANK when CUDA is available, else cpu), "cpu", "cuda"
            (cuda:LOCAL_RANK) or an explicit "cuda:N".

    Returns:
        A :class:`DistInfo`. Without launcher variables (or with a world size of 1) no process
        group is created and ``backend`` is None. Calling it again returns the existing group.

    Raises:
        DistributedSetupError: malformed variables, missing MASTER_ADDR/MASTER_PORT for a
            multi-process job, or an unavailable device.
    """
    env = os.environ
    rank, world, local, source = _read_launch_env(env)
    dev = _resolve_device(device, local)
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local, dev, dist.get_backend())
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world == 1:
        return DistInfo(0, 1, local, dev, None)
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not env.get(name):
            raise DistributedSetupError(
                f"{source} asks for {world} processes but {name} is not set; launch with "
                f"torchrun (or export {name} in the SLURM batch script)"
            )
    if not dist.is_available():
        raise DistributedSetupError("this torch build has no torch.distributed support")
    backend = "nccl" if dev.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world)
    return DistInfo(rank, world, local, dev, backend)


def is_distributed() -> bool:
    """True when a process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Global rank, 0 without a process group."""
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    """Number of processes, 1 without a process group."""
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """True on global rank 0 (and for a single process)."""
    return get_rank() == 0


def barrier() -> None:
    """Synchronise all processes (no-op for a single process)."""
    if is_distributed() and get_world_size() > 1:
        dist.barrier()


def cleanup() -> None:
    """Destroy the process group if one exists."""
    if is_distributed():
        dist.destroy_process_group()


def shard_range(n: int, rank: int, world_size: int) -> Tuple[int, int]:
    """Contiguous [start, stop) of ``n`` items for ``rank``; sizes differ by at most one."""
    return (n * rank) // world_size, (n * (rank + 1)) // world_size

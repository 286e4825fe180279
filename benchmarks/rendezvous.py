"""What a launcher (torchrun, SLURM) does before a process starts, done by a benchmark that
spawns its own ranks on this machine: a free TCP port for the rendezvous and the environment
``pretrain.dist.init_distributed`` reads. Library code never writes these variables; the tests
have the same two in tests/helpers.py (benchmarks and tests do not import each other)."""

from __future__ import annotations

import os
import socket

__all__ = ["act_as_launcher", "free_port"]


def free_port() -> int:
    """A TCP port of 127.0.0.1 that was free a moment ago (the OS's choice)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def act_as_launcher(rank: int, world: int, port: int) -> None:
    """Set RANK, WORLD_SIZE, LOCAL_RANK (= rank: one machine) and MASTER_ADDR / MASTER_PORT."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip

"""Distributed helpers: the process group from the launcher's environment
(:mod:`pretrain.dist.group`: rank and world size are read there, in one place) and the
collectives (:mod:`pretrain.dist.collectives`). Without a process group every helper degrades
to the identity (or a no-op), so library code can call them freely.
"""

from pretrain.dist.collectives import (
    GATHER_CHUNK_BYTES,
    all_gather_tensor,
    all_gather_with_grad,
    all_reduce_sum,
    all_reduce_sum_with_grad,
    gather_batch_sizes,
    gather_rows_to_main,
    known_batch_sizes,
    main_rank_values,
    run_on_main,
)
from pretrain.dist.group import (
    DistInfo,
    DistributedSetupError,
    barrier,
    cleanup,
    get_rank,
    get_world_size,
    init_distributed,
    is_distributed,
    is_main_process,
    shard_range,
)

__all__ = [
    "DistInfo",
    "DistributedSetupError",
    "init_distributed",
    "get_rank",
    "get_world_size",
    "is_main_process",
    "is_distributed",
    "barrier",
    "cleanup",
    "shard_range",
    "all_gather_with_grad",
    "all_gather_tensor",
    "gather_rows_to_main",
    "gather_batch_sizes",
    "known_batch_sizes",
    "all_reduce_sum",
    "all_reduce_sum_with_grad",
    "main_rank_values",
    "run_on_main",
    "GATHER_CHUNK_BYTES",
]

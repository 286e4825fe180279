"""RNG streams of a process (torch, CUDA, numpy, Python) as plain, weights_only-loadable data."""

from __future__ import annotations

import logging
import random
from typing import Any, Mapping

import numpy as np
import torch

from .common import CheckpointError

logger = logging.getLogger("imsvd.checkpoint")


def capture_rng_state() -> dict[str, Any]:
    """Snapshot every random stream of this process as tensors/ints (weights_only friendly).

    Returns:
        ``{"torch": ByteTensor, "cuda": [ByteTensor per device], "numpy": {...},
        "python": {...}}``.
    """
    np_state = np.random.get_state()
    if np_state[0] != "MT19937":
        raise CheckpointError(f"unsupported numpy bit generator {np_state[0]!r}")
    py_version, py_internal, py_gauss = random.getstate()
    cuda = [s.clone() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else []
    return {
        "torch": torch.get_rng_state().clone(),
        "cuda": cuda,
        "numpy": {
            "bit_generator": "MT19937",
            "state": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64).copy()),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {
            "version": int(py_version),
            "state": torch.tensor(py_internal, dtype=torch.int64),
            "gauss_next": None if py_gauss is None else float(py_gauss),
        },
    }


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Restore the streams captured by :func:`capture_rng_state`.

    CUDA states are restored for the devices present (a different device count is logged);
    saved CUDA states are ignored on a machine without CUDA.

    Args:
        state: the dict returned by :func:`capture_rng_state` (e.g. ``train_state["rng"]``).
    """
    try:
        torch.set_rng_state(state["torch"].cpu().to(torch.uint8))
        np_s = state["numpy"]
        np.random.set_state(
            (
                np_s["bit_generator"],
                np_s["state"].cpu().numpy().astype(np.uint32),
                int(np_s["pos"]),
                int(np_s["has_gauss"]),
                float(np_s["cached_gaussian"]),
            )
        )
        py = state["python"]
        random.setstate(
            (int(py["version"]), tuple(int(x) for x in py["state"].tolist()), py["gauss_next"])
        )
        cuda = list(state.get("cuda") or [])
    except (KeyError, TypeError, AttributeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"invalid RNG state in checkpoint ({type(e).__name__}: {e})") from e
    if cuda:
        if not torch.cuda.is_available():
            logger.info("checkpoint holds CUDA RNG states but CUDA is unavailable: not restored")
        else:
            n = torch.cuda.device_count()
            if n != len(cuda):
                logger.warning(
                    "checkpoint holds %d CUDA RNG states, this machine has %d devices: "
                    "restoring the first %d",
                    len(cuda),
                    n,
                    min(n, len(cuda)),
                )
            for i in range(min(n, len(cuda))):
                torch.cuda.set_rng_state(cuda[i].cpu().to(torch.uint8), i)


def rng_state_for_rank(state: Mapping[str, Any], rank: int, world_size: int) -> dict | None:
    """Pick the RNG snapshot a given rank should restore from a training state.

    Args:
        state: a loaded training state.
        rank: this process's rank.
        world_size: the current number of processes.

    Returns:
        The rank's own snapshot when per-rank states were saved for the same world size; the
        single saved snapshot for a one-process run; otherwise None (the caller should re-seed,
        e.g. with seed + rank + step, rather than give every rank the same streams).
    """
    per_rank = state.get("rng_per_rank")
    if isinstance(per_rank, list) and len(per_rank) == world_size:
        return per_rank[rank]
    if world_size == 1 and state.get("rng") is not None:
        return state["rng"]
    return None

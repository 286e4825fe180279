"""Collectives over the process group: gathers (with and without gradient, to every rank or to
rank 0 in bounded chunks), sums, rank 0's values and writes shared with every rank. Each
degrades to the identity (or a no-op) without a process group.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, TypeVar

import torch
import torch.distributed as dist

from pretrain.dist.group import get_rank, get_world_size

__all__ = [
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

T = TypeVar("T")


# Every rank's batch size for the current training step, when the caller knows them
# (:func:`known_batch_sizes`): gathers of batch-row tensors then exchange no sizes.
_BATCH_SIZES: contextvars.ContextVar[Optional[Tuple[int, ...]]] = contextvars.ContextVar(
    "imsvd_batch_sizes", default=None
)


def gather_batch_sizes(local: int, device: torch.device) -> List[int]:
    """Every rank's ``local`` count, in rank order: one all_gather and one host sync.

    The training step calls it once, before the forward pass, and passes the result to
    :func:`known_batch_sizes`, so the loss's gathers need no size exchange of their own.

    Args:
        local: this rank's count (e.g. readable images in its batch).
        device: the process's device (NCCL gathers CUDA tensors only).

    Returns:
        ``[local]`` for a single process (no collective), else one int per rank.
    """
    if get_world_size() == 1:
        return [int(local)]
    size = torch.tensor([int(local)], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(size) for _ in range(get_world_size())]
    dist.all_gather(sizes, size)
    return torch.cat(sizes).tolist()


@contextlib.contextmanager
def known_batch_sizes(sizes: Sequence[int]) -> Iterator[None]:
    """Within the block, gathers of tensors with this rank's ``sizes[rank]`` rows use ``sizes``.

    :func:`all_gather_with_grad` and :func:`all_gather_tensor` then make one collective per call
    (the data), without the size all_gather and its device-to-host copy. Every rank must pass
    the same ``sizes`` (as :func:`gather_batch_sizes` returns them) and gather only tensors of
    its batch rows inside the block.

    Args:
        sizes: first-dim size of each rank's tensors, in rank order.

    Raises:
        ValueError: (at a gather in the block) a tensor whose first dim is not ``sizes[rank]``;
            exchanging sizes on one rank only would leave the ranks' collectives unmatched.
    """
    token = _BATCH_SIZES.set(tuple(int(s) for s in sizes))
    try:
        yield
    finally:
        _BATCH_SIZES.reset(token)


def _gather_sizes(x: torch.Tensor) -> List[int]:
    known = _BATCH_SIZES.get()
    if known is None:
        return gather_batch_sizes(x.shape[0], x.device)
    if len(known) != get_world_size() or known[get_rank()] != x.shape[0]:
        raise ValueError(
            f"gather of a tensor with {x.shape[0]} rows on rank {get_rank()} inside "
            f"known_batch_sizes({list(known)}): only this rank's batch rows may be gathered there"
        )
    return list(known)


def _gather_concat(x: torch.Tensor, sizes: List[int]) -> torch.Tensor:
    """All-gather along dim 0, padding to the largest first dim when sizes differ."""
    x = x.contiguous()
    largest = max(sizes)
    if x.shape[0] < largest:
        pad = x.new_zeros((largest - x.shape[0],) + tuple(x.shape[1:]))
        x = torch.cat([x, pad], dim=0)
    parts = [torch.empty_like(x) for _ in sizes]
    dist.all_gather(parts, x)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)], dim=0)


class _GatherWithGrad(torch.autograd.Function):
    """Concatenate every rank's tensor; backward sums the gradient over ranks (all-reduce) and
    each rank keeps the rows of its own input."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        sizes = _gather_sizes(x)
        rank = get_rank()
        ctx.row_range = (sum(sizes[:rank]), sum(sizes[: rank + 1]))
        return _gather_concat(x, sizes)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start, stop = ctx.row_range
        return grad[start:stop]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather ``x`` along dim 0, with gradients flowing back to every rank.

    The backward pass all-reduces (sums) the gradient of the concatenated tensor and each rank
    keeps the slice of its own rows, so with a loss computed identically on every rank and DDP's
    gradient averaging the parameter gradient equals the single-process one. First-dim sizes may
    differ between ranks.

    Args:
        x: local tensor (first dim = local batch).

    Returns:
        The concatenation over ranks in rank order (``x`` itself for a single process).
    """
    if get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def all_gather_tensor(x: torch.Tensor) -> torch.Tensor:
    """All-gather ``x`` along dim 0 without gradient; first-dim sizes may differ between ranks.

    Args:
        x: local tensor.

    Returns:
        The concatenation over ranks in rank order (``x`` detached for a single process).
    """
    if get_world_size() == 1:
        return x.detach()
    return _gather_concat(x.detach(), _gather_sizes(x))


# bytes of the rows one rank sends per gather_rows_to_main collective
GATHER_CHUNK_BYTES = 64 << 20


@torch.no_grad()
def gather_rows_to_main(
    x: torch.Tensor,
    sizes: Sequence[int],
    device: Optional[torch.device] = None,
    chunk_bytes: int = GATHER_CHUNK_BYTES,
) -> Optional[torch.Tensor]:
    """Every rank's rows of ``x``, concatenated in rank order, on rank 0 only, in bounded chunks.

    Rank r sends its rows ``chunk`` at a time (``chunk = chunk_bytes // row bytes``, at least
    one row), so a collective moves at most ``W x chunk_bytes`` and no rank other than 0 ever
    holds more than its own rows; rank 0 writes each chunk into one preallocated CPU tensor.
    The number of collectives is ``ceil(max(sizes) / chunk)``, the same on every rank.

    Args:
        x: this rank's rows, (sizes[rank], ...), on any device.
        sizes: every rank's row count, in rank order (as :func:`gather_batch_sizes` returns
            them; every rank must pass the same list).
        device: where the chunks travel from (the process's device; NCCL needs CUDA); default
            ``x.device``. A CPU ``x`` is copied to it one chunk at a time.
        chunk_bytes: bytes per rank per collective.

    Returns:
        On rank 0 the (sum(sizes), ...) CPU tensor; None on the other ranks. For a single
        process ``x`` detached on the CPU.

    Raises:
        ValueError: ``x`` does not have ``sizes[rank]`` rows.
    """
    rank, world = get_rank(), get_world_size()
    if len(sizes) != world or int(sizes[rank]) != x.shape[0]:
        raise ValueError(
            f"gather_rows_to_main: {x.shape[0]} rows on rank {rank}, sizes {list(sizes)}"
        )
    if world == 1:
        return x.detach().cpu()
    tail = tuple(x.shape[1:])
    row_bytes = max(1, x.element_size() * int(torch.Size(tail).numel()))
    chunk = max(1, int(chunk_bytes) // row_bytes)
    starts = [sum(sizes[:r]) for r in range(world)]
    out = torch.empty((sum(sizes),) + tail, dtype=x.dtype) if rank == 0 else None
    send = torch.zeros((chunk,) + tail, dtype=x.dtype, device=device or x.device)
    parts = [torch.empty_like(send) for _ in range(world)] if rank == 0 else None
    for lo in range(0, max(sizes), chunk):
        n = max(0, min(chunk, x.shape[0] - lo))
        send[:n] = x[lo : lo + n]
        dist.gather(send, parts, dst=0)
        if out is not None:
            for r, part in enumerate(parts):
                m = max(0, min(chunk, int(sizes[r]) - lo))
                out[starts[r] + lo : starts[r] + lo + m] = part[:m].cpu()
    return out


@torch.no_grad()
def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over ranks, returned as a new tensor (no gradient; ``x`` is untouched).

    Args:
        x: tensor of the same shape on every rank.

    Returns:
        The elementwise sum over ranks (a detached copy of ``x`` for a single process).
    """
    out = x.detach().clone()
    if get_world_size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


class _AllReduceSumWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = x.contiguous().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        # y = sum_r x_r is seen by every rank, so d(sum_r L_r)/dx_r = sum_r dL_r/dy.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def all_reduce_sum_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Differentiable sum over ranks (backward: all-reduce sum of the output gradients).

    Used to combine per-rank partial sums of a quantity that every rank then uses in the same
    loss: rank r's partial gets the gradient that all ranks' losses send to the total, which is
    the convention :func:`all_gather_with_grad` follows as well.

    Args:
        x: partial value on this rank (same shape on every rank).

    Returns:
        The sum over ranks (``x`` itself for a single process).
    """
    if get_world_size() == 1:
        return x
    return _AllReduceSumWithGrad.apply(x)


def main_rank_values(values: Sequence[int], device: str | torch.device) -> List[int]:
    """Rank 0's integers on every rank (what the other ranks pass is ignored).

    One all-reduce on ``device`` (the process's device: NCCL reduces CUDA tensors only); the
    values themselves for a single process. Every rank must call it.
    """
    if get_world_size() == 1:
        return [int(v) for v in values]
    mine = [int(v) for v in values] if get_rank() == 0 else [0] * len(values)
    return [int(v) for v in all_reduce_sum(torch.tensor(mine, device=torch.device(device)))]


def run_on_main(
    fn: Callable[[], T],
    device: str | torch.device,
    catch: Tuple[type, ...] = (Exception,),
    code: Callable[[BaseException], int] = lambda e: 1,
) -> Tuple[Optional[T], Optional[BaseException], int]:
    """Run ``fn()`` on rank 0 alone and tell every rank how it went (the pattern of every write
    that rank 0 makes for the job: a checkpoint, an output folder's lock, a result file).

    A rank that raised alone would leave the others waiting in their next collective; here
    rank 0 catches ``catch``, and one :func:`main_rank_values` exchange gives every rank the
    outcome code (0: ``fn`` returned; else ``code(error)``, at least 1), so all ranks can raise
    together. Exceptions outside ``catch`` propagate on rank 0 (a bug keeps its traceback; the
    other ranks are then left in the exchange, as with any crash). Every rank must call it.

    Returns:
        (``fn``'s result on rank 0, else None; rank 0's caught error, else None; the outcome
        code, the same on every rank).
    """
    result, error, outcome = None, None, 0
    if get_rank() == 0:
        try:
            result = fn()
        except catch as e:
            error, outcome = e, max(1, int(code(e)))
    (outcome,) = main_rank_values([outcome], device)
    return result, error, outcome

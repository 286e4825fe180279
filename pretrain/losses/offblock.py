"""The lean off-block entropy of the IMSVD loss: the sum of p log p over the off-diagonal B x B
blocks of P = q1^T q2 / N, swept in row blocks of whole variables so that no D x D buffer is
held, its gradient accumulated during the same sweep (docs/PROTOCOLS.md section 1;
:func:`pretrain.losses.imsvd.off_block_entropy_sum` checks the inputs and calls it).
"""

from __future__ import annotations

from typing import Tuple

import torch

__all__ = ["OffBlockEntropy", "shard_rows", "DEFAULT_BLOCK_ELEMS"]

# Elements per row-block buffer of the lean sweep (2 buffers); 2**23 floats = 32 MiB each.
DEFAULT_BLOCK_ELEMS = 1 << 23


def shard_rows(dim: int, bin_size: int, rank: int, world_size: int) -> Tuple[int, int]:
    """Rows of P (dimensions of q1) that ``rank`` handles: whole variables, as even as possible.

    Args:
        dim: D.
        bin_size: B.
        rank, world_size: this rank and the number of ranks.

    Returns:
        (start, stop) row indices, multiples of bin_size (possibly empty when M < world_size).
    """
    m = dim // bin_size
    return (m * rank // world_size) * bin_size, (m * (rank + 1) // world_size) * bin_size


def _block_rows(dim: int, bin_size: int, block_elems: int) -> int:
    """Rows per sweep block: a multiple of bin_size with about block_elems elements per buffer."""
    return max(1, block_elems // (dim * bin_size)) * bin_size


class OffBlockEntropy(torch.autograd.Function):
    """S = sum over off-diagonal blocks of p log p, for the rows [start, stop) of P = q1^T q2 / N.

    Forward sweeps P in blocks of whole variables (rows), so the diagonal B x B block of each row
    variable lies inside the block and is zeroed there before the block is summed (off-block
    sum = full sum minus the diagonal blocks, without the cancellation of a subtraction).
    With G = dS/dP = (log P + 1) on off-block entries and 0 on diagonal-block entries:

        dS/dq1[:, rows] = q2 G^T / N,        dS/dq2 = q1[:, rows] G / N.

    The "+1" part of G does not need a D x D pass: for a row r of variable m(r),
    sum_{b off-block} q2[i, b] = sum_b q2[i, b] - sum_{b in m(r)} q2[i, b] (and likewise for q1),
    which is O(N D). Both gradients are accumulated during the sweep since the output is a
    scalar; backward only scales them by the incoming gradient.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        q1: torch.Tensor,
        q2: torch.Tensor,
        bin_size: int,
        start: int,
        stop: int,
        block_elems: int,
        want_grad: bool,
    ) -> torch.Tensor:
        n, d = q1.shape
        m = d // bin_size
        q1s_t = (q1 / n).t().contiguous()  # D x N: row slices are contiguous (rows of P)
        q2 = q2.contiguous()
        rows_per_block = _block_rows(d, bin_size, block_elems)
        buf_rows = min(rows_per_block, max(stop - start, 1))
        pbuf = q1.new_empty(buf_rows, d)
        lbuf = q1.new_empty(buf_rows, d)
        total = torch.zeros((), dtype=torch.float64, device=q1.device)
        if want_grad:
            grad1_t = q1.new_zeros(d, n)  # dS/dq1, transposed like q1s_t
            grad2 = q1.new_zeros(n, d)
        for r0 in range(start, stop, rows_per_block):
            r1 = min(r0 + rows_per_block, stop)
            rows, v0, nv = r1 - r0, r0 // bin_size, (r1 - r0) // bin_size
            p = torch.mm(q1s_t[r0:r1], q2, out=pbuf[:rows])
            logp = torch.log(p, out=lbuf[:rows])
            plogp = p.mul_(logp)
            # Diagonal blocks of the row variables v0..v0+nv: element [k, :, v0 + k, :].
            plogp.view(nv, bin_size, m, bin_size).diagonal(offset=v0, dim1=0, dim2=2).zero_()
            total += plogp.sum()
            if want_grad:
                logp.view(nv, bin_size, m, bin_size).diagonal(offset=v0, dim1=0, dim2=2).zero_()
                torch.mm(logp, q2.t(), out=grad1_t[r0:r1])
                grad2.addmm_(q1s_t[r0:r1].t(), logp)
        if want_grad:
            # "+1" part of G, see the class docstring.
            bins2 = q2.reshape(n, m, bin_size).sum(-1)  # n x M
            plus1 = (bins2.sum(1, keepdim=True) - bins2).repeat_interleave(bin_size, dim=1)
            grad1_t[start:stop] += plus1[:, start:stop].t()
            grad1_t.div_(n)
            bins1 = q1s_t.t().reshape(n, m, bin_size).sum(-1)
            bins1[:, : start // bin_size] = 0
            bins1[:, stop // bin_size :] = 0
            grad2 += (bins1.sum(1, keepdim=True) - bins1).repeat_interleave(bin_size, dim=1)
            ctx.grads = (grad1_t.t(), grad2)
        return total.to(q1.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        grad1, grad2 = ctx.grads
        return grad1 * grad_out, grad2 * grad_out, None, None, None, None, None

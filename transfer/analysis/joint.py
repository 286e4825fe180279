"""The cross-joint matrix P of IMSVD's discrete codes and what it says (pure torch).

P (D x D) is the empirical joint probability of the units of view 1 and view 2:
:func:`joint_matrix` computes it in one shot, :class:`transfer.analysis.codes.JointAccumulator`
streams it. Its (M x M) blocks of B x B units are read block-row by block-row
(:func:`as_blocks`): the pairwise mutual information of the variables
(:func:`pairwise_mutual_information`, zero for independent variables) and the summary of
:func:`joint_summary`.

Every B x B block of P has unit mass (each sub-vector sums to one), so "diagonal-block vs
off-block mass" is reported as the share of each diagonal block's mass on its own diagonal
(ideal 1) together with the two entropy terms of the loss: DE = sum of p log p over P's diagonal
/ M (ideal -log B) and OE = sum of p log p over off-diagonal blocks / (M (M - 1)) (ideal -2 log B).
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

from pretrain.losses.monitors import block_mutual_information, entropy

__all__ = [
    "as_blocks",
    "joint_matrix",
    "pairwise_mutual_information",
    "joint_summary",
]

# elements per chunk when walking the D x D matrix block-row by block-row (~64 MB of fp32)
_CHUNK_ELEMS = 1 << 24


def as_blocks(joint: torch.Tensor, bin_size: int) -> torch.Tensor:
    """View a D x D matrix as (M, M, B, B) blocks; block [m1, m2] = joint[m1*B:(m1+1)*B, m2*B:...].

    Args:
        joint: (D, D) matrix, D divisible by ``bin_size``.
        bin_size: B.

    Returns:
        A (non-contiguous) view of shape (M, M, B, B).
    """
    d = joint.shape[0]
    if joint.dim() != 2 or joint.shape[1] != d or d % bin_size:
        raise ValueError(
            f"joint must be square with side divisible by bin_size={bin_size}, got "
            f"{tuple(joint.shape)}"
        )
    m = d // bin_size
    return joint.reshape(m, bin_size, m, bin_size).permute(0, 2, 1, 3)


def joint_matrix(q1: torch.Tensor, q2: torch.Tensor | None = None) -> torch.Tensor:
    """One-shot empirical cross-joint probability matrix P = q1^T q2 / N in fp32.

    Args:
        q1: codes (N, D) or (N, M, B).
        q2: codes of the second view (same shape); None: the same view (P = q1^T q1 / N).

    Returns:
        (D, D) fp32 matrix.
    """
    a = q1.float().reshape(q1.shape[0], -1)
    b = a if q2 is None else q2.float().reshape(q2.shape[0], -1)
    if a.shape != b.shape:
        raise ValueError(f"joint_matrix: view shapes differ {tuple(a.shape)} vs {tuple(b.shape)}")
    return a.t() @ b / a.shape[0]


def _block_rows(joint: torch.Tensor, bin_size: int) -> Iterable[tuple[int, torch.Tensor]]:
    """Yield (first row-block index, contiguous (c, M, B, B) chunk) over the block rows of P."""
    blocks = as_blocks(joint, bin_size)
    m = blocks.shape[0]
    c = max(1, _CHUNK_ELEMS // (joint.shape[0] * bin_size))
    for start in range(0, m, c):
        yield start, blocks[start : start + c].contiguous()


@torch.no_grad()
def pairwise_mutual_information(joint: torch.Tensor, bin_size: int) -> torch.Tensor:
    """Mutual information between every pair of variables from a cross-joint matrix.

    Args:
        joint: (D, D) matrix P (cross-view or same-view).
        bin_size: B.

    Returns:
        (M, M) fp32 matrix, nats. Entry [m1, m2] is the MI of block (m1, m2); the diagonal is the
        MI between the two views of one variable (its entropy for invariant one-hot codes).
    """
    out = []
    for _, chunk in _block_rows(joint.float(), bin_size):
        out.append(block_mutual_information(chunk))
    return torch.cat(out, dim=0)


@torch.no_grad()
def joint_summary(
    joint: torch.Tensor, bin_size: int, floor_joint: torch.Tensor | None = None
) -> tuple[dict, dict[str, torch.Tensor]]:
    """Summarise a cross-joint matrix: MI, diagonal-block trace, the loss's DE / OE terms.

    Args:
        joint: (D, D) matrix P.
        bin_size: B.
        floor_joint: optional independence-floor matrix (same shape).

    Returns:
        (scalars for JSON, arrays): arrays hold "mi" (M, M), "block_entropy" (M, M),
        "diag_trace" (M,) and, with a floor, "mi_floor" (M, M).
    """
    joint = joint.float()
    m = joint.shape[0] // bin_size
    mis, hs = [], []
    for _, chunk in _block_rows(joint, bin_size):
        mis.append(block_mutual_information(chunk))
        hs.append(entropy(chunk, dim=(-2, -1)))
    mi = torch.cat(mis).cpu()
    h_block = torch.cat(hs).cpu()
    diag = torch.diagonal(joint).reshape(m, bin_size)
    diag_trace = diag.sum(dim=1).cpu()
    log_b = math.log(bin_size)
    scalars: dict = {
        "num_variables": m,
        "bin_size": bin_size,
        "diag_trace_mean": float(diag_trace.mean()),
        "diag_trace_min": float(diag_trace.min()),
        "diag_entries_entropy": float(entropy(diag / diag.sum(1, keepdim=True)).mean()),
        "loss_dia_term": float(torch.special.xlogy(diag, diag).sum() / m),
        "loss_dia_ideal": -log_b,
        "crossview_mi_mean": float(torch.diagonal(mi).mean()),
    }
    arrays = {"mi": mi, "block_entropy": h_block, "diag_trace": diag_trace}
    if m > 1:
        off = ~torch.eye(m, dtype=torch.bool)
        off_mi = mi[off]
        flat = int(torch.where(off, mi, torch.full_like(mi, -1.0)).argmax())
        scalars.update(
            {
                "offblock_mi_mean": float(off_mi.mean()),
                "offblock_mi_max": float(off_mi.max()),
                "offblock_mi_max_pair": [flat // m, flat % m],
                "loss_off_term": float(-h_block[off].sum() / (m * (m - 1))),
                "loss_off_ideal": -2 * log_b,
            }
        )
        if floor_joint is not None:
            mi_floor = pairwise_mutual_information(floor_joint, bin_size).cpu()
            arrays["mi_floor"] = mi_floor
            scalars["offblock_mi_floor_mean"] = float(mi_floor[off].mean())
            scalars["offblock_mi_excess_mean"] = float((off_mi - mi_floor[off]).mean())
    return scalars, arrays

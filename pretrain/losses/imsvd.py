"""The IMSVD objective (docs/PROTOCOLS.md section 1).

Two views' projector outputs z1, z2 (N x D, D = M * B) are softly discretised: each of the M
variables becomes a categorical distribution over B units (softmax with temperature, clamped at
1e-8), giving q1, q2. The loss has three terms:

* TI (transformation invariance), on the local batch: ``-mean_{i,m} log <q1[i,m], q2[i,m]>``
  (``ti_mode="ce"``: cross-entropy ``-sum_b q1 log q2`` averaged over i and m, the TIC ablation);
* DE (diagonal entropy), on the global batch: ``sum_d p_dd log p_dd / M``;
* OE (off-block entropy), on the global batch: sum of ``p log p`` over the M(M-1) off-diagonal
  B x B blocks of ``P = q1^T q2 / N``, divided by ``M(M-1)``.

Two implementations of the joint terms give the same values and gradients:

* ``reference_imsvd_loss``: the straightforward one (materialise P and p*log p, select blocks);
  it costs several D x D buffers (1 GiB each in fp32 at D = 16320) plus autograd temporaries.
* the lean one (default): DE only needs the D diagonal entries, which are a column-wise mean of
  q1 * q2 (O(N D)). OE is evaluated by :class:`pretrain.losses.offblock.OffBlockEntropy` in row
  blocks of P, never holding more than two ``rows x D`` buffers. Because its output is a
  scalar, its gradient is also accumulated during the forward block sweep and merely scaled in
  backward, so P is computed once (no recomputation pass). With several processes each rank
  sweeps only its share of P's rows and the partial sums are all-reduced, so the per-rank cost
  falls with the world size.

All joint quantities are computed in fp32 (fp64 for fp64 inputs) with autocast disabled: under
fp16 the entries of P near 1/B^2 lose precision and the clamp value underflows to 0.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from pretrain.dist import (
    all_gather_with_grad,
    all_reduce_sum_with_grad,
    get_rank,
    get_world_size,
)
from pretrain.errors import IMSVDError
from pretrain.losses.offblock import DEFAULT_BLOCK_ELEMS, OffBlockEntropy, shard_rows

__all__ = [
    "IMSVDLoss",
    "LossConfigError",
    "reference_imsvd_loss",
    "soft_discretize",
    "off_block_entropy_sum",
    "shard_rows",
]

TI_MODES = ("inner", "ce")
IMPLS = ("auto", "lean", "reference")
CLAMP_MIN = 1e-8


class LossConfigError(IMSVDError, ValueError):
    """Invalid loss setting or input shape."""


def _check_dim(d: int, bin_size: int) -> int:
    if d % bin_size != 0:
        raise LossConfigError(
            f"projector output dimension D={d} is not divisible by bin_size={bin_size}; "
            f"choose a projector whose last size is a multiple of bin_size"
        )
    return d // bin_size


def soft_discretize(z: torch.Tensor, bin_size: int, temperature: float = 1.0) -> torch.Tensor:
    """Softmax over each group of ``bin_size`` units, clamped at 1e-8.

    Args:
        z: N x D projector output (D divisible by bin_size).
        bin_size: B, units per variable.
        temperature: softmax temperature t (softmax(z / t)).

    Returns:
        q, N x D, in fp32 (fp64 for fp64 input).
    """
    n, d = z.shape
    m = _check_dim(d, bin_size)
    z = z.to(torch.promote_types(z.dtype, torch.float32))
    q = torch.softmax(z.reshape(n, m, bin_size) / temperature, dim=-1)
    return torch.clamp(q, min=CLAMP_MIN).reshape(n, d)


def _ti_term(q1: torch.Tensor, q2: torch.Tensor, bin_size: int, mode: str) -> torch.Tensor:
    n, d = q1.shape
    q1 = q1.reshape(n, d // bin_size, bin_size)
    q2 = q2.reshape(n, d // bin_size, bin_size)
    if mode == "inner":
        return -torch.log((q1 * q2).sum(-1)).mean()
    return -(q1 * torch.log(q2)).sum(-1).mean()


def _diag_entropy_sum(q1: torch.Tensor, q2: torch.Tensor) -> torch.Tensor:
    """sum_d p_dd log p_dd with p_dd = mean_i q1[i, d] q2[i, d] (the diagonal of P)."""
    p = (q1 * q2).mean(0)
    return torch.xlogy(p, p).sum()


# ----------------------------------------------------------------------------------------------
# Reference (straightforward) formulation
# ----------------------------------------------------------------------------------------------


def reference_imsvd_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    bin_size: int = 80,
    temperature: float = 1.0,
    ti_coeff: float = 1.0,
    dia_coeff: float = 1.0,
    off_coeff: float = 1.0,
    ti_mode: str = "inner",
) -> Dict[str, torch.Tensor]:
    """The straightforward IMSVD loss: materialise P = q1^T q2 / N and p*log p, select blocks.

    This is the baseline the lean implementation is tested and benchmarked against. With a process
    group the joint terms use the batch gathered across ranks (with gradient), as in
    :class:`IMSVDLoss`.

    Args:
        z1, z2: N x D projector outputs of the two views.
        bin_size, temperature, ti_coeff, dia_coeff, off_coeff, ti_mode: as in :class:`IMSVDLoss`.

    Returns:
        Dict with scalar tensors "loss", "loss_ti", "loss_dia", "loss_off".
    """
    _check_settings(ti_mode, "reference")
    with torch.autocast(device_type=z1.device.type, enabled=False):
        q1 = soft_discretize(z1, bin_size, temperature)
        q2 = soft_discretize(z2, bin_size, temperature)
        m = q1.shape[1] // bin_size
        zero = q1.new_zeros(())
        loss_ti = ti_coeff * _ti_term(q1, q2, bin_size, ti_mode) if ti_coeff else zero
        loss_dia, loss_off = zero, zero
        if dia_coeff or off_coeff:
            g1, g2 = all_gather_with_grad(q1), all_gather_with_grad(q2)
            joint = g1.t() @ g2 / g1.shape[0]
            plogp = joint * torch.log(joint)
            if dia_coeff:
                loss_dia = dia_coeff * torch.diagonal(plogp).sum() / m
            if off_coeff:
                _check_off_blocks(m)
                # (M, M, B, B): block (m1, m2); keep the blocks with m1 != m2.
                blocks = plogp.reshape(m, bin_size, m, bin_size).permute(0, 2, 1, 3)
                off_mask = ~torch.eye(m, dtype=torch.bool, device=plogp.device)
                loss_off = off_coeff * blocks[off_mask].sum() / (m * (m - 1))
    return {
        "loss": loss_ti + loss_dia + loss_off,
        "loss_ti": loss_ti,
        "loss_dia": loss_dia,
        "loss_off": loss_off,
    }


# ----------------------------------------------------------------------------------------------
# Lean off-block entropy
# ----------------------------------------------------------------------------------------------


def off_block_entropy_sum(
    q1: torch.Tensor,
    q2: torch.Tensor,
    bin_size: int,
    rows: Optional[Tuple[int, int]] = None,
    block_elems: int = DEFAULT_BLOCK_ELEMS,
) -> torch.Tensor:
    """Sum of p log p over the off-diagonal blocks of P = q1^T q2 / N, without materialising P.

    Args:
        q1, q2: N x D soft-discretised views (entries > 0).
        bin_size: B.
        rows: optional (start, stop) row range of P (multiples of bin_size) to restrict the sum
            to; used to shard the sweep across ranks. Default: all rows.
        block_elems: elements per row-block buffer (memory/speed trade-off).

    Returns:
        Scalar tensor (differentiable w.r.t. q1 and q2; first order only).
    """
    n, d = q1.shape
    if q2.shape != q1.shape:
        raise LossConfigError(f"q1 and q2 shapes differ: {tuple(q1.shape)} vs {tuple(q2.shape)}")
    _check_dim(d, bin_size)
    start, stop = rows if rows is not None else (0, d)
    if not (0 <= start <= stop <= d and start % bin_size == 0 and stop % bin_size == 0):
        raise LossConfigError(
            f"rows={rows} must be a range within [0, {d}] on multiples of bin_size={bin_size}"
        )
    want_grad = torch.is_grad_enabled() and (q1.requires_grad or q2.requires_grad)
    return OffBlockEntropy.apply(q1, q2, bin_size, start, stop, block_elems, want_grad)


# ----------------------------------------------------------------------------------------------
# Module
# ----------------------------------------------------------------------------------------------


def _check_settings(ti_mode: str, impl: str) -> None:
    if ti_mode not in TI_MODES:
        raise LossConfigError(f"ti_mode={ti_mode!r} is not one of {TI_MODES}")
    if impl not in IMPLS:
        raise LossConfigError(f"impl={impl!r} is not one of {IMPLS}")


def _check_off_blocks(m: int) -> None:
    if m < 2:
        raise LossConfigError(
            f"the off-block term needs at least 2 variables (D / bin_size = {m}); "
            f"set off_coeff=0 or use a larger projector output"
        )


class IMSVDLoss(nn.Module):
    """IMSVD loss module (docs/PROTOCOLS.md section 1).

    Args:
        bin_size: B, units per variable (D must be a multiple).
        temperature: softmax temperature t.
        ti_coeff, dia_coeff, off_coeff: term weights; 0 disables the term and skips its compute.
        ti_mode: "inner" (TI, default) or "ce" (TIC ablation).
        impl: "auto"/"lean" (blockwise, never materialises P) or "reference" (straightforward).
        shard: with several processes and the lean implementation, let each rank compute only
            its share of P's rows (the result is identical; the per-rank cost falls with the
            world size).
        block_elems: elements per row-block buffer of the lean sweep.

    forward(z1, z2) takes the projector outputs (N x D, the local batch) and returns a dict of
    scalar tensors "loss", "loss_ti", "loss_dia", "loss_off" (fp32 whatever the autocast dtype).
    """

    def __init__(
        self,
        bin_size: int = 80,
        temperature: float = 1.0,
        ti_coeff: float = 1.0,
        dia_coeff: float = 1.0,
        off_coeff: float = 1.0,
        ti_mode: str = "inner",
        impl: str = "auto",
        shard: bool = True,
        block_elems: int = DEFAULT_BLOCK_ELEMS,
    ) -> None:
        super().__init__()
        _check_settings(ti_mode, impl)
        if int(bin_size) != bin_size or bin_size < 1:
            raise LossConfigError(f"bin_size={bin_size!r} must be a positive integer")
        if not temperature > 0:
            raise LossConfigError(f"temperature={temperature!r} must be > 0")
        for name, value in (
            ("ti_coeff", ti_coeff),
            ("dia_coeff", dia_coeff),
            ("off_coeff", off_coeff),
        ):
            if not math.isfinite(value):
                raise LossConfigError(f"{name}={value!r} must be a finite number")
        self.bin_size = int(bin_size)
        self.temperature = float(temperature)
        self.ti_coeff = float(ti_coeff)
        self.dia_coeff = float(dia_coeff)
        self.off_coeff = float(off_coeff)
        self.ti_mode = ti_mode
        self.impl = "lean" if impl == "auto" else impl
        self.shard = bool(shard)
        self.block_elems = int(block_elems)

    def extra_repr(self) -> str:
        return (
            f"bin_size={self.bin_size}, temperature={self.temperature}, "
            f"ti_coeff={self.ti_coeff}, dia_coeff={self.dia_coeff}, off_coeff={self.off_coeff}, "
            f"ti_mode={self.ti_mode!r}, impl={self.impl!r}, shard={self.shard}"
        )

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Compute the loss terms.

        Args:
            z1, z2: N x D projector outputs of the two views (local batch).

        Returns:
            Dict of scalar tensors "loss", "loss_ti", "loss_dia", "loss_off".
        """
        if z1.dim() != 2 or z1.shape != z2.shape:
            raise LossConfigError(
                f"expected two N x D tensors of the same shape, got {tuple(z1.shape)} and "
                f"{tuple(z2.shape)}"
            )
        m = _check_dim(z1.shape[1], self.bin_size)
        if self.off_coeff:
            _check_off_blocks(m)
        if self.impl == "reference":
            return reference_imsvd_loss(
                z1,
                z2,
                self.bin_size,
                self.temperature,
                self.ti_coeff,
                self.dia_coeff,
                self.off_coeff,
                self.ti_mode,
            )
        with torch.autocast(device_type=z1.device.type, enabled=False):
            return self._lean(z1, z2, m)

    def _lean(self, z1: torch.Tensor, z2: torch.Tensor, m: int) -> Dict[str, torch.Tensor]:
        b = self.bin_size
        q1 = soft_discretize(z1, b, self.temperature)
        q2 = soft_discretize(z2, b, self.temperature)
        zero = q1.new_zeros(())
        loss_ti = self.ti_coeff * _ti_term(q1, q2, b, self.ti_mode) if self.ti_coeff else zero
        loss_dia, loss_off = zero, zero
        if self.dia_coeff or self.off_coeff:
            g1, g2 = all_gather_with_grad(q1), all_gather_with_grad(q2)
            if self.dia_coeff:
                loss_dia = self.dia_coeff * _diag_entropy_sum(g1, g2) / m
            if self.off_coeff:
                world = get_world_size()
                if world > 1 and self.shard:
                    rows = shard_rows(g1.shape[1], b, get_rank(), world)
                    partial = off_block_entropy_sum(g1, g2, b, rows, self.block_elems)
                    off_sum = all_reduce_sum_with_grad(partial)
                else:
                    off_sum = off_block_entropy_sum(g1, g2, b, None, self.block_elems)
                loss_off = self.off_coeff * off_sum / (m * (m - 1))
        return {
            "loss": loss_ti + loss_dia + loss_off,
            "loss_ti": loss_ti,
            "loss_dia": loss_dia,
            "loss_off": loss_off,
        }

"""Barlow Twins (Zbontar et al., ICML 2021), a baseline the IMSVD paper compares with, in the
same trainer: the cross-correlation matrix of the two views' batch-normalised embeddings is
pushed towards the identity, off-diagonal entries weighted by lambda = 0.0051 (the paper's value;
docs/PROTOCOLS.md section 6).

As in the paper's public code, the normalisation and the correlation use the GLOBAL batch, from
an all-gather with gradient (:func:`pretrain.dist.all_gather_with_grad`), so a run on W processes
with DDP's gradient averaging takes the same step as one process with the whole batch. Every
statistic is computed in fp32 (fp64 for fp64 inputs) with autocast disabled.
"""

from __future__ import annotations

from typing import Dict

import torch
from torch import nn

from pretrain.dist import all_gather_with_grad
from pretrain.losses.common import check_coeff, check_pair, off_diagonal, promote_fp32

__all__ = ["BarlowTwinsLoss"]


class BarlowTwinsLoss(nn.Module):
    """Barlow Twins loss.

    Args:
        lambd: weight of the redundancy-reduction (off-diagonal) term (paper 0.0051).
        eps: BatchNorm epsilon of the normalisation before the correlation (1e-5, as
            ``nn.BatchNorm1d(affine=False)`` in the paper's code).

    forward(z1, z2) takes the two views' projector outputs (N x D, local batch), normalises each
    dimension over the global batch (biased variance, as batch norm in training mode), forms
    c = BN(z1)^T BN(z2) / N_g (D x D) and returns scalar tensors "loss", "loss_on" =
    sum_i (1 - c_ii)^2 and "loss_off" = lambd * sum_{i != j} c_ij^2.
    """

    def __init__(self, lambd: float = 0.0051, eps: float = 1e-5) -> None:
        super().__init__()
        self.lambd = check_coeff("lambd", lambd)
        self.eps = float(eps)

    def extra_repr(self) -> str:
        return f"lambd={self.lambd}"

    def _normalise(self, z: torch.Tensor) -> torch.Tensor:
        mean = z.mean(dim=0)
        var = z.var(dim=0, unbiased=False)
        return (z - mean) / torch.sqrt(var + self.eps)

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> Dict[str, torch.Tensor]:
        check_pair(z1, z2, "BarlowTwinsLoss")
        with torch.autocast(device_type=z1.device.type, enabled=False):
            g1 = all_gather_with_grad(promote_fp32(z1))
            g2 = all_gather_with_grad(promote_fp32(z2))
            n = g1.shape[0]
            if n < 2:
                raise ValueError("BarlowTwinsLoss needs a global batch of at least 2 samples")
            c = self._normalise(g1).T @ self._normalise(g2) / n
            loss_on = (torch.diagonal(c) - 1).pow(2).sum()
            loss_off = self.lambd * off_diagonal(c).pow(2).sum()
        return {"loss": loss_on + loss_off, "loss_on": loss_on, "loss_off": loss_off}

"""VICReg (Bardes et al., ICLR 2022), a baseline the IMSVD paper compares with, in the same
trainer: invariance (MSE of the two views), variance (hinge on each dimension's standard
deviation) and covariance (squared off-diagonal entries of each view's covariance matrix) terms,
weighted 25 / 25 / 1 (the paper's values; docs/PROTOCOLS.md section 6).

As in the paper's public code, the invariance term uses the local batch, the variance and
covariance the GLOBAL batch, from an all-gather with gradient
(:func:`pretrain.dist.all_gather_with_grad`), so a run on W processes with DDP's gradient
averaging takes the same step as one process with the whole batch. Every statistic is computed
in fp32 (fp64 for fp64 inputs) with autocast disabled, whatever precision the backbone ran in.
"""

from __future__ import annotations

from typing import Dict

import torch
from torch import nn
from torch.nn import functional as F

from pretrain.dist import all_gather_with_grad
from pretrain.losses.common import check_coeff, check_pair, off_diagonal, promote_fp32

__all__ = ["VICRegLoss"]


class VICRegLoss(nn.Module):
    """VICReg loss.

    Args:
        sim_coeff: weight of the invariance term (MSE between the views; paper 25).
        std_coeff: weight of the variance term (paper 25).
        cov_coeff: weight of the covariance term (paper 1).
        eps: added to the variance before the square root (paper 1e-4).

    forward(z1, z2) takes the two views' projector outputs (N x D, local batch; the variance and
    covariance use the global batch, N_g >= 2) and returns scalar tensors "loss", "loss_inv",
    "loss_var", "loss_cov" (already weighted; "loss" is their sum).
    """

    def __init__(
        self,
        sim_coeff: float = 25.0,
        std_coeff: float = 25.0,
        cov_coeff: float = 1.0,
        eps: float = 1e-4,
    ) -> None:
        super().__init__()
        self.sim_coeff = check_coeff("sim_coeff", sim_coeff)
        self.std_coeff = check_coeff("std_coeff", std_coeff)
        self.cov_coeff = check_coeff("cov_coeff", cov_coeff)
        self.eps = float(eps)

    def extra_repr(self) -> str:
        return f"sim_coeff={self.sim_coeff}, std_coeff={self.std_coeff}, cov_coeff={self.cov_coeff}"

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> Dict[str, torch.Tensor]:
        check_pair(z1, z2, "VICRegLoss")
        with torch.autocast(device_type=z1.device.type, enabled=False):
            z1, z2 = promote_fp32(z1), promote_fp32(z2)
            inv = F.mse_loss(z1, z2)
            g1, g2 = all_gather_with_grad(z1), all_gather_with_grad(z2)
            n, d = g1.shape
            if n < 2:
                raise ValueError("VICRegLoss needs a global batch of at least 2 samples")
            g1 = g1 - g1.mean(dim=0)
            g2 = g2 - g2.mean(dim=0)
            std1 = torch.sqrt(g1.var(dim=0) + self.eps)
            std2 = torch.sqrt(g2.var(dim=0) + self.eps)
            var = F.relu(1 - std1).mean() / 2 + F.relu(1 - std2).mean() / 2
            cov1 = (g1.T @ g1) / (n - 1)
            cov2 = (g2.T @ g2) / (n - 1)
            cov = off_diagonal(cov1).pow(2).sum() / d + off_diagonal(cov2).pow(2).sum() / d
            loss_inv = self.sim_coeff * inv
            loss_var = self.std_coeff * var
            loss_cov = self.cov_coeff * cov
        return {
            "loss": loss_inv + loss_var + loss_cov,
            "loss_inv": loss_inv,
            "loss_var": loss_var,
            "loss_cov": loss_cov,
        }

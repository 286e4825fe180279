"""The non-contrastive baselines the IMSVD paper compares with, in the same trainer.

* :class:`VICRegLoss` (Bardes et al., ICLR 2022): invariance (MSE of the two views), variance
  (hinge on each dimension's standard deviation) and covariance (squared off-diagonal entries of
  each view's covariance matrix) terms, weighted 25 / 25 / 1.
* :class:`BarlowTwinsLoss` (Zbontar et al., ICML 2021): the cross-correlation matrix of the two
  views' batch-normalised embeddings is pushed towards the identity, off-diagonal entries
  weighted by lambda = 0.0051.

Both follow the papers' public code in what is computed over which batch: VICReg's invariance
term uses the local batch, its variance and covariance the GLOBAL batch; Barlow Twins normalises
and correlates over the global batch. Global statistics come from an all-gather with gradient
(:func:`pretrain.dist.all_gather_with_grad`), so a run on W processes with DDP's gradient
averaging takes the same step as one process with the whole batch. Every statistic is computed
in fp32 (fp64 for fp64 inputs) with autocast disabled, whatever precision the backbone ran in.
The defaults are the papers' values (docs/PROTOCOLS.md section 6).
"""

from __future__ import annotations

import math
from typing import Dict

import torch
from torch import nn
from torch.nn import functional as F

from pretrain.dist import all_gather_with_grad

__all__ = ["VICRegLoss", "BarlowTwinsLoss", "off_diagonal"]


def _check_pair(z1: torch.Tensor, z2: torch.Tensor, name: str) -> None:
    if z1.dim() != 2 or z1.shape != z2.shape:
        raise ValueError(
            f"{name}: expected two N x D tensors of the same shape, got {tuple(z1.shape)} and "
            f"{tuple(z2.shape)}"
        )


def _check_coeff(name: str, value: float) -> float:
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}={value!r} must be a finite number >= 0")
    return float(value)


def off_diagonal(x: torch.Tensor) -> torch.Tensor:
    """The off-diagonal entries of a square matrix as a flat vector (length n * (n - 1))."""
    n, m = x.shape
    if n != m:
        raise ValueError(f"off_diagonal expects a square matrix, got {tuple(x.shape)}")
    return x.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


def _fp32(z: torch.Tensor) -> torch.Tensor:
    return z.to(torch.promote_types(z.dtype, torch.float32))


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
        self.sim_coeff = _check_coeff("sim_coeff", sim_coeff)
        self.std_coeff = _check_coeff("std_coeff", std_coeff)
        self.cov_coeff = _check_coeff("cov_coeff", cov_coeff)
        self.eps = float(eps)

    def extra_repr(self) -> str:
        return f"sim_coeff={self.sim_coeff}, std_coeff={self.std_coeff}, cov_coeff={self.cov_coeff}"

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> Dict[str, torch.Tensor]:
        _check_pair(z1, z2, "VICRegLoss")
        with torch.autocast(device_type=z1.device.type, enabled=False):
            z1, z2 = _fp32(z1), _fp32(z2)
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
        self.lambd = _check_coeff("lambd", lambd)
        self.eps = float(eps)

    def extra_repr(self) -> str:
        return f"lambd={self.lambd}"

    def _normalise(self, z: torch.Tensor) -> torch.Tensor:
        mean = z.mean(dim=0)
        var = z.var(dim=0, unbiased=False)
        return (z - mean) / torch.sqrt(var + self.eps)

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> Dict[str, torch.Tensor]:
        _check_pair(z1, z2, "BarlowTwinsLoss")
        with torch.autocast(device_type=z1.device.type, enabled=False):
            g1 = all_gather_with_grad(_fp32(z1))
            g2 = all_gather_with_grad(_fp32(z2))
            n = g1.shape[0]
            if n < 2:
                raise ValueError("BarlowTwinsLoss needs a global batch of at least 2 samples")
            c = self._normalise(g1).T @ self._normalise(g2) / n
            loss_on = (torch.diagonal(c) - 1).pow(2).sum()
            loss_off = self.lambd * off_diagonal(c).pow(2).sum()
        return {"loss": loss_on + loss_off, "loss_on": loss_on, "loss_off": loss_off}

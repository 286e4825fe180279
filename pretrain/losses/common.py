"""What the baseline losses share: their input checks, the off-diagonal entries of a square
matrix, the fp32 promotion of their statistics.
"""

from __future__ import annotations

import math

import torch

__all__ = ["check_pair", "check_coeff", "off_diagonal", "promote_fp32"]


def check_pair(z1: torch.Tensor, z2: torch.Tensor, name: str) -> None:
    """Raise ValueError unless ``z1`` and ``z2`` are two N x D tensors of the same shape."""
    if z1.dim() != 2 or z1.shape != z2.shape:
        raise ValueError(
            f"{name}: expected two N x D tensors of the same shape, got {tuple(z1.shape)} and "
            f"{tuple(z2.shape)}"
        )


def check_coeff(name: str, value: float) -> float:
    """``value`` as a float; ValueError naming ``name`` unless it is finite and >= 0."""
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}={value!r} must be a finite number >= 0")
    return float(value)


def off_diagonal(x: torch.Tensor) -> torch.Tensor:
    """The off-diagonal entries of a square matrix as a flat vector (length n * (n - 1))."""
    n, m = x.shape
    if n != m:
        raise ValueError(f"off_diagonal expects a square matrix, got {tuple(x.shape)}")
    return x.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


def promote_fp32(z: torch.Tensor) -> torch.Tensor:
    """``z`` in fp32, or in its own dtype when that is wider (fp64 stays fp64)."""
    return z.to(torch.promote_types(z.dtype, torch.float32))

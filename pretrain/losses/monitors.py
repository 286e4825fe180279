"""Statistics of the soft discrete codes, and online monitors cheap enough to log every step.

IMSVD reads the projector output ``z`` (N x D) as M = D / B discrete variables of B units each,
softly discretised by a softmax per variable (docs/PROTOCOLS.md section 1). Its theory
predicts, at the optimum, one-hot sub-vectors, uniform marginals (entropy log B) and zero
mutual information between variables. This module holds

* the batch-level primitives for those quantities (:func:`soft_codes`, :func:`onehot_rate`,
  :func:`entropy`, :func:`block_mutual_information`, :func:`argmax_agreement`), which the offline
  analysis in ``transfer/analysis/codes.py`` reuses (``pretrain`` does not import
  ``transfer``, so the shared math lives here), and
* :func:`code_monitors`, called by the training engine at each log step.

All entropies and mutual informations are in nats.
"""

from __future__ import annotations

import math

import torch

from pretrain.losses.imsvd import soft_discretize

__all__ = [
    "soft_codes",
    "onehot_rate",
    "entropy",
    "block_mutual_information",
    "argmax_agreement",
    "code_monitors",
]


def soft_codes(z: torch.Tensor, bin_size: int, temperature: float = 1.0) -> torch.Tensor:
    """Soft discretisation of the loss (per-variable softmax, clamp 1e-8), shaped (N, M, B).

    Args:
        z: projector output, shape (N, D) with D divisible by ``bin_size``.
        bin_size: units per variable (B).
        temperature: softmax temperature (the loss's ``temperature``).

    Returns:
        q of shape (N, M, B), fp32 (fp64 for fp64 input); each q[i, m, :] sums to ~1.
    """
    if z.dim() != 2:
        raise ValueError(f"soft_codes expects z of shape (N, D), got {tuple(z.shape)}")
    if bin_size <= 0 or temperature <= 0:
        raise ValueError(f"bin_size={bin_size} and temperature={temperature} must be positive")
    return soft_discretize(z, bin_size, temperature).reshape(z.shape[0], -1, bin_size)


def onehot_rate(q: torch.Tensor, threshold: float = 0.9) -> torch.Tensor:
    """Fraction of sub-vectors whose largest entry exceeds ``threshold``.

    Args:
        q: soft codes (..., B).
        threshold: e.g. 0.9 or 0.99 (the paper reports both).

    Returns:
        0-d tensor in [0, 1].
    """
    return (q.amax(dim=-1) > threshold).float().mean()


def entropy(p: torch.Tensor, dim: int | tuple[int, ...] = -1) -> torch.Tensor:
    """Shannon entropy -sum p log p (nats) along ``dim``; 0 log 0 counts as 0."""
    return -torch.special.xlogy(p, p).sum(dim=dim)


def block_mutual_information(joint: torch.Tensor) -> torch.Tensor:
    """Mutual information of B x B joint distributions, from the block alone.

    Each block is renormalised to unit mass (the eps clamp of the codes leaves it at 1 + O(B eps))
    and its own row / column sums are used as marginals, so the result is the KL divergence of the
    block from the product of its marginals: >= 0 up to rounding (clamped at 0).

    Args:
        joint: (..., B, B) non-negative blocks.

    Returns:
        (...) mutual information, nats; H(row) + H(col) - H(joint).
    """
    joint = joint.float()
    joint = joint / joint.sum(dim=(-2, -1), keepdim=True).clamp_min(1e-30)
    h_rows = entropy(joint.sum(dim=-1))
    h_cols = entropy(joint.sum(dim=-2))
    h_joint = entropy(joint, dim=(-2, -1))
    return (h_rows + h_cols - h_joint).clamp_min(0.0)


def argmax_agreement(q1: torch.Tensor, q2: torch.Tensor) -> torch.Tensor:
    """Fraction of (sample, variable) pairs whose two views pick the same unit (argmax)."""
    if q1.shape != q2.shape:
        raise ValueError(f"argmax_agreement: shapes differ {tuple(q1.shape)} vs {tuple(q2.shape)}")
    return (q1.argmax(dim=-1) == q2.argmax(dim=-1)).float().mean()


def _pair_joints(
    q1: torch.Tensor, q2: torch.Tensor, idx1: torch.Tensor, idx2: torch.Tensor
) -> torch.Tensor:
    """Cross-joint blocks P(m1, m2) = q1[:, m1]^T q2[:, m2] / N for K index pairs -> (K, B, B)."""
    return torch.einsum("nkb,nkc->kbc", q1[:, idx1], q2[:, idx2]) / q1.shape[0]


@torch.no_grad()
def _offblock_mi(q1, q2, step: int, num_pairs: int | None) -> list[torch.Tensor]:
    """[MI, MI of independent pairs] (nats, mean over the step's variable pairs) of the soft
    codes (N, M, B) of the two views (see :func:`code_monitors`)."""
    n, m = q1.shape[0], q1.shape[1]
    shift = 1 + int(step) % (m - 1)
    idx1 = torch.arange(m, device=q1.device)
    if num_pairs is not None:
        idx1 = idx1[: max(1, int(num_pairs))]
    idx2 = (idx1 + shift) % m
    mi = block_mutual_information(_pair_joints(q1, q2, idx1, idx2)).mean()
    # rolling view 2 by one sample pairs each sample with another one: independent pairs
    q2_shuffled = q2.roll(1, dims=0) if n > 1 else q2
    return [mi, block_mutual_information(_pair_joints(q1, q2_shuffled, idx1, idx2)).mean()]


def code_monitors(
    z1: torch.Tensor,
    z2: torch.Tensor,
    bin_size: int,
    temperature: float = 1.0,
    step: int = 0,
    num_pairs: int | None = None,
) -> dict[str, float]:
    """Batch statistics of the discrete codes for the metrics log (cheap: no D x D matrix).

    The off-block mutual information is estimated on M variable pairs (m, (m + s) mod M), one per
    variable, with the shift s = 1 + step mod (M - 1): successive log steps cycle through every
    off-diagonal pair, deterministically and without random state. Cost: O(N * M * B^2) versus the
    loss's O(N * D^2), i.e. a factor M smaller than the loss's joint matrix.

    A plug-in MI estimate from N samples is biased upwards (strongly so once codes are near
    one-hot and N < B^2), so ``mon/offblock_mi_floor`` gives the same estimate with the second view
    shifted by one sample in the batch, which makes the pairs independent: the gap between the
    two is the dependence that the batch can resolve.

    Args:
        z1: detached projector output of view 1, (N, D) (local batch; any dtype).
        z2: the same for view 2.
        bin_size: units per variable (the loss's ``bin_size``).
        temperature: the loss's softmax temperature.
        step: global step; selects the variable pairs.
        num_pairs: use only the first ``num_pairs`` of the M pairs (None: all M).

    Returns:
        Floats keyed "mon/onehot_0.9", "mon/onehot_0.99" (both views), "mon/marginal_entropy"
        (mean over variables and views, nats), "mon/marginal_entropy_ratio" (that / log B),
        "mon/agreement" (argmax equal across views), and, when M > 1, "mon/offblock_mi" and
        "mon/offblock_mi_floor" (mean over the sampled pairs, nats).
    """
    if z1.shape != z2.shape:
        raise ValueError(f"code_monitors: z1 {tuple(z1.shape)} and z2 {tuple(z2.shape)} differ")
    q1 = soft_codes(z1.detach(), bin_size, temperature)
    q2 = soft_codes(z2.detach(), bin_size, temperature)
    # one max() per view serves the one-hot rates and the agreement (no stacked copy of q)
    max1, arg1 = q1.max(dim=-1)
    max2, arg2 = q2.max(dim=-1)
    h_marg = 0.5 * (entropy(q1.mean(dim=0)).mean() + entropy(q2.mean(dim=0)).mean())
    stats = [
        0.5 * ((max1 > 0.9).float().mean() + (max2 > 0.9).float().mean()),
        0.5 * ((max1 > 0.99).float().mean() + (max2 > 0.99).float().mean()),
        h_marg,
        h_marg / math.log(bin_size),
        (arg1 == arg2).float().mean(),
    ]
    keys = ["mon/onehot_0.9", "mon/onehot_0.99", "mon/marginal_entropy"]
    keys += ["mon/marginal_entropy_ratio", "mon/agreement"]
    if q1.shape[1] > 1:
        stats += _offblock_mi(q1, q2, step, num_pairs)
        keys += ["mon/offblock_mi", "mon/offblock_mi_floor"]
    values = torch.stack(stats).tolist()  # one device sync for all metrics
    return dict(zip(keys, values))

"""Dataset-level statistics of IMSVD's discrete codes (pure torch, no plotting).

The paper's claims about a trained model (Sec. III-E, V-C) are statements about these numbers:

* sub-vectors are one-hot: :class:`CodeStatsAccumulator` counts sub-vectors whose max exceeds
  0.9 / 0.99 (paper, ImageNet: 91.18% / 81.25%);
* every variable is uniform over its B units: marginal entropy per variable vs log B;
* variables are independent: the empirical cross-joint matrix P = sum_i q1_i^T q2_i / N
  (:class:`JointAccumulator`, fp32, streamed) has uniform off-diagonal blocks, i.e. zero pairwise
  mutual information (:func:`transfer.analysis.joint.pairwise_mutual_information`);
* codes are transformation invariant: each diagonal block of P puts its mass on its diagonal
  (``diag_trace``), and both views pick the same unit (argmax agreement).

What P says (MI, diagonal-block trace, the loss's DE / OE terms) is read by
:mod:`transfer.analysis.joint`; :func:`summarize` joins it to the single-view statistics.

Plug-in MI from N samples is biased upwards (by roughly (B - 1)^2 / (2N) nats for hard codes), so
the accumulator also streams a "floor" matrix pairing view 1 of each sample with view 2 of the
previous sample: its MI is what independent variables with the same marginals would show.

Batch-level primitives live in :mod:`pretrain.losses.monitors` and are re-exported here.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch
from torch import nn

from pretrain.losses.monitors import (
    argmax_agreement,
    block_mutual_information,
    entropy,
    onehot_rate,
    soft_codes,
)
from transfer.analysis.joint import joint_summary

__all__ = [
    "soft_codes",
    "onehot_rate",
    "entropy",
    "block_mutual_information",
    "argmax_agreement",
    "CodeStatsAccumulator",
    "JointAccumulator",
    "UnitExemplars",
    "summarize",
]


def _as_codes(q: torch.Tensor, bin_size: int) -> torch.Tensor:
    """Accept (N, D) or (N, M, B) codes; return (N, M, B) fp32."""
    if q.dim() == 2:
        if q.shape[1] % bin_size:
            raise ValueError(f"code width {q.shape[1]} is not a multiple of bin_size={bin_size}")
        q = q.reshape(q.shape[0], -1, bin_size)
    if q.dim() != 3 or q.shape[2] != bin_size:
        raise ValueError(f"codes must be (N, M, {bin_size}) or (N, D), got {tuple(q.shape)}")
    return q.float()


class CodeStatsAccumulator:
    """Streaming single-view statistics: soft/hard marginals and one-hot counts per variable.

    Args:
        num_variables: M.
        bin_size: B.
        thresholds: one-hot thresholds on the sub-vector max.
        device: where the (small, M x B) accumulators live.
    """

    def __init__(
        self,
        num_variables: int,
        bin_size: int,
        thresholds: Sequence[float] = (0.9, 0.99),
        device: torch.device | str = "cpu",
    ) -> None:
        self.num_variables = int(num_variables)
        self.bin_size = int(bin_size)
        self.thresholds = tuple(float(t) for t in thresholds)
        self.count = 0
        self.sum_q = torch.zeros(num_variables, bin_size, dtype=torch.float64, device=device)
        self.hard_counts = torch.zeros(num_variables, bin_size, dtype=torch.float64, device=device)
        self.onehot_counts = torch.zeros(
            len(self.thresholds), num_variables, dtype=torch.float64, device=device
        )

    @torch.no_grad()
    def update(self, q: torch.Tensor) -> None:
        """Add a batch of codes (N, M, B) or (N, D)."""
        q = _as_codes(q, self.bin_size)
        if q.shape[1] != self.num_variables:
            raise ValueError(f"expected {self.num_variables} variables, got {q.shape[1]}")
        q = q.to(self.sum_q.device)
        self.count += q.shape[0]
        # per-batch sums in fp32, running totals in fp64: no drift over millions of images
        self.sum_q += q.sum(dim=0).double()
        self.hard_counts += torch.nn.functional.one_hot(q.argmax(dim=-1), self.bin_size).sum(0)
        qmax = q.amax(dim=-1)
        for k, t in enumerate(self.thresholds):
            self.onehot_counts[k] += (qmax > t).sum(dim=0)

    @property
    def marginals(self) -> torch.Tensor:
        """Soft marginal p(m, d) = mean_i q_i(m, d), shape (M, B), fp32."""
        return (self.sum_q / max(self.count, 1)).float()

    @property
    def hard_marginals(self) -> torch.Tensor:
        """Share of samples whose argmax is unit d of variable m, shape (M, B)."""
        return (self.hard_counts / max(self.count, 1)).float()

    def onehot_rates(self) -> dict[float, float]:
        """Threshold -> fraction of all sub-vectors whose max exceeds it."""
        total = max(self.count * self.num_variables, 1)
        return {
            t: float(self.onehot_counts[k].sum() / total) for k, t in enumerate(self.thresholds)
        }

    def summary(self) -> dict:
        """JSON-ready scalars plus per-variable lists (entropies in nats)."""
        log_b = math.log(self.bin_size)
        h_soft = entropy(self.marginals)
        h_hard = entropy(self.hard_marginals)
        out: dict = {"num_images": self.count}
        for t, rate in self.onehot_rates().items():
            out[f"onehot_{t:g}"] = rate
        out.update(
            {
                "log_bin_size": log_b,
                "marginal_entropy_mean": float(h_soft.mean()),
                "marginal_entropy_min": float(h_soft.min()),
                "marginal_entropy_max": float(h_soft.max()),
                "marginal_entropy_ratio": float(h_soft.mean() / log_b),
                "hard_marginal_entropy_mean": float(h_hard.mean()),
                "active_units_mean": float((self.hard_counts > 0).sum(dim=1).float().mean()),
                "marginal_entropy_per_variable": [round(float(h), 5) for h in h_soft],
                "hard_marginal_entropy_per_variable": [round(float(h), 5) for h in h_hard],
            }
        )
        return out


class JointAccumulator:
    """Streams P = sum_i q1_i^T q2_i / N (D x D, fp32) without holding the embeddings.

    Also streams the independence "floor" matrix (view 1 of sample i with view 2 of sample i - 1
    across batches; the first sample pairs with the last of its batch) and, when two distinct
    views are given, the argmax agreement. The floor assumes samples arrive in random order:
    streaming a class-sorted folder in order pairs images of the same class, which are not
    independent (the analysis CLI shuffles).

    Args:
        dim: D.
        bin_size: B.
        device: where the D x D accumulators live (4 D^2 bytes each: 266 MB at D = 8160).
        floor: also accumulate the floor matrix (doubles memory and matmul cost).
    """

    def __init__(
        self, dim: int, bin_size: int, device: torch.device | str = "cpu", floor: bool = True
    ) -> None:
        if dim % bin_size:
            raise ValueError(f"dim {dim} is not a multiple of bin_size={bin_size}")
        self.dim = int(dim)
        self.bin_size = int(bin_size)
        self.count = 0
        self.sum = torch.zeros(dim, dim, dtype=torch.float32, device=device)
        self.floor_sum = torch.zeros_like(self.sum) if floor else None
        self._prev_q2: torch.Tensor | None = None
        self._agree = 0.0
        self._agree_count = 0

    @torch.no_grad()
    def update(self, q1: torch.Tensor, q2: torch.Tensor | None = None) -> None:
        """Add a batch: codes of view 1 and view 2 ((N, M, B) or (N, D)); q2=None: same view."""
        a = _as_codes(q1, self.bin_size).to(self.sum.device)
        b = a if q2 is None else _as_codes(q2, self.bin_size).to(self.sum.device)
        if a.shape != b.shape or a.shape[1] * a.shape[2] != self.dim:
            raise ValueError(
                f"JointAccumulator(dim={self.dim}): got views {tuple(a.shape)} / {tuple(b.shape)}"
            )
        n = a.shape[0]
        if n == 0:
            return
        if q2 is not None:
            self._agree += float(argmax_agreement(a, b)) * n
            self._agree_count += n
        a2, b2 = a.reshape(n, -1), b.reshape(n, -1)
        self.sum.addmm_(a2.t(), b2)
        if self.floor_sum is not None:
            prev = b2[-1:] if self._prev_q2 is None else self._prev_q2
            shifted = torch.cat([prev, b2[:-1]], dim=0)
            self.floor_sum.addmm_(a2.t(), shifted)
            self._prev_q2 = b2[-1:].clone()
        self.count += n

    def joint(self) -> torch.Tensor:
        """The empirical cross-joint probability matrix P (D x D, fp32)."""
        if self.count == 0:
            raise ValueError("JointAccumulator is empty: no samples were added")
        return self.sum / self.count

    def floor_joint(self) -> torch.Tensor | None:
        """The independence-floor matrix, or None when not accumulated / fewer than 2 samples."""
        if self.floor_sum is None or self.count < 2:
            return None
        return self.floor_sum / self.count

    @property
    def agreement(self) -> float | None:
        """Cross-view argmax agreement, or None for a single view."""
        return self._agree / self._agree_count if self._agree_count else None


class UnitExemplars:
    """Top-n images per unit of chosen variables (for exemplar grids, paper Fig. 4).

    A sample belongs to unit d of variable m when d is its argmax; within a unit, samples are
    ranked by q(m, d). Only dataset indices and scores are kept.

    Args:
        variables: variable indices to track.
        bin_size: B.
        top_n: images kept per unit.
    """

    def __init__(self, variables: Iterable[int], bin_size: int, top_n: int = 8) -> None:
        self.variables = [int(v) for v in variables]
        self.bin_size = int(bin_size)
        self.top_n = int(top_n)
        v = len(self.variables)
        self.scores = torch.full((v, bin_size, top_n), -1.0)
        self.indices = torch.full((v, bin_size, top_n), -1, dtype=torch.long)
        self.counts = torch.zeros(v, bin_size, dtype=torch.long)

    @torch.no_grad()
    def update(self, q: torch.Tensor, indices: torch.Tensor) -> None:
        """Add codes (N, M, B) of samples with dataset ``indices`` (N,)."""
        q = _as_codes(q, self.bin_size).detach().cpu()
        indices = torch.as_tensor(indices, dtype=torch.long).cpu()
        if not self.variables:
            return
        if max(self.variables) >= q.shape[1]:
            raise ValueError(f"variable {max(self.variables)} out of range (M = {q.shape[1]})")
        sub = q[:, self.variables]  # (N, V, B)
        assigned = sub.argmax(dim=-1, keepdim=True)
        mask = torch.zeros_like(sub, dtype=torch.bool).scatter_(-1, assigned, True)
        self.counts += mask.sum(dim=0)
        score = torch.where(mask, sub, torch.full_like(sub, -1.0)).permute(1, 2, 0)  # (V, B, N)
        idx = indices.view(1, 1, -1).expand_as(score)
        all_scores = torch.cat([self.scores, score], dim=-1)
        all_idx = torch.cat([self.indices, idx], dim=-1)
        k = min(self.top_n, all_scores.shape[-1])
        top, pos = all_scores.topk(k, dim=-1)
        self.scores[..., :k] = top
        self.indices[..., :k] = all_idx.gather(-1, pos)

    def top_units(self, variable: int, num_units: int) -> list[int]:
        """The ``num_units`` most populated units (local index) of a tracked variable."""
        row = self.counts[self.variables.index(variable)]
        k = min(num_units, int((row > 0).sum()))
        return row.topk(k).indices.tolist() if k else []

    def exemplars(self, variable: int, unit: int) -> list[tuple[int, float]]:
        """(dataset index, score) of the top samples of a unit, best first."""
        v = self.variables.index(variable)
        return [
            (int(i), float(s))
            for i, s in zip(self.indices[v, unit], self.scores[v, unit])
            if int(i) >= 0 and float(s) >= 0
        ]


def summarize(
    code_stats: CodeStatsAccumulator, joint_acc: JointAccumulator | None = None
) -> tuple[dict, dict[str, torch.Tensor]]:
    """Combine single-view and joint statistics into one JSON-ready dict plus arrays to save.

    Args:
        code_stats: statistics of the (clean) view.
        joint_acc: optional joint accumulator.

    Returns:
        (stats dict, arrays dict with "marginals", "hard_marginals" and the joint arrays).
    """
    stats = code_stats.summary()
    arrays: dict[str, torch.Tensor] = {
        "marginals": code_stats.marginals.cpu(),
        "hard_marginals": code_stats.hard_marginals.cpu(),
    }
    if joint_acc is not None:
        scalars, joint_arrays = joint_summary(
            joint_acc.joint(), joint_acc.bin_size, joint_acc.floor_joint()
        )
        stats.update(scalars)
        stats["agreement"] = joint_acc.agreement
        arrays.update(joint_arrays)
    return stats, arrays


@torch.no_grad()
def model_codes(model: nn.Module, x: torch.Tensor, bin_size: int, temperature: float, device):
    """Soft codes (N, M, B) of a batch of images (N, 3, H, W) through backbone + projector."""
    return soft_codes(model(x.to(device, non_blocking=True)), bin_size, temperature)

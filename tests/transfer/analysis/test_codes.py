"""Statistics of discrete codes on constructed embeddings with known answers."""

import math

import pytest
import torch
import torch.nn.functional as F

from transfer.analysis.codes import (
    CodeStatsAccumulator,
    JointAccumulator,
    UnitExemplars,
    soft_codes,
    summarize,
)
from transfer.analysis.joint import (
    as_blocks,
    joint_matrix,
    joint_summary,
    pairwise_mutual_information,
)

B = 5  # prime, so (a, b, a + b mod B) is pairwise independent over all (a, b)


def onehot_codes(*columns: torch.Tensor) -> torch.Tensor:
    """(N, M, B) exact one-hot codes from M integer columns."""
    return torch.stack([F.one_hot(c, B).float() for c in columns], dim=1)


def independent_uniform_codes() -> torch.Tensor:
    a, b = torch.meshgrid(torch.arange(B), torch.arange(B), indexing="ij")
    a, b = a.flatten(), b.flatten()
    return onehot_codes(a, b, (a + b) % B)  # every pair of columns is uniform over B x B


def test_independent_uniform_codes_have_zero_mi_and_max_entropy():
    q = independent_uniform_codes()
    stats = CodeStatsAccumulator(3, B)
    stats.update(q)
    acc = JointAccumulator(3 * B, B)
    acc.update(q, q)
    out, arrays = summarize(stats, acc)
    assert out["onehot_0.9"] == 1.0 and out["onehot_0.99"] == 1.0
    assert out["marginal_entropy_mean"] == pytest.approx(math.log(B), abs=1e-5)
    assert out["marginal_entropy_min"] == pytest.approx(math.log(B), abs=1e-5)
    assert out["offblock_mi_mean"] == pytest.approx(0.0, abs=1e-5)
    assert out["offblock_mi_max"] == pytest.approx(0.0, abs=1e-5)
    # identical views of one-hot codes: diagonal blocks are diagonal, MI(view1, view2) = H
    assert out["diag_trace_mean"] == pytest.approx(1.0, abs=1e-6)
    assert out["crossview_mi_mean"] == pytest.approx(math.log(B), abs=1e-5)
    assert out["agreement"] == 1.0
    # the loss's entropy terms reach their ideal values
    assert out["loss_dia_term"] == pytest.approx(-math.log(B), abs=1e-5)
    assert out["loss_off_term"] == pytest.approx(-2 * math.log(B), abs=1e-5)
    assert arrays["mi"].shape == (3, 3)
    # off-diagonal blocks are exactly uniform 1 / B^2
    blocks = as_blocks(acc.joint(), B)
    assert torch.allclose(blocks[0, 1], torch.full((B, B), 1 / B**2), atol=1e-7)


def test_duplicated_variables_have_mi_equal_to_entropy():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, B, (400,), generator=g)
    b = torch.randint(0, B, (400,), generator=g)
    q = onehot_codes(a, a, b)  # variable 1 duplicates variable 0
    p = F.one_hot(a, B).float().mean(0)
    h = float(-(p * p.log()).sum())
    mi = pairwise_mutual_information(joint_matrix(q), B)
    assert mi[0, 1] == pytest.approx(h, abs=1e-5)
    assert mi[1, 0] == pytest.approx(h, abs=1e-5)
    assert mi[0, 2] < 0.1 * h  # independent draws: only small finite-sample MI


def test_collapsed_codes_have_zero_entropy():
    n = 64
    q = onehot_codes(torch.full((n,), 2), torch.full((n,), 0))
    stats = CodeStatsAccumulator(2, B)
    stats.update(q)
    acc = JointAccumulator(2 * B, B)
    acc.update(q, q)
    out, _ = summarize(stats, acc)
    assert out["marginal_entropy_mean"] == pytest.approx(0.0, abs=1e-6)
    assert out["hard_marginal_entropy_mean"] == pytest.approx(0.0, abs=1e-6)
    assert out["active_units_mean"] == 1.0
    assert out["offblock_mi_mean"] == pytest.approx(0.0, abs=1e-6)


def test_uniform_soft_codes_are_not_onehot():
    q = soft_codes(torch.zeros(10, 3 * B), B)  # softmax of zeros: 1/B everywhere
    stats = CodeStatsAccumulator(3, B)
    stats.update(q)
    out = stats.summary()
    assert out["onehot_0.9"] == 0.0
    # soft marginals are uniform even though every sample is maximally uncertain
    assert out["marginal_entropy_mean"] == pytest.approx(math.log(B), abs=1e-5)


def test_streaming_equals_one_shot():
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(2, 53, 4 * B, generator=g)
    q1, q2 = soft_codes(z1, B, 0.5), soft_codes(z2, B, 0.5)
    acc = JointAccumulator(4 * B, B)
    for lo, hi in [(0, 7), (7, 8), (8, 40), (40, 53)]:  # uneven batches, one of size 1
        acc.update(q1[lo:hi], q2[lo:hi])
    assert acc.count == 53
    assert torch.allclose(acc.joint(), joint_matrix(q1, q2), atol=1e-6)
    # the floor pairs sample i with sample i - 1 (the first with the last of the first batch)
    prev = torch.cat([q2[6:7], q2[:-1]])
    assert torch.allclose(acc.floor_joint(), joint_matrix(q1, prev), atol=1e-6)
    assert acc.agreement == pytest.approx(
        float((q1.argmax(-1) == q2.argmax(-1)).float().mean()), abs=1e-6
    )
    stats = CodeStatsAccumulator(4, B)
    for lo, hi in [(0, 20), (20, 53)]:
        stats.update(q1[lo:hi])
    assert torch.allclose(stats.marginals, q1.mean(0), atol=1e-6)


def test_floor_tracks_finite_sample_bias():
    # independent random one-hot codes: measured MI is pure finite-sample bias; the floor sees it
    g = torch.Generator().manual_seed(2)
    q = onehot_codes(*torch.randint(0, B, (4, 60), generator=g))
    acc = JointAccumulator(4 * B, B)
    acc.update(q, q)
    scalars, arrays = joint_summary(acc.joint(), B, acc.floor_joint())
    assert scalars["offblock_mi_mean"] > 0.05  # biased upwards at N = 60 ...
    assert abs(scalars["offblock_mi_excess_mean"]) < 0.5 * scalars["offblock_mi_mean"]
    assert arrays["mi_floor"].shape == (4, 4)


def test_unit_exemplars_rank_assigned_samples():
    q = torch.full((6, 2, B), 0.01)
    units = [1, 1, 3, 1, 3, 0]
    conf = [0.5, 0.9, 0.8, 0.7, 0.6, 0.95]
    for i, (u, c) in enumerate(zip(units, conf)):
        q[i, 1, u] = c
        q[i, 0, 0] = 0.9
    ex = UnitExemplars([1], B, top_n=2)
    ex.update(q[:3], torch.arange(3) + 100)
    ex.update(q[3:], torch.arange(3, 6) + 100)
    assert [i for i, _ in ex.exemplars(1, 1)] == [101, 103]
    assert [i for i, _ in ex.exemplars(1, 3)] == [102, 104]
    assert ex.exemplars(1, 2) == []
    assert ex.top_units(1, 2) == [1, 3]


def test_bad_shapes_raise_clear_errors():
    with pytest.raises(ValueError, match="bin_size"):
        soft_codes(torch.zeros(2, 7), B)
    with pytest.raises(ValueError, match="dim"):
        JointAccumulator(7, B)
    with pytest.raises(ValueError, match="empty"):
        JointAccumulator(B, B).joint()

"""Online code monitors: known answers on constructed projector outputs."""

import math

import pytest
import torch
import torch.nn.functional as F

from pretrain.losses.monitors import code_monitors, soft_codes
from transfer.analysis.joint import joint_matrix, pairwise_mutual_information

B = 7


def logits(*columns: torch.Tensor, scale: float = 40.0) -> torch.Tensor:
    """Projector outputs whose soft codes are (numerically) one-hot at the given units."""
    return torch.cat([F.one_hot(c, B).float() * scale for c in columns], dim=1)


def grid_columns():
    a, b = torch.meshgrid(torch.arange(B), torch.arange(B), indexing="ij")
    a, b = a.flatten(), b.flatten()
    # (a, b, a+b, a+2b mod 7): every pair of columns is uniform over B x B (orthogonal array)
    return [a, b, (a + b) % B, (a + 2 * b) % B]


def test_keys_and_ideal_codes():
    z = logits(*grid_columns())
    for step in range(3):  # every shift: all pairs are exactly independent
        out = code_monitors(z, z.clone(), B, step=step)
        assert set(out) == {
            "mon/onehot_0.9",
            "mon/onehot_0.99",
            "mon/marginal_entropy",
            "mon/marginal_entropy_ratio",
            "mon/agreement",
            "mon/offblock_mi",
            "mon/offblock_mi_floor",
        }
        assert all(isinstance(v, float) for v in out.values())
        assert out["mon/onehot_0.99"] == 1.0
        assert out["mon/agreement"] == 1.0
        assert out["mon/marginal_entropy"] == pytest.approx(math.log(B), abs=1e-4)
        assert out["mon/marginal_entropy_ratio"] == pytest.approx(1.0, abs=1e-4)
        assert out["mon/offblock_mi"] == pytest.approx(0.0, abs=1e-4)


def test_duplicated_and_collapsed_codes():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, B, (128,), generator=g)
    out = code_monitors(logits(a, a), logits(a, a), B)
    p = torch.bincount(a, minlength=B).float() / 128
    h = float(-(p[p > 0] * p[p > 0].log()).sum())
    assert out["mon/offblock_mi"] == pytest.approx(h, abs=1e-3)  # M = 2: the pair is (0, 1)
    assert out["mon/offblock_mi_floor"] < 0.5 * h  # shifted pairing breaks the dependence
    collapsed = logits(torch.zeros(32, dtype=torch.long), torch.ones(32, dtype=torch.long))
    out = code_monitors(collapsed, collapsed, B)
    assert out["mon/marginal_entropy"] == pytest.approx(0.0, abs=1e-4)
    assert out["mon/offblock_mi"] == pytest.approx(0.0, abs=1e-4)


def test_matches_full_analysis_on_sampled_pairs():
    g = torch.Generator().manual_seed(1)
    m = 5
    z1 = torch.randn(64, m * B, generator=g) * 3
    z2 = z1 + 0.5 * torch.randn(64, m * B, generator=g)
    full = pairwise_mutual_information(joint_matrix(soft_codes(z1, B), soft_codes(z2, B)), B)
    for step in range(m - 1):
        s = 1 + step % (m - 1)
        expected = float(torch.stack([full[i, (i + s) % m] for i in range(m)]).mean())
        out = code_monitors(z1, z2, B, step=step)
        assert out["mon/offblock_mi"] == pytest.approx(expected, rel=1e-4, abs=1e-6)
    q = torch.stack([soft_codes(z1, B), soft_codes(z2, B)])
    assert out["mon/onehot_0.9"] == pytest.approx(float((q.amax(-1) > 0.9).float().mean()))


def test_single_variable_and_bad_input():
    z = torch.randn(8, B)
    out = code_monitors(z, z, B)
    assert "mon/offblock_mi" not in out and out["mon/agreement"] == 1.0
    with pytest.raises(ValueError, match="bin_size"):
        code_monitors(torch.randn(4, 10), torch.randn(4, 10), B)
    with pytest.raises(ValueError, match="differ"):
        code_monitors(torch.randn(4, B), torch.randn(5, B), B)

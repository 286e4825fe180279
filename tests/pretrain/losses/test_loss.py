"""IMSVD loss: reference vs an independent loop formulation, lean vs reference, gradcheck."""

import math

import pytest
import torch

import pretrain.losses.imsvd as loss_mod
from pretrain.losses.imsvd import (
    IMSVDLoss,
    LossConfigError,
    off_block_entropy_sum,
    reference_imsvd_loss,
    shard_rows,
    soft_discretize,
)

KEYS = ("loss", "loss_ti", "loss_dia", "loss_off")


def loop_imsvd_loss(
    z1,
    z2,
    bin_size,
    temperature=1.0,
    ti_coeff=1.0,
    dia_coeff=1.0,
    off_coeff=1.0,
    ti_mode="inner",
):
    """docs/PROTOCOLS.md section 1 with explicit loops over samples, variables and blocks."""
    z1, z2 = z1.double(), z2.double()
    n, d = z1.shape
    m = d // bin_size

    def discretize(z):
        q = torch.empty_like(z)
        for i in range(n):
            for v in range(m):
                e = torch.exp(z[i, v * bin_size : (v + 1) * bin_size] / temperature)
                q[i, v * bin_size : (v + 1) * bin_size] = torch.clamp(e / e.sum(), min=1e-8)
        return q

    q1, q2 = discretize(z1), discretize(z2)
    ti = 0.0
    for i in range(n):
        for v in range(m):
            a = q1[i, v * bin_size : (v + 1) * bin_size]
            b = q2[i, v * bin_size : (v + 1) * bin_size]
            ti = ti + (
                -math.log(float((a * b).sum()))
                if ti_mode == "inner"
                else -float((a * torch.log(b)).sum())
            )
    ti = ti / (n * m)
    dia, off = 0.0, 0.0
    for m1 in range(m):
        for m2 in range(m):
            for u in range(bin_size):
                r = m1 * bin_size + u
                for w in range(bin_size):
                    c = m2 * bin_size + w
                    p = float((q1[:, r] * q2[:, c]).sum()) / n
                    if m1 != m2:
                        off += p * math.log(p)
                    elif u == w:
                        dia += p * math.log(p)
    out = {
        "loss_ti": ti_coeff * ti,
        "loss_dia": dia_coeff * dia / m,
        "loss_off": off_coeff * off / (m * (m - 1)),
    }
    out["loss"] = out["loss_ti"] + out["loss_dia"] + out["loss_off"]
    return out


def _inputs(n, d, seed=0, scale=1.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    z1 = (scale * torch.randn(n, d, generator=g, dtype=torch.float64)).to(dtype)
    z2 = (z1.double() + 0.5 * torch.randn(n, d, generator=g, dtype=torch.float64)).to(dtype)
    return z1.requires_grad_(), z2.requires_grad_()


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"ti_mode": "ce"},
        {"temperature": 0.5, "ti_coeff": 0.7, "dia_coeff": 2.0, "off_coeff": 0.3},
        {"dia_coeff": 0.0},
    ],
)
@pytest.mark.parametrize("impl", ["reference", "lean"])
def test_matches_independent_loop_formulation(kw, impl):
    z1, z2 = _inputs(5, 12, seed=1, scale=2.0, dtype=torch.float64)
    expected = loop_imsvd_loss(z1.detach(), z2.detach(), 4, **kw)
    got = IMSVDLoss(bin_size=4, impl=impl, block_elems=24, **kw)(z1, z2)
    for k in KEYS:
        assert got[k].dtype == torch.float64
        assert got[k].item() == pytest.approx(expected[k], rel=1e-10, abs=1e-12), k


def test_gradcheck_off_block_sum_float64():
    g = torch.Generator().manual_seed(3)
    # Entries > 0 as after the clamp; several row blocks (block_elems forces 2 variables/block).
    q1 = (torch.rand(4, 15, generator=g, dtype=torch.float64) + 0.05).requires_grad_()
    q2 = (torch.rand(4, 15, generator=g, dtype=torch.float64) + 0.05).requires_grad_()
    for rows in (None, (0, 6), (6, 15), (3, 3)):
        assert torch.autograd.gradcheck(
            lambda a, b: off_block_entropy_sum(a, b, 3, rows=rows, block_elems=2 * 3 * 15),
            (q1, q2),
        )


@pytest.mark.parametrize("ti_mode", ["inner", "ce"])
def test_gradcheck_full_lean_loss_float64(ti_mode):
    z1, z2 = _inputs(3, 12, seed=4, dtype=torch.float64)
    crit = IMSVDLoss(bin_size=4, temperature=0.7, ti_mode=ti_mode, block_elems=12)
    assert torch.autograd.gradcheck(lambda a, b: crit(a, b)["loss"], (z1, z2))


def _grads(out, z1, z2):
    return torch.autograd.grad(out["loss"], (z1, z2))


@pytest.mark.parametrize(
    "n,d,b,block_elems",
    [
        (32, 800, 80, 1 << 23),
        (24, 720, 80, 2 * 80 * 720 + 5),
        (17, 96, 8, 5 * 8 * 96),
        (64, 240, 16, 1),
    ],
)
@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"ti_mode": "ce", "temperature": 0.3},
        {"ti_coeff": 0.0},
        {"dia_coeff": 0.0, "off_coeff": 2.0},
        {"off_coeff": 0.0},
        {"ti_coeff": 0.0, "dia_coeff": 0.0, "off_coeff": 1.5},
    ],
)
def test_lean_equals_reference_fp32(n, d, b, block_elems, kw):
    z1, z2 = _inputs(n, d, seed=n + d, scale=3.0)
    ref = reference_imsvd_loss(z1, z2, b, **kw)
    lean = IMSVDLoss(bin_size=b, impl="auto", block_elems=block_elems, **kw)(z1, z2)
    for k in KEYS:
        assert lean[k].dtype == torch.float32
        torch.testing.assert_close(lean[k], ref[k], rtol=1e-5, atol=1e-7, msg=k)
    for g_ref, g_lean in zip(_grads(ref, z1, z2), _grads(lean, z1, z2)):
        scale = g_ref.abs().max().item()
        torch.testing.assert_close(g_lean, g_ref, rtol=1e-5, atol=1e-5 * scale)


def test_sharded_row_partials_add_up():
    q1, q2 = (soft_discretize(z, 8) for z in _inputs(9, 64, seed=7))
    full = off_block_entropy_sum(q1, q2, 8, block_elems=8 * 64)
    g_full = torch.autograd.grad(full, (q1, q2), retain_graph=True)
    for world in (2, 3, 8, 11):
        parts = [
            off_block_entropy_sum(q1, q2, 8, rows=shard_rows(64, 8, r, world), block_elems=8 * 64)
            for r in range(world)
        ]
        total = sum(parts)
        torch.testing.assert_close(total, full, rtol=1e-6, atol=0)
        for a, b in zip(torch.autograd.grad(total, (q1, q2), retain_graph=True), g_full):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_shard_rows_partition():
    for m, world in ((102, 2), (102, 8), (3, 5), (204, 3)):
        ranges = [shard_rows(m * 80, 80, r, world) for r in range(world)]
        assert ranges[0][0] == 0 and ranges[-1][1] == m * 80
        for (a0, a1), (b0, _) in zip(ranges, ranges[1:]):
            assert a1 == b0 and a0 <= a1 and a0 % 80 == 0
        sizes = [r1 - r0 for r0, r1 in ranges]
        assert max(sizes) - min(sizes) <= 80


@pytest.mark.parametrize("impl", ["reference", "lean"])
def test_bf16_autocast_gives_fp32_without_nan(impl):
    lin = torch.nn.Linear(16, 240, bias=False)
    torch.nn.init.normal_(lin.weight, std=8.0)  # peaked softmax: tiny joint entries
    x1, x2 = torch.randn(32, 16), torch.randn(32, 16)
    crit = IMSVDLoss(bin_size=80, impl=impl)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z1, z2 = lin(x1), lin(x2)
        assert z1.dtype == torch.bfloat16
        out = crit(z1, z2)
    for k in KEYS:
        assert out[k].dtype == torch.float32 and torch.isfinite(out[k]), k
    out["loss"].backward()
    assert torch.isfinite(lin.weight.grad).all()
    # Same numbers as an fp32 evaluation of the same bf16 projector outputs.
    ref = crit(z1.detach().float(), z2.detach().float())
    for k in KEYS:
        torch.testing.assert_close(out[k].detach(), ref[k], rtol=1e-6, atol=0)


def test_zero_coefficient_skips_joint_compute(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("off-block term computed although off_coeff=0")

    monkeypatch.setattr(loss_mod, "off_block_entropy_sum", boom)
    z1, z2 = _inputs(4, 16)
    out = IMSVDLoss(bin_size=8, off_coeff=0.0)(z1, z2)
    assert out["loss_off"].item() == 0.0
    assert out["loss"].item() == pytest.approx((out["loss_ti"] + out["loss_dia"]).item())
    with pytest.raises(AssertionError, match="off_coeff=0"):
        IMSVDLoss(bin_size=8)(z1, z2)


def test_no_grad_forward_matches():
    z1, z2 = _inputs(8, 160)
    with torch.no_grad():
        a = IMSVDLoss(bin_size=16)(z1, z2)
    b = reference_imsvd_loss(z1, z2, 16)
    torch.testing.assert_close(a["loss"], b["loss"].detach(), rtol=1e-5, atol=0)


def test_clear_errors():
    z = torch.randn(4, 100)
    with pytest.raises(ValueError, match="D=100 is not divisible by bin_size=80"):
        IMSVDLoss(bin_size=80)(z, z)
    with pytest.raises(ValueError, match="ti_mode='tic'"):
        IMSVDLoss(ti_mode="tic")
    with pytest.raises(ValueError, match="impl='fast'"):
        IMSVDLoss(impl="fast")
    with pytest.raises(ValueError, match="same shape"):
        IMSVDLoss(bin_size=10)(z, z[:2])
    with pytest.raises(ValueError, match="at least 2 variables"):
        IMSVDLoss(bin_size=100)(z, z)
    with pytest.raises(ValueError, match="temperature"):
        IMSVDLoss(temperature=0.0)
    assert issubclass(LossConfigError, ValueError)
    # One variable is fine when the off-block term is disabled.
    out = IMSVDLoss(bin_size=100, off_coeff=0.0)(z, z)
    assert torch.isfinite(out["loss"])


def _lean_vs_reference_under_autocast(device: str, autocast_dtype) -> None:
    z1, z2 = (z.detach().to(device).requires_grad_() for z in _inputs(64, 1600, seed=5, scale=3.0))
    lean_crit = IMSVDLoss(bin_size=80, block_elems=3 * 80 * 1600)
    ref_crit = IMSVDLoss(bin_size=80, impl="reference")
    with torch.autocast(
        device,
        dtype=autocast_dtype or torch.bfloat16,
        enabled=autocast_dtype is not None,
    ):
        w = torch.eye(1600, device=device)
        a1, a2 = z1 @ w, z2 @ w  # in the autocast dtype when enabled
        lean, ref = lean_crit(a1, a2), ref_crit(a1, a2)
    for k in KEYS:
        assert lean[k].dtype == torch.float32 and torch.isfinite(lean[k]), k
        torch.testing.assert_close(lean[k], ref[k], rtol=1e-5, atol=1e-7, msg=k)
    # both losses hang off the same a1 = z1 @ w: keep that graph for the second gradient
    g_refs = torch.autograd.grad(ref["loss"], (z1, z2), retain_graph=True)
    # the way back through the low-precision matmul rounds each gradient to that dtype, so two
    # fp32 gradients a hair apart can land one unit in the last place apart
    tol = 1e-5 if autocast_dtype is None else torch.finfo(autocast_dtype).eps
    for g_ref, g_lean in zip(g_refs, _grads(lean, z1, z2)):
        torch.testing.assert_close(g_lean, g_ref, rtol=tol, atol=tol * g_ref.abs().max().item())


@pytest.mark.parametrize("autocast_dtype", [None, torch.bfloat16])
def test_lean_equals_reference_under_cpu_autocast(autocast_dtype):
    _lean_vs_reference_under_autocast("cpu", autocast_dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("autocast_dtype", [None, torch.float16, torch.bfloat16])
def test_lean_equals_reference_cuda(autocast_dtype):
    _lean_vs_reference_under_autocast("cuda", autocast_dtype)


def test_paper_eq11_normalisation_is_a_coefficient_change():
    """Eq. (11) (both sums / M^2) = dia_coeff 1/M, off_coeff (M-1)/M (README, base.yaml)."""
    torch.manual_seed(3)
    m, b, n = 5, 8, 16
    z1 = torch.randn(n, m * b, dtype=torch.float64)
    z2 = torch.randn(n, m * b, dtype=torch.float64)
    out = IMSVDLoss(bin_size=b, ti_coeff=0.0, dia_coeff=1 / m, off_coeff=(m - 1) / m)(z1, z2)
    q1, q2 = soft_discretize(z1, b), soft_discretize(z2, b)
    p = q1.T @ q2 / n
    in_diag_block = torch.block_diag(*[torch.ones(b, b, dtype=torch.bool)] * m)
    keep = ~in_diag_block | torch.eye(m * b, dtype=torch.bool)
    paper = (p[keep] * p[keep].log()).sum() / m**2
    assert torch.allclose(out["loss"], paper, rtol=1e-12, atol=0)

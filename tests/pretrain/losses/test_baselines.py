"""VICReg and Barlow Twins losses against straightforward formulations, and in two processes."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import act_as_launcher, free_port

from pretrain.dist import all_reduce_sum, cleanup, init_distributed
from pretrain.losses.barlowtwins import BarlowTwinsLoss
from pretrain.losses.imsvd import LossConfigError
from pretrain.losses.vicreg import VICRegLoss
from pretrain.methods import build_loss

N, IN, D = 12, 6, 8


def _problem(dtype=torch.float64):
    g = torch.Generator().manual_seed(3)
    x1 = torch.randn(N, IN, generator=g, dtype=dtype)
    x2 = x1 + 0.5 * torch.randn(N, IN, generator=g, dtype=dtype)
    w = torch.randn(IN, D, generator=g, dtype=dtype)
    return x1, x2, w


def _vicreg_direct(z1, z2, sim=25.0, std=25.0, cov=1.0):
    """VICReg written out term by term with loops and torch.cov (no shared helpers)."""
    n, d = z1.shape
    inv = sum(((z1[i] - z2[i]) ** 2).sum() for i in range(n)) / (n * d)
    var_terms = []
    cov_terms = []
    for z in (z1, z2):
        c = torch.cov(z.T)  # unbiased, (d, d)
        var_terms.append(sum(torch.relu(1 - torch.sqrt(c[j, j] + 1e-4)) for j in range(d)) / d)
        off = sum(c[a, b] ** 2 for a in range(d) for b in range(d) if a != b)
        cov_terms.append(off / d)
    var = (var_terms[0] + var_terms[1]) / 2
    return sim * inv + std * var + cov * (cov_terms[0] + cov_terms[1])


def _barlow_direct(z1, z2, lambd=0.0051):
    bn = torch.nn.BatchNorm1d(z1.shape[1], affine=False).to(z1.dtype).train()
    c = bn(z1).T @ bn(z2) / z1.shape[0]
    eye = torch.eye(c.shape[0], dtype=torch.bool)
    return ((c[eye] - 1) ** 2).sum() + lambd * (c[~eye] ** 2).sum()


@pytest.mark.parametrize(
    "make, direct",
    [
        (lambda: VICRegLoss(), _vicreg_direct),
        (lambda: VICRegLoss(10.0, 5.0, 2.0), lambda a, b: _vicreg_direct(a, b, 10.0, 5.0, 2.0)),
        (lambda: BarlowTwinsLoss(), _barlow_direct),
        (lambda: BarlowTwinsLoss(0.1), lambda a, b: _barlow_direct(a, b, 0.1)),
    ],
)
def test_value_and_gradient_match_direct_formula(make, direct):
    x1, x2, w = _problem()
    w1 = w.clone().requires_grad_()
    out = make()(x1 @ w1, x2 @ w1)
    out["loss"].backward()
    w2 = w.clone().requires_grad_()
    ref = direct(x1 @ w2, x2 @ w2)
    ref.backward()
    assert out["loss"].item() == pytest.approx(ref.item(), rel=1e-9)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-8, atol=1e-10)
    terms = [v for k, v in out.items() if k != "loss"]
    assert sum(t.item() for t in terms) == pytest.approx(out["loss"].item(), rel=1e-12)


def test_identical_decorrelated_views_reach_the_optimum():
    # centred orthogonal columns scaled to unit (unbiased) variance, identical in both views
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g, dtype=torch.float64)
    z = torch.linalg.qr(x - x.mean(0))[0] * 63**0.5
    vic = VICRegLoss()(z, z)
    assert vic["loss_inv"].item() == 0.0
    assert vic["loss_var"].item() == 0.0  # std sqrt(1 + eps) >= 1: the hinge is 0
    assert vic["loss_cov"].item() < 1e-20
    assert BarlowTwinsLoss()(z, z)["loss"].item() < 1e-8
    # a collapsed embedding is penalised by both
    flat = torch.ones(64, 4, dtype=torch.float64)
    assert VICRegLoss()(flat, flat)["loss_var"].item() == pytest.approx(25 * (1 - 1e-2), rel=1e-6)
    assert BarlowTwinsLoss()(flat, flat)["loss_on"].item() == pytest.approx(4.0)


def test_statistics_in_fp32_under_autocast():
    x1, x2, w = _problem(torch.float32)
    z1, z2 = (x1 @ w).bfloat16(), (x2 @ w).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for crit in (VICRegLoss(), BarlowTwinsLoss()):
            out = crit(z1, z2)
            assert all(v.dtype == torch.float32 for v in out.values())
            ref = crit(z1.float(), z2.float())
            assert out["loss"].item() == pytest.approx(ref["loss"].item(), rel=1e-6)


def test_factory_and_errors():
    base = {
        "name": "imsvd",
        "bin_size": 4,
        "temperature": 1.0,
        "ti_coeff": 1.0,
        "dia_coeff": 1.0,
        "off_coeff": 1.0,
        "ti_mode": "inner",
        "impl": "auto",
        "shard": True,
        "vicreg": {"sim_coeff": 25.0, "std_coeff": 25.0, "cov_coeff": 1.0},
        "barlowtwins": {"lambd": 0.0051},
    }
    assert type(build_loss(base)).__name__ == "IMSVDLoss"
    assert isinstance(build_loss({**base, "name": "vicreg"}), VICRegLoss)
    assert isinstance(build_loss({**base, "name": "barlowtwins"}), BarlowTwinsLoss)
    with pytest.raises(LossConfigError, match="loss.name.*simclr"):
        build_loss({**base, "name": "simclr"})
    with pytest.raises(LossConfigError, match="loss.barlowtwins.*lambd"):
        build_loss({**base, "name": "barlowtwins", "barlowtwins": {"lambd": float("nan")}})
    with pytest.raises(ValueError, match="same shape"):
        VICRegLoss()(torch.zeros(4, 3), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="at least 2"):
        BarlowTwinsLoss()(torch.zeros(1, 3), torch.zeros(1, 3))


# --------------------------------------------------------------------------- two processes


def _worker(rank, world, port, out_dir):
    act_as_launcher(rank, world, port)
    torch.set_num_threads(1)
    init_distributed("cpu")
    x1, x2, w = _problem()
    half = slice(rank * N // world, (rank + 1) * N // world)
    res = {}
    for name, crit in (("vicreg", VICRegLoss()), ("bt", BarlowTwinsLoss())):
        wl = w.clone().requires_grad_()
        out = crit(x1[half] @ wl, x2[half] @ wl)
        out["loss"].backward()
        res[name] = ({k: v.item() for k, v in out.items()}, all_reduce_sum(wl.grad) / world)
    torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    cleanup()


@pytest.mark.dist
def test_two_processes_equal_one_process_with_the_whole_batch(tmp_path):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    x1, x2, w = _problem()
    for name, crit in (("vicreg", VICRegLoss()), ("bt", BarlowTwinsLoss())):
        wl = w.clone().requires_grad_()
        out = crit(x1 @ wl, x2 @ wl)
        out["loss"].backward()
        for r in ranks:
            vals, grad = r[name]
            # DDP averages the parameter gradients: equal to the whole-batch gradient
            torch.testing.assert_close(grad, wl.grad, rtol=1e-8, atol=1e-10)
        if name == "bt":  # every term uses the global batch: each rank holds the whole value
            for r in ranks:
                assert r[name][0]["loss"] == pytest.approx(out["loss"].item(), rel=1e-10)
        else:  # invariance is a local mean; its mean over ranks is the whole-batch value
            mean_inv = sum(r[name][0]["loss_inv"] for r in ranks) / 2
            assert mean_inv == pytest.approx(out["loss_inv"].item(), rel=1e-10)
            for k in ("loss_var", "loss_cov"):
                assert ranks[0][name][0][k] == pytest.approx(out[k].item(), rel=1e-10)

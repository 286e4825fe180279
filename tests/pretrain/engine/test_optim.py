"""LARS and the learning-rate schedule against hand-computed values."""

import math

import pytest
import torch
from torch import nn

from pretrain.engine.optim import LARS, build_optimizer, lr_at, param_groups, scaled_lr


def test_lars_step_by_hand():
    w = nn.Parameter(torch.tensor([[3.0, 4.0]]))  # ||w|| = 5
    b = nn.Parameter(torch.tensor([1.0]))
    opt = LARS(
        [{"params": [w]}, {"params": [b], "lars": False, "weight_decay": 0.0}],
        lr=0.5,
        momentum=0.9,
        weight_decay=0.1,
        eta=0.01,
    )
    gw = torch.tensor([[0.6, 0.8]])
    gb = torch.tensor([2.0])
    # step 1: g' = g + wd*w = [0.9, 1.2] (norm 1.5); trust = 0.01 * 5 / 1.5
    w.grad, b.grad = gw.clone(), gb.clone()
    opt.step()
    trust = 0.01 * 5 / 1.5
    v_w = [0.9 * trust, 1.2 * trust]
    exp_w = [3.0 - 0.5 * v_w[0], 4.0 - 0.5 * v_w[1]]
    assert w.detach().tolist()[0] == pytest.approx(exp_w, rel=1e-6)
    assert b.item() == pytest.approx(1.0 - 0.5 * 2.0)  # excluded: no wd, no adaptation
    # step 2: momentum accumulates the adapted gradient
    w.grad, b.grad = gw.clone(), gb.clone()
    opt.step()
    g2 = [0.6 + 0.1 * exp_w[0], 0.8 + 0.1 * exp_w[1]]
    trust2 = 0.01 * math.hypot(*exp_w) / math.hypot(*g2)
    v2 = [0.9 * v_w[0] + trust2 * g2[0], 0.9 * v_w[1] + trust2 * g2[1]]
    exp_w2 = [exp_w[0] - 0.5 * v2[0], exp_w[1] - 0.5 * v2[1]]
    assert w.detach().tolist()[0] == pytest.approx(exp_w2, rel=1e-6)
    assert b.item() == pytest.approx(0.0 - 0.5 * (0.9 * 2.0 + 2.0))


def test_lars_zero_norm_uses_unit_trust():
    w = nn.Parameter(torch.zeros(2, 2))
    opt = LARS([w], lr=1.0, momentum=0.0, weight_decay=0.0, eta=0.001)
    w.grad = torch.ones(2, 2)
    opt.step()
    assert torch.allclose(w, -torch.ones(2, 2))


def test_param_groups_exclude_bias_and_norm():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2, bias=False))
    groups = param_groups(model)
    assert [p.ndim for p in groups[0]["params"]] == [2, 2]
    assert len(groups[1]["params"]) == 3 and groups[1]["lars"] is False
    assert groups[1]["weight_decay"] == 0.0


def test_build_optimizer_and_errors():
    model = nn.Linear(3, 2)
    cfg = {
        "name": "lars",
        "momentum": 0.9,
        "weight_decay": 1e-6,
        "eta": 0.001,
        "exclude_bias_and_norm": True,
        "excluded_lr_ratio": 1.0,
    }
    assert isinstance(build_optimizer(model, cfg, 0.1), LARS)
    assert isinstance(build_optimizer(model, {**cfg, "name": "sgd"}, 0.1), torch.optim.SGD)
    with pytest.raises(ValueError, match="optim.name"):
        build_optimizer(model, {**cfg, "name": "adamw"}, 0.1)


def test_schedule_by_hand():
    peak, ratio, total, warm = 4.8, 0.001, 1000, 100
    assert scaled_lr(0.6, 2048) == pytest.approx(4.8)
    assert lr_at(0, total, warm, peak, ratio) == 0.0
    assert lr_at(50, total, warm, peak, ratio) == pytest.approx(2.4)
    assert lr_at(100, total, warm, peak, ratio) == pytest.approx(peak)
    end = peak * ratio
    assert lr_at(550, total, warm, peak, ratio) == pytest.approx((peak + end) / 2)
    assert lr_at(1000, total, warm, peak, ratio) == pytest.approx(end)
    t = 225 / 900
    assert lr_at(325, total, warm, peak, ratio) == pytest.approx(
        end + (peak - end) * 0.5 * (1 + math.cos(math.pi * t))
    )
    assert lr_at(0, 10, 0, 1.0, 0.0) == pytest.approx(1.0)


def test_excluded_lr_ratio_scales_the_bias_and_norm_group():
    """Barlow Twins' recipe: biases / norm parameters at 0.0048 / 0.2 of the weights' lr."""
    from pretrain.engine.optim import param_groups, set_lr

    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    groups = param_groups(net, exclude_1d=True, excluded_lr_ratio=0.024)
    opt = torch.optim.SGD(groups, lr=0.1)
    set_lr(opt, 2.0)
    assert [g["lr"] for g in opt.param_groups] == [2.0, pytest.approx(0.048)]
    assert sum(p.numel() for p in opt.param_groups[1]["params"]) == 3 + 3 + 3  # bias, BN w, b

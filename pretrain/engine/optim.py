"""LARS with exclusions, parameter groups, and the per-step warm-up + cosine schedule."""

from __future__ import annotations

import math
from typing import Iterable, Mapping

import torch
from torch import nn

from pretrain.config import ConfigError


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al., 2017).

    For each parameter in a group with ``lars=True``:
        g <- g + weight_decay * p
        g <- g * eta * ||p|| / ||g||   (when both norms are positive)
        v <- momentum * v + g
        p <- p - lr * v
    Groups with ``lars=False`` (biases and norm parameters in the recipe) skip both the weight
    decay and the adaptation and take plain momentum SGD steps.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 1e-6,
        eta: float = 0.001,
    ) -> None:
        if lr < 0 or momentum < 0 or weight_decay < 0 or eta <= 0:
            raise ValueError(
                f"invalid LARS settings lr={lr} momentum={momentum} "
                f"weight_decay={weight_decay} eta={eta}"
            )
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars=True)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D401 - optimizer API
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if group["lars"]:
                    if group["weight_decay"] != 0:
                        g = g.add(p, alpha=group["weight_decay"])
                    p_norm = torch.linalg.vector_norm(p)
                    g_norm = torch.linalg.vector_norm(g)
                    trust = torch.where(
                        (p_norm > 0) & (g_norm > 0),
                        group["eta"] * p_norm / g_norm,
                        torch.ones_like(p_norm),
                    )
                    g = g.mul(trust)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.clone(g).detach()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(g)
                p.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss


def param_groups(
    model: nn.Module, exclude_1d: bool = True, excluded_lr_ratio: float = 1.0
) -> list[dict]:
    """Split parameters: weights (ndim > 1) get weight decay + LARS; biases/norm params do not.

    Args:
        model: the (possibly DDP-wrapped) model.
        exclude_1d: put 1-D parameters in a group with ``lars=False, weight_decay=0``.
        excluded_lr_ratio: learning rate of that group relative to the weights' (Barlow Twins
            uses 0.0048 / 0.2 = 0.024); :func:`set_lr` applies it as ``lr_ratio``.
    """
    regular, excluded = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (excluded if exclude_1d and p.ndim <= 1 else regular).append(p)
    groups = [{"params": regular}]
    if excluded:
        groups.append(
            {"params": excluded, "lars": False, "weight_decay": 0.0, "lr_ratio": excluded_lr_ratio}
        )
    return groups


def build_optimizer(model: nn.Module, optim_cfg: Mapping, lr: float) -> torch.optim.Optimizer:
    """Build the optimizer named by ``optim_cfg['name']`` ("lars" or "sgd").

    Args:
        model: the model.
        optim_cfg: the config's ``optim`` section.
        lr: the peak learning rate (already scaled by the batch size).
    """
    name = optim_cfg["name"]
    groups = param_groups(
        model,
        exclude_1d=bool(optim_cfg["exclude_bias_and_norm"]),
        excluded_lr_ratio=float(optim_cfg["excluded_lr_ratio"]),
    )
    if name == "lars":
        return LARS(
            groups,
            lr=lr,
            momentum=optim_cfg["momentum"],
            weight_decay=optim_cfg["weight_decay"],
            eta=optim_cfg["eta"],
        )
    if name == "sgd":
        for g in groups:
            g.pop("lars", None)
        return torch.optim.SGD(
            groups, lr=lr, momentum=optim_cfg["momentum"], weight_decay=optim_cfg["weight_decay"]
        )
    raise ConfigError(f"config key 'optim.name': unknown optimizer '{name}' (lars or sgd)")


def scaled_lr(base_lr: float, global_batch: int, reference_batch: int = 256) -> float:
    """Linear scaling rule: base_lr * global_batch / reference_batch."""
    return base_lr * global_batch / reference_batch


def lr_at(
    step: int, total_steps: int, warmup_steps: int, peak_lr: float, final_ratio: float
) -> float:
    """Learning rate at ``step`` (0-based): linear warm-up from 0, then cosine to final_ratio*peak.

    Args:
        step: the global step about to be taken.
        total_steps: steps of the whole run.
        warmup_steps: steps of linear warm-up.
        peak_lr: the learning rate reached at the end of warm-up.
        final_ratio: the cosine ends at ``final_ratio * peak_lr``.
    """
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    decay_steps = max(total_steps - warmup_steps, 1)
    t = min(step - warmup_steps, decay_steps) / decay_steps
    q = 0.5 * (1.0 + math.cos(math.pi * t))
    end = peak_lr * final_ratio
    return end + (peak_lr - end) * q


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set ``lr`` on every parameter group (times the group's ``lr_ratio``, default 1)."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_ratio", 1.0)

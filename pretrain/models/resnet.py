"""The torchvision ResNets of this project: what a checkpoint's backbone is.

Arch and stem names, blocks per stage, the network torchvision builds for an arch and stem
(``fc`` an Identity), and recognising arch and stem from a state dict's keys. The checkpoint
files store these weights under torchvision's names (``pretrain.checkpoint`` checks a file
against :func:`torchvision_resnet`'s keys and shapes); the model layer (``pretrain.models.build``)
builds its backbone from it. Imports nothing of the project.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torchvision
from torch import nn

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101")
STEMS = ("standard", "small", "small_s2")
# blocks per stage, and whether the arch uses bottleneck blocks
_LAYOUT = {
    "resnet18": ((2, 2, 2, 2), False),
    "resnet34": ((3, 4, 6, 3), False),
    "resnet50": ((3, 4, 6, 3), True),
    "resnet101": ((3, 4, 23, 3), True),
}


def torchvision_resnet(arch: str, stem: str, zero_init_residual: bool = False) -> nn.Module:
    """torchvision's ResNet ``arch`` with the first conv of ``stem`` and ``fc`` an Identity.

    Args:
        arch: one of :data:`ARCHS`.
        stem: "standard" (7x7/2 conv + max-pool), "small" (3x3/1 conv, no max-pool: for 28-64 px
            images) or "small_s2" (3x3/2 conv + max-pool).
        zero_init_residual: zero the last BN gamma of each residual block.

    Returns:
        The network (output: pooled features); ``.num_features`` holds their width (512 or
        2048), ``.arch`` and ``.stem`` the names it was built with.

    Raises:
        ValueError: an arch or stem not in :data:`ARCHS` / :data:`STEMS` (callers check first
            and name their config key or file).
    """
    if arch not in ARCHS or stem not in STEMS:
        raise ValueError(f"unknown ResNet arch/stem {arch!r}/{stem!r}")
    net = getattr(torchvision.models, arch)(weights=None, zero_init_residual=zero_init_residual)
    if stem != "standard":
        stride = 1 if stem == "small" else 2
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=stride, padding=1, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        if stem == "small":
            net.maxpool = nn.Identity()
    net.num_features = net.fc.in_features
    net.fc = nn.Identity()
    net.arch = arch
    net.stem = stem
    return net


def infer_arch(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Guess the ResNet arch of a torchvision-named backbone state_dict.

    Raises:
        ValueError: when the keys do not look like a torchvision ResNet.
    """
    counts = []
    for stage in range(1, 5):
        idx = {
            int(k.split(".")[1])
            for k in state_dict
            if k.startswith(f"layer{stage}.") and k.split(".")[1].isdigit()
        }
        counts.append(len(idx))
    bottleneck = any(k.endswith("conv3.weight") for k in state_dict if k.startswith("layer"))
    for arch, (layout, is_bottleneck) in _LAYOUT.items():
        if tuple(counts) == layout and bottleneck == is_bottleneck:
            return arch
    sample = ", ".join(list(state_dict)[:5])
    raise ValueError(
        f"state_dict is not a torchvision ResNet-18/34/50/101 backbone (blocks per stage "
        f"{counts}, bottleneck={bottleneck}; first keys: {sample})"
    )


def infer_stem(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Guess the stem from conv1's kernel (3x3 -> "small"; the max-pool is not visible)."""
    w = state_dict.get("conv1.weight")
    if w is None:
        raise ValueError("state_dict has no 'conv1.weight': not a torchvision ResNet backbone")
    return "standard" if w.shape[-1] == 7 else "small"

"""The backbone: the torchvision ResNet of :mod:`pretrain.models.resnet` (``fc`` an Identity)
with convolutions that compute 1x1 outputs as one matrix product (:class:`SmallInputConv2d`).
"""

from __future__ import annotations

import torch
from torch import nn

from pretrain.config import ConfigError
from pretrain.models.resnet import ARCHS, STEMS, torchvision_resnet


class SmallInputConv2d(nn.Conv2d):
    """``nn.Conv2d`` that computes a 1x1 output as one matrix product of the taps that see input.

    When the output is 1x1 (layer4 of a ResNet with the standard or small_s2 stem on images of
    32 px or less: a 3x3 / padding 1 conv on a 1x1 map, or a stride-2 one on a 2x2 map), most
    taps only ever meet zero padding.
    The result is then ``x[:, :, :h, :w].flatten(1) @ W[:, :, p:p+h, p:p+w].flatten(1).T``:
    the same sum without the zero terms, so outputs and gradients equal ``nn.Conv2d``'s up to
    float summation order (the padding taps' weight gradients are exactly 0, as they are in
    ``nn.Conv2d``). oneDNN's CPU backward of a 512-channel 3x3 conv on a 1x1 map at batch 256
    takes about 10x its forward (``benchmarks/bench_small_input_conv.py`` measures the ratio).
    Every other shape, and groups / dilation / non-zero padding modes, go to ``nn.Conv2d``.
    State-dict keys and parameters are those of ``nn.Conv2d``. The shape test is Python code in
    ``forward``: ``torch.fx`` tracing / ``torch.jit.script`` of the backbone need plain convs
    (``m.__class__ = nn.Conv2d`` for each module restores them).
    """

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias):
        taps = self._one_output_taps(x)
        if taps is None:
            return super()._conv_forward(x, weight, bias)
        (h, w), (ph, pw) = taps
        y = nn.functional.linear(
            x[:, :, :h, :w].flatten(1), weight[:, :, ph : ph + h, pw : pw + w].flatten(1), bias
        )
        return y.view(x.shape[0], self.out_channels, 1, 1)

    def _one_output_taps(self, x: torch.Tensor):
        """((h, w) input rows/cols used, (ph, pw) first tap) when the output is 1x1, else None."""
        if (
            x.dim() != 4
            or self.groups != 1
            or self.padding_mode != "zeros"
            or isinstance(self.padding, str)
            or any(d != 1 for d in self.dilation)
        ):
            return None
        used, first = [], []
        for size, k, s, p in zip(x.shape[2:], self.kernel_size, self.stride, self.padding):
            if (size + 2 * p - k) // s + 1 != 1 or p >= k or size + 2 * p < k:
                return None
            used.append(min(size, k - p))
            first.append(p)
        return tuple(used), tuple(first)


def use_small_input_convs(module: nn.Module) -> nn.Module:
    """Make every plain ``nn.Conv2d`` of ``module`` a :class:`SmallInputConv2d` (in place)."""
    for m in module.modules():
        if type(m) is nn.Conv2d:
            m.__class__ = SmallInputConv2d
    return module


def build_backbone(
    arch: str = "resnet50", zero_init_residual: bool = True, stem: str = "standard"
) -> nn.Module:
    """Build a torchvision ResNet whose ``fc`` is an Identity (output: pooled features).

    Args:
        arch: one of resnet18/34/50/101.
        zero_init_residual: zero the last BN gamma of each residual block (the recipe's setting).
        stem: "standard" (7x7/2 conv + max-pool), "small" (3x3/1 conv, no max-pool: for 28-64 px
            images) or "small_s2" (3x3/2 conv + max-pool).

    Returns:
        The backbone; ``.num_features`` holds the output width (512 or 2048). Its convolutions
        are :class:`SmallInputConv2d` (same parameters and outputs as ``nn.Conv2d``).
    """
    if arch not in ARCHS:
        raise ConfigError(
            f"config key 'model.arch': unknown backbone arch '{arch}' (one of {', '.join(ARCHS)})"
        )
    if stem not in STEMS:
        raise ConfigError(
            f"config key 'model.stem': unknown stem '{stem}' (one of {', '.join(STEMS)})"
        )
    return use_small_input_convs(torchvision_resnet(arch, stem, zero_init_residual))

"""Backbone (torchvision ResNet without fc) and the IMSVD projector."""

from __future__ import annotations

from typing import Mapping

import torch
import torchvision
from torch import nn

from pretrain.config import ConfigError

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101")
STEMS = ("standard", "small", "small_s2")
# blocks per stage, and whether the arch uses bottleneck blocks
_LAYOUT = {
    "resnet18": ((2, 2, 2, 2), False),
    "resnet34": ((3, 4, 6, 3), False),
    "resnet50": ((3, 4, 6, 3), True),
    "resnet101": ((3, 4, 23, 3), True),
}


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
    return use_small_input_convs(net)


def parse_projector_spec(spec: str) -> list[int]:
    """Parse "8192-8160" into [8192, 8160] with a clear error."""
    try:
        dims = [int(x) for x in str(spec).split("-")]
    except ValueError:
        raise ConfigError(
            f"config key 'model.projector': '{spec}' must look like '8192-8160'"
        ) from None
    if not dims or any(d <= 0 for d in dims):
        raise ConfigError(f"config key 'model.projector': '{spec}' must list positive widths")
    return dims


OUT_NORMS = ("none", "bn")


def output_norm(dim: int) -> nn.BatchNorm1d:
    """The norm of ``model.out_norm: bn``: ``BatchNorm1d(dim, affine=False)`` on N x dim logits."""
    return nn.BatchNorm1d(dim, affine=False)


class Projector(nn.Sequential):
    """MLP projector: (Linear + BatchNorm1d + ReLU) x (k-1), then Linear without bias, and with
    ``out_norm="bn"`` a last layer ``BatchNorm1d(out_dim, affine=False)`` (beyond the paper: each
    logit standardised over the batch before the loss).

    The same module, with the same state-dict keys (``<i>.weight`` ..., the norm at the last
    index), in training and when rebuilt from a checkpoint.

    Args:
        in_dim: input width (the backbone's pooled features).
        spec: the Linear widths, e.g. "8192-8160".
        out_norm: "none" or "bn".
    Raises:
        ConfigError: a malformed spec or an unknown out_norm (naming the config key).
    """

    def __init__(self, in_dim: int, spec: str = "8192-8160", out_norm: str = "none") -> None:
        if out_norm not in OUT_NORMS:
            raise ConfigError(
                f"config key 'model.out_norm': {out_norm!r} is not one of {', '.join(OUT_NORMS)}"
            )
        dims = [in_dim] + parse_projector_spec(spec)
        layers: list[nn.Module] = []
        for a, b in zip(dims[:-2], dims[1:-1]):
            layers += [nn.Linear(a, b), nn.BatchNorm1d(b), nn.ReLU(inplace=True)]
        layers.append(nn.Linear(dims[-2], dims[-1], bias=False))
        if out_norm == "bn":
            layers.append(output_norm(dims[-1]))
        super().__init__(*layers)
        self.in_dim = in_dim
        self.out_dim = dims[-1]
        self.spec = str(spec)
        self.out_norm = out_norm


class IMSVDModel(nn.Module):
    """Backbone followed by the projector (which holds the optional output norm).

    Args:
        backbone: image -> pooled features.
        projector: pooled features -> N x D embedding (:class:`Projector`).
    """

    def __init__(self, backbone: nn.Module, projector: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = projector

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(x))


def build_model(model_cfg: Mapping) -> IMSVDModel:
    """Build backbone + projector from the config's ``model`` section.

    Args:
        model_cfg: mapping with keys arch, stem, zero_init_residual, projector.
    """
    backbone = build_backbone(
        model_cfg["arch"],
        zero_init_residual=bool(model_cfg["zero_init_residual"]),
        stem=model_cfg["stem"],
    )
    # recipes stored in checkpoints written before model.out_norm existed lack the key
    out_norm = model_cfg.get("out_norm", "none")
    projector = Projector(backbone.num_features, model_cfg["projector"], out_norm)
    return IMSVDModel(backbone, projector)


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

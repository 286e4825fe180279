"""The model layer: backbone (torchvision ResNet without fc), the IMSVD projector, and both
built from a recipe or from a checkpoint.

:func:`model_from_checkpoint` is the one place a file becomes modules: ``pretrain.checkpoint``
reads the state dicts and their metadata, this module builds and loads the modules.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import torch
from torch import nn

from pretrain.checkpoint import (
    CheckpointError,
    check_finite_weights,
    load_backbone_and_projector,
    read_projector,
)
from pretrain.checkpoint.common import diff_keys
from pretrain.config import ConfigError
from pretrain.resnet import ARCHS, STEMS, torchvision_resnet


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


class PretrainModel(nn.Module):
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


def build_model(model_cfg: Mapping) -> PretrainModel:
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
    return PretrainModel(backbone, projector)


# ---------------------------------------------------------------------- from a checkpoint


def _projector_fit(sd: Mapping[str, torch.Tensor], pmeta: Mapping[str, Any]) -> dict[str, Any]:
    """``matches_projector``: whether ``Projector(in_dim, spec, out_norm)`` loads ``sd``
    strictly; else also ``mismatch`` (missing / unexpected keys, shape differences)."""
    with torch.device("meta"):
        expected = Projector(pmeta["in_dim"], pmeta["spec"], pmeta["out_norm"]).state_dict()
    missing, unexpected, shapes = diff_keys(sd, expected)
    if not (missing or unexpected or shapes):
        return {"matches_projector": True}
    mismatch = {"missing": missing, "unexpected": unexpected, "shapes": shapes}
    return {"matches_projector": False, "mismatch": mismatch}


def load_projector(
    path: str | os.PathLike,
    map_location: Any = "cpu",
    *,
    allow_unsafe: bool = False,
    verify_hash: bool = True,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read the projector weights from a training state or the reference model.pth.

    Args:
        path: checkpoint file.
        map_location: passed to torch.load.
        allow_unsafe: permit a full unpickle of files the safe readers refuse.
        verify_hash: check the stored content hash of this project's training state.

    Returns:
        ``(state_dict, meta)`` as from :func:`pretrain.checkpoint.read_projector` (``spec``,
        ``in_dim``, ``out_dim``, ``num_linear``, ``linear_bias``, ``out_norm``,
        ``source_format``, ``epoch``, ``notes``, ``path``), plus ``matches_projector`` (whether
        ``Projector(in_dim, spec, out_norm)`` loads it strictly; else ``mismatch``).

    Raises:
        CheckpointError: unreadable file, or a file without projector weights.
    """
    sd, meta = read_projector(
        path, map_location, allow_unsafe=allow_unsafe, verify_hash=verify_hash
    )
    meta.update(_projector_fit(sd, meta))
    return sd, meta


def model_from_checkpoint(
    path: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    allow_unsafe: bool = False,
    verify_hash: bool = True,
    checkpoint_key: str | None = None,
    prefix: str | None = None,
) -> tuple[nn.Module, Projector | None, dict[str, Any]]:
    """Build the backbone (and the projector when the file has one) from one read of a file.

    Args:
        path: any checkpoint :func:`pretrain.checkpoint.load_backbone` accepts.
        device: where the modules are put.
        allow_unsafe, verify_hash, checkpoint_key, prefix: as for ``load_backbone``.

    Returns:
        ``(backbone, projector, meta)``: :func:`build_backbone` ``(arch, stem=stem)`` with the
        weights loaded strictly (``fc`` is an Identity, output ``backbone.num_features`` wide);
        :class:`Projector` with its weights, or None when the file has no projector or it does
        not match that module (``meta["projector"]`` says which); when the training state has
        a norm on the projector output (``model.out_norm: bn``) it is the projector's last
        layer, as in training (``Projector(in_dim, spec, "bn")``, also for files of the earlier
        ``out_norm.*`` layout) and ``meta["projector"]["out_norm"]`` is "bn" ("none"
        otherwise); meta as from ``load_backbone`` plus ``projector`` (the projector's meta, as
        from :func:`load_projector` without ``notes``, or None).

    Raises:
        CheckpointError: as ``load_backbone``. NonFiniteWeightsError: a NaN / inf parameter or
            buffer, or a BatchNorm running_var <= 0 (``check_finite_weights``).
    """
    opts = dict(allow_unsafe=allow_unsafe, verify_hash=verify_hash)
    opts.update(checkpoint_key=checkpoint_key, prefix=prefix)
    sd, meta, read = load_backbone_and_projector(path, "cpu", **opts)
    backbone = build_backbone(meta["arch"], zero_init_residual=False, stem=meta["stem"])
    backbone.load_state_dict(sd, strict=True)
    check_finite_weights(backbone, path, "backbone")
    projector, meta["projector"] = None, None
    if read is not None:
        psd, pmeta = read
        pmeta.pop("notes", None)
        pmeta.update(_projector_fit(psd, pmeta))
        meta["projector"] = pmeta
        if pmeta["matches_projector"]:
            projector = Projector(pmeta["in_dim"], pmeta["spec"], pmeta["out_norm"])
            projector.load_state_dict(psd, strict=True)
            check_finite_weights(projector, path, "projector")
            projector.to(device)
        else:
            meta["notes"].append("projector weights do not match pretrain.model.Projector")
    return backbone.to(device), projector, meta


def require_projector(projector: Projector | None, meta: Mapping[str, Any]) -> Projector:
    """The projector :func:`model_from_checkpoint` built, or an error saying why there is none.

    Args:
        projector, meta: the second and third values :func:`model_from_checkpoint` returned.

    Raises:
        CheckpointError: the file carries no projector weights, or they do not fit
            :class:`Projector` (naming the file and the difference).
    """
    if projector is not None:
        return projector
    pm = meta["projector"]
    why = (
        "it carries no projector weights"
        if pm is None
        else f"its projector weights do not fit Projector({pm['in_dim']}, '{pm['spec']}'): "
        f"{pm.get('mismatch')}"
    )
    raise CheckpointError(
        f"{meta['path']}: {why}; backbone + projector are read from a training-state checkpoint "
        "(checkpoint_e*_s*.pth) or the reference IMSVD model.pth, not from an exported backbone"
    )

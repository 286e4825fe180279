"""The model layer's builders: :class:`PretrainModel` (backbone + projector) from a recipe
(:func:`build_model`) or from a checkpoint (:func:`model_from_checkpoint`).

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
from pretrain.models.backbone import build_backbone
from pretrain.models.projector import Projector


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
    stem: str | None = None,
) -> tuple[nn.Module, Projector | None, dict[str, Any]]:
    """Build the backbone (and the projector when the file has one) from one read of a file.

    Args:
        path: any checkpoint :func:`pretrain.checkpoint.load_backbone` accepts.
        device: where the modules are put.
        allow_unsafe, verify_hash, checkpoint_key, prefix, stem: as for ``load_backbone``.

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
    opts.update(checkpoint_key=checkpoint_key, prefix=prefix, stem=stem)
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
            meta["notes"].append(
                "projector weights do not match pretrain.models.projector.Projector"
            )
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
        f"{meta['path']} ({meta['source_format']}): {why}; backbone + projector are read from a "
        "training-state checkpoint (checkpoint_e*_s*.pth) or the reference IMSVD model.pth "
        "(an exported backbone or a bare state dict holds the backbone only)"
    )

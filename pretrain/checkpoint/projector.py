"""The IMSVD projector in a checkpoint: which layouts carry one, and its layout read from its keys.

Whether :class:`pretrain.models.projector.Projector` loads the weights is the model layer's question
(``pretrain.models.build.load_projector``); here only the file is read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from .common import BACKBONE_FORMAT, TRAIN_STATE_FORMAT, CheckpointError
from .readers import Extracted

# the readers whose files carry an IMSVD projector next to the backbone
PROJECTOR_SOURCES = (
    TRAIN_STATE_FORMAT,
    "imsvd-reference-model",
    "imsvd-model-state-dict",
    "imsvd-reference-cifar",
)


def projector_layout(sd: Mapping[str, torch.Tensor], path: Path) -> dict[str, Any]:
    """The projector's shape read from its nn.Sequential-style keys.

    Returns:
        ``spec`` (the Linear widths, e.g. "8192-8160"), ``in_dim``, ``out_dim``,
        ``num_linear``, ``linear_bias`` (one bool per Linear) and ``out_norm`` ("bn": a
        BatchNorm without affine parameters after the last Linear, ``model.out_norm: bn``; else
        "none").

    Raises:
        CheckpointError: a key that is not ``<index>.<name>``, or no Linear layer.
    """
    linears = []
    for k, v in sd.items():
        head, _, name = k.partition(".")
        if not head.isdigit():
            raise CheckpointError(f"{path}: unexpected projector key 'projector.{k}'")
        if name == "weight" and v.dim() == 2:
            linears.append((int(head), v))
    if not linears:
        raise CheckpointError(f"{path}: projector weights hold no Linear layer")
    linears.sort(key=lambda t: t[0])
    after = linears[-1][0] + 1
    out_norm = "bn" if f"{after}.running_mean" in sd and f"{after}.weight" not in sd else "none"
    return {
        "spec": "-".join(str(w.shape[0]) for _, w in linears),
        "in_dim": int(linears[0][1].shape[1]),
        "out_dim": int(linears[-1][1].shape[0]),
        "num_linear": len(linears),
        "linear_bias": [f"{i}.bias" in sd for i, _ in linears],
        "out_norm": out_norm,
    }


def projector_of(
    path: Path, label: str, ex: Extracted
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The projector weights and meta of what a reader extracted from ``path``.

    Returns:
        ``(state_dict, meta)``: :func:`projector_layout` plus ``source_format``, ``epoch``,
        ``path`` and ``notes``.

    Raises:
        CheckpointError: an exported backbone, a layout without projector, or no
            ``projector.*`` weights.
    """
    if label == BACKBONE_FORMAT:
        raise CheckpointError(
            f"{path} is an exported backbone ('{BACKBONE_FORMAT}'), which carries no projector; "
            "use a training-state checkpoint (checkpoint_e*_s*.pth) of the same run"
        )
    if label not in PROJECTOR_SOURCES or ex.projector is None:
        raise CheckpointError(
            f"{path} ({label}) holds a backbone only, no projector; projectors are read from "
            f"this project's training state or the reference IMSVD model.pth"
        )
    if not ex.projector:
        raise CheckpointError(f"{path} ({label}): no 'projector.*' weights found")
    pmeta = projector_layout(ex.projector, path)
    pmeta.update(source_format=label, epoch=ex.meta.get("epoch"), path=str(path))
    pmeta["notes"] = list(ex.meta.get("notes", []))
    return dict(ex.projector), pmeta

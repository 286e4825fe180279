"""Detectron2 extensions used by the transfer configs (imports Detectron2).

Importing this module registers ``Res5ROIHeadsExtraNorm`` in Detectron2's ROI head registry:
the C4 ROI head whose res5 stage is followed by one more normalisation layer. Self-supervised
backbones are pretrained with BatchNorm everywhere, and fine-tuning them with all norms trainable
(SyncBN, FREEZE_AT 0) works better when the res5 output is normalised as well.
"""

from __future__ import annotations

import importlib.util
from typing import Tuple

from detectron2.config import CfgNode
from detectron2.layers import get_norm
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, Res5ROIHeads
from torch import nn

__all__ = ["Res5ROIHeadsExtraNorm", "has_cpp_ops", "single_process_norm"]


# Guarded so that importing this module twice (e.g. as a script's module and via the package)
# does not hit the registry's duplicate-name assertion.
if "Res5ROIHeadsExtraNorm" in ROI_HEADS_REGISTRY:  # pragma: no cover
    Res5ROIHeadsExtraNorm = ROI_HEADS_REGISTRY.get("Res5ROIHeadsExtraNorm")
else:

    @ROI_HEADS_REGISTRY.register()
    class Res5ROIHeadsExtraNorm(Res5ROIHeads):
        """Res5ROIHeads with ``cfg.MODEL.RESNETS.NORM`` applied after the last res5 block.

        The extra layer is ``roi_heads.res5.norm``; converted backbone weights do not contain it,
        so it starts from the norm's default initialisation (weight 1, bias 0).
        """

        @classmethod
        def _build_res5_block(cls, cfg: CfgNode) -> Tuple[nn.Sequential, int]:
            seq, out_channels = super()._build_res5_block(cfg)
            seq.add_module("norm", get_norm(cfg.MODEL.RESNETS.NORM, out_channels))
            return seq, out_channels


def has_cpp_ops() -> bool:
    """Return True when Detectron2's compiled ops (``detectron2._C``) are installed.

    Returns:
        Whether the fast COCO evaluator and the other C++ ops can be used.
    """
    try:
        return importlib.util.find_spec("detectron2._C") is not None
    except (ImportError, ValueError):
        return False


_NORM_KEYS = (
    ("MODEL", "RESNETS", "NORM"),
    ("MODEL", "FPN", "NORM"),
    ("MODEL", "ROI_BOX_HEAD", "NORM"),
    ("MODEL", "ROI_MASK_HEAD", "NORM"),
)


def single_process_norm(cfg: CfgNode) -> list:
    """Replace SyncBN by BN in a config, in place (for one process, where they are equivalent).

    ``nn.SyncBatchNorm`` needs an initialised process group and a GPU to synchronise; on one
    process its statistics are those of plain BatchNorm, and the parameter names are the same.

    Args:
        cfg: a mutable Detectron2 config.

    Returns:
        The dotted config keys that were changed.
    """
    changed = []
    for path in _NORM_KEYS:
        node = cfg
        for part in path[:-1]:
            node = node.get(part) if isinstance(node, CfgNode) else None
        if isinstance(node, CfgNode) and node.get(path[-1]) in (
            "SyncBN",
            "nnSyncBN",
            "naiveSyncBN",
        ):
            node[path[-1]] = "BN"
            changed.append(".".join(path))
    return changed

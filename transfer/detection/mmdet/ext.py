"""MMDetection extensions used by the configs in transfer/configs/mmdet/ (imports MMDetection).

Importing this module registers ``ResLayerExtraNorm`` in MMDetection's model registry (the
configs list it in ``custom_imports``, so MMDetection's own tools find it too): the C4 shared
head (res5) followed by one more normalisation layer, the counterpart of the Detectron2 head
``Res5ROIHeadsExtraNorm`` in ``transfer/detection/d2/ext.py``.

It also holds the config helpers of ``imsvd-mmdet-train``: SyncBN -> BN for one process,
setting the Pretrained checkpoints, and the classes a trained MMDetection checkpoint may
contain besides tensors (for loading it with ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import collections
import pickle
from types import FunctionType
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
from mmcv.cnn import build_norm_layer
from mmdet.models.backbones import ResNet
from mmdet.models.roi_heads.shared_heads import ResLayer
from mmdet.registry import MODELS
from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.logging import HistoryBuffer

__all__ = [
    "ResLayerExtraNorm",
    "MetricsCapture",
    "single_process_norm",
    "set_pretrained_checkpoint",
    "pretrained_checkpoints",
    "checkpoint_safe_globals",
]


class _ResLayerExtraNorm(ResLayer):
    """MMDetection's ``ResLayer`` shared head with a norm layer after the last block.

    The extra layer is ``roi_head.shared_head.norm`` (``norm_cfg``, over the stage's output
    channels: 2048 for ResNet-50's res5). Converted backbone weights do not contain it, so it
    keeps its fresh initialisation (weight 1, bias 0), like the untrained heads.
    """

    def __init__(self, depth: int, stage: int = 3, **kwargs: Any) -> None:
        super().__init__(depth, stage=stage, **kwargs)
        block = ResNet.arch_settings[depth][0]
        channels = 64 * 2**stage * block.expansion
        _, norm = build_norm_layer(self.norm_cfg, channels)
        self.add_module("norm", norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the residual stage, then the extra norm."""
        return self.norm(super().forward(x))


# Guarded so that importing this module twice (as custom_imports and from the entry point, or
# under two names) does not hit the registry's duplicate-name error.
if MODELS.get("ResLayerExtraNorm") is None:
    MODELS.register_module(name="ResLayerExtraNorm", module=_ResLayerExtraNorm)
ResLayerExtraNorm = MODELS.get("ResLayerExtraNorm")


class MetricsCapture(Hook):
    """Keeps the metrics of the last validation / test epoch (``runner.train()`` returns none)."""

    priority = "LOWEST"

    def __init__(self) -> None:
        self.metrics: Optional[Dict[str, float]] = None

    def after_val_epoch(self, runner, metrics: Optional[Dict[str, float]] = None) -> None:
        """Store the validation metrics."""
        if metrics:
            self.metrics = dict(metrics)

    def after_test_epoch(self, runner, metrics: Optional[Dict[str, float]] = None) -> None:
        """Store the test metrics."""
        if metrics:
            self.metrics = dict(metrics)


def _walk(node: Any, path: str, visit: Callable[[dict, str], None]) -> None:
    if isinstance(node, dict):
        visit(node, path)
        for key, value in node.items():
            _walk(value, f"{path}.{key}" if path else str(key), visit)
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            _walk(value, f"{path}[{i}]", visit)


def single_process_norm(cfg: Config) -> List[str]:
    """Replace SyncBN by BN in the model config, in place (one process: they are the same).

    ``nn.SyncBatchNorm`` needs an initialised process group to synchronise; on one process its
    statistics are those of plain BatchNorm, and the parameter names are the same.

    Args:
        cfg: an mmengine Config with a ``model`` entry.

    Returns:
        The dotted paths of the norm configs that were changed.
    """
    changed: List[str] = []

    def visit(node: dict, path: str) -> None:
        if node.get("type") in ("SyncBN", "MMSyncBN"):
            node["type"] = "BN"
            changed.append(path)

    _walk(cfg.model, "model", visit)
    return changed


def pretrained_checkpoints(cfg: Config) -> Dict[str, Optional[str]]:
    """Return the ``init_cfg`` entries of type Pretrained in the model: path -> checkpoint.

    Args:
        cfg: an mmengine Config.

    Returns:
        Dotted path of each init_cfg -> its checkpoint (None when unset).
    """
    found: Dict[str, Optional[str]] = {}

    def visit(node: dict, path: str) -> None:
        init = node.get("init_cfg")
        items = init if isinstance(init, (list, tuple)) else [init]
        for i, item in enumerate(items):
            if isinstance(item, dict) and item.get("type") == "Pretrained":
                key = f"{path}.init_cfg" + (f"[{i}]" if isinstance(init, (list, tuple)) else "")
                found[key] = item.get("checkpoint")

    _walk(cfg.model, "model", visit)
    return found


def set_pretrained_checkpoint(cfg: Config, checkpoint: str) -> List[str]:
    """Point every Pretrained ``init_cfg`` of the model at one checkpoint file, in place.

    Args:
        cfg: an mmengine Config.
        checkpoint: the weights file.

    Returns:
        The dotted paths of the init_cfg entries that were set.
    """
    changed: List[str] = []

    def visit(node: dict, path: str) -> None:
        init = node.get("init_cfg")
        items = init if isinstance(init, (list, tuple)) else [init]
        for item in items:
            if isinstance(item, dict) and item.get("type") == "Pretrained":
                item["checkpoint"] = checkpoint
                changed.append(f"{path}.init_cfg")

    _walk(cfg.model, "model", visit)
    return changed


def _history_buffer_getattr(obj: Any, name: str) -> Any:
    """``getattr`` as a checkpoint may use it: only HistoryBuffer's own statistics methods.

    mmengine's ``HistoryBuffer`` keeps its statistics functions (min, max, mean, current) in a
    dict that pickle stores as ``getattr(HistoryBuffer, "min")``. Allowing the real ``getattr``
    would let a file read any attribute of any object it can build; this one allows that lookup
    and nothing else.
    """
    if obj is HistoryBuffer and isinstance(vars(HistoryBuffer).get(name), FunctionType):
        if not name.startswith("_"):
            return getattr(obj, name)
    raise pickle.UnpicklingError(f"checkpoint asks for getattr({obj!r}, {name!r}): not allowed")


def checkpoint_safe_globals() -> List[Any]:
    """What a trained MMDetection checkpoint holds besides tensors, for weights-only loading.

    mmengine stores its message hub (``HistoryBuffer`` objects holding numpy arrays, numpy
    scalars, counters) in every checkpoint. Allowing exactly these lets
    ``torch.load(weights_only=True)`` read such a checkpoint for ``--resume`` / ``--eval-only``
    without unpickling anything else; ``getattr`` is replaced by a version limited to
    HistoryBuffer's statistics methods.

    Returns:
        The list for ``torch.serialization.safe_globals``.
    """
    core = np._core if hasattr(np, "_core") else np.core  # numpy 2 / numpy 1
    allowed: List[Any] = [HistoryBuffer, np.ndarray, np.dtype, collections.Counter]
    for mod in ("numpy._core.multiarray", "numpy.core.multiarray"):
        allowed.append((core.multiarray._reconstruct, f"{mod}._reconstruct"))
        allowed.append((core.multiarray.scalar, f"{mod}.scalar"))
    for name in ("float64", "float32", "float16", "int64", "int32", "int16", "int8", "uint8"):
        allowed.append(type(np.dtype(name)))
    allowed.append(type(np.dtype(bool)))
    for path in ("builtins.getattr", "__builtin__.getattr"):
        allowed.append((_history_buffer_getattr, path))
    return allowed

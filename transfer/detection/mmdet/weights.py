"""Torchvision ResNet weights -> MMDetection weights (naming, checkpoint writer, safe reader).

This module does not import MMDetection, mmcv or mmengine: conversion runs and is tested anywhere.

MMDetection's ``ResNet`` uses torchvision's parameter names (``conv1``, ``bn1``, ``layerN.M.convK``,
``bnK``, ``downsample.0/1``), so the conversion only places each tensor under the model prefix
where the detector holds it. In the C4 layout (Mask / Faster R-CNN R50-C4) the backbone has three
stages and the fourth one is the ROI head's shared head:

- ``conv1``, ``bn1``, ``layer1``..``layer3`` -> ``backbone.*``
- ``layer4`` -> ``roi_head.shared_head.layer4.*`` (mmdet's ``ResLayer`` names its stage
  ``layer{stage + 1}``)

The file is ``{"state_dict": {...}, "meta": {...}}`` of tensors and plain values only, so it loads
with ``torch.load(weights_only=True)``. The names are those of the whole detector, so the same
file works three ways: ``init_cfg=dict(type='Pretrained', checkpoint=F, prefix='backbone.')`` on
the backbone, ``prefix='roi_head.shared_head.'`` on the shared head (mmengine strips the prefix
and loads the rest non-strictly), or ``load_from=F`` for the whole model.
"""

from __future__ import annotations

import os
import pickle
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import torch

from pretrain.errors import IMSVDError
from pretrain.fileio import atomic_write
from transfer.detection.conversion import (
    ConversionReport,
    backbone_entries,
    check_output,
    check_stages,
    fp32_cpu,
)
from transfer.detection.resnet_keys import (
    infer_depth,
    is_backbone_key,
    split_prefixed,
    stage_of,
)

__all__ = [
    "MMDetWeightsError",
    "MMDetConversionReport",
    "LAYOUTS",
    "FORMAT",
    "FORMAT_VERSION",
    "depth_of_arch",
    "convert_torchvision_to_mmdet",
    "write_mmdet_checkpoint",
    "read_mmdet_weights",
    "check_depth",
]

FORMAT = "imsvd-mmdet-resnet"
FORMAT_VERSION = 1

# Where each torchvision stage goes in the detector, per layout.
LAYOUTS: Dict[str, Dict[str, str]] = {
    # Mask / Faster R-CNN C4: res5 (layer4) is the ROI head's shared head.
    "c4": {
        "stem": "backbone.",
        "layer1": "backbone.",
        "layer2": "backbone.",
        "layer3": "backbone.",
        "layer4": "roi_head.shared_head.",
    },
    # Four-stage backbones (FPN detectors, RetinaNet, ...).
    "backbone": {s: "backbone." for s in ("stem", "layer1", "layer2", "layer3", "layer4")},
}

# File suffixes read as plain pickles by other tools; never unpickled here.
_PICKLE_SUFFIXES = (".pkl", ".pickle")


class MMDetWeightsError(IMSVDError, ValueError):
    """Raised when weights cannot be converted, written or safely read."""


@dataclass
class MMDetConversionReport(ConversionReport):
    """What a conversion to MMDetection did (``converted`` and ``dropped`` as every report).

    Attributes:
        tensors: of the converted ones, weights and norm statistics (the rest:
            num_batches_tracked).
        prefix_counts: model prefix ("backbone.", "roi_head.shared_head.") -> number of tensors.
        stage_values: torchvision stage -> number of values.
    """

    tensors: int = 0
    prefix_counts: Dict[str, int] = field(default_factory=dict)
    stage_values: Dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        """Return a short multi-line human-readable summary."""
        counters = self.converted - self.tensors
        lines = [
            f"converted {self.converted} tensors ({self.tensors} weights and norm statistics, "
            f"{counters} num_batches_tracked counters)"
        ]
        lines += [f"  {p + '*':<24} {n:>4d} tensors" for p, n in self.prefix_counts.items()]
        lines += self.values_lines(self.stage_values, 7) + [self.dropped_line()]
        return "\n".join(lines)


def depth_of_arch(arch: str) -> int:
    """Return the ResNet depth of an arch name ("resnet50" -> 50).

    Raises:
        MMDetWeightsError: for names that are not torchvision ResNets.
    """
    if not arch.startswith("resnet") or not arch[len("resnet") :].isdigit():
        raise MMDetWeightsError(f"arch {arch!r} is not a ResNet (expected e.g. 'resnet50')")
    return int(arch[len("resnet") :])


def _tensor(name: str, value: Any) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise MMDetWeightsError(f"key {name!r}: expected a tensor, got {type(value).__name__}")
    return fp32_cpu(value).clone().contiguous()


def convert_torchvision_to_mmdet(
    state_dict: Mapping[str, Any], layout: str = "c4"
) -> Tuple["OrderedDict[str, torch.Tensor]", MMDetConversionReport]:
    """Place a torchvision ResNet backbone state_dict under MMDetection's model prefixes.

    Strict: ``fc.*`` and ``projector.*`` are dropped deliberately (and reported); BatchNorm
    ``num_batches_tracked`` buffers are kept (mmdet's norms have them); any other key that is not
    a ResNet backbone tensor is an error, as is a state_dict without a stem or any stage.

    Args:
        state_dict: torchvision-named tensors (as returned by pretrain.checkpoint.load_backbone).
        layout: "c4" (layer4 in the ROI shared head) or "backbone" (all four stages).

    Returns:
        (state_dict, report): detector name -> float32 tensor (counters stay int64), in source
        order; and a report.

    Raises:
        MMDetWeightsError: on unknown keys, an incomplete backbone or an unknown layout.
    """
    if layout not in LAYOUTS:
        raise MMDetWeightsError(f"layout {layout!r} unknown (choose from {sorted(LAYOUTS)})")
    prefixes = LAYOUTS[layout]
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    report = MMDetConversionReport()
    keep = ("num_batches_tracked",)
    for key, value in backbone_entries(state_dict, report, MMDetWeightsError, keep=keep):
        stage = stage_of(key)
        prefix = prefixes[stage]
        tensor = _tensor(key, value)
        out[prefix + key] = tensor
        report.prefix_counts[prefix] = report.prefix_counts.get(prefix, 0) + 1
        if not key.endswith("num_batches_tracked"):
            report.tensors += 1
            report.stage_values[stage] = report.stage_values.get(stage, 0) + int(tensor.numel())
    check_stages(list(state_dict), len(out), MMDetWeightsError)
    report.converted = len(out)
    return out, report


def write_mmdet_checkpoint(
    state_dict: Mapping[str, torch.Tensor],
    meta: Mapping[str, Any],
    path: str,
    force: bool = False,
) -> None:
    """Write ``{"state_dict": ..., "meta": ...}`` atomically (``pretrain.fileio.atomic_write``).

    Args:
        state_dict: detector name -> tensor.
        meta: plain values only (str, int, float, bool, None, lists/dicts of those).
        path: output file (``.pth``).
        force: overwrite an existing file.

    Raises:
        MMDetWeightsError: if the output exists and force is False, its folder is missing, or
            meta holds a value that weights_only loading would refuse.
    """
    path = check_output(path, force, MMDetWeightsError)
    _check_plain(meta, "meta")
    payload = {"state_dict": OrderedDict(state_dict), "meta": dict(meta)}
    atomic_write(path, lambda f: torch.save(payload, f), make_parents=False)


def _check_plain(value: Any, where: str) -> None:
    if value is None or isinstance(value, (str, int, float, bool)):
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise MMDetWeightsError(f"{where}: key {k!r} is not a string")
            _check_plain(v, f"{where}.{k}")
        return
    raise MMDetWeightsError(f"{where}: {type(value).__name__} is not a plain value")


def read_mmdet_weights(
    path: str, safe_globals: Sequence[Any] = ()
) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Read an MMDetection-named weight file without running code from it.

    ``.pkl`` / ``.pickle`` files are refused (unpickling can execute arbitrary code); anything
    else is read with ``torch.load(weights_only=True)``, which only rebuilds tensors, plain
    containers and the classes listed in ``safe_globals`` (e.g. mmengine's log buffers stored in
    a trained checkpoint).

    Args:
        path: a converted file (tools/convert_to_mmdet.py) or an MMDetection checkpoint.
        safe_globals: extra classes / functions the loader may rebuild.

    Returns:
        (state_dict, meta): the tensors (``state_dict`` entry, or the top level when it is a
        bare state_dict) and the ``meta`` entry ({} when absent).

    Raises:
        MMDetWeightsError: unreadable, refused or tensor-less files, naming the path.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise MMDetWeightsError(f"weights {path!r} is a directory, not a checkpoint file")
    if not os.path.isfile(path):
        raise MMDetWeightsError(f"weights file {path!r} does not exist")
    if path.lower().endswith(_PICKLE_SUFFIXES):
        raise MMDetWeightsError(
            f"{path}: pickle files are not read (unpickling can run arbitrary code); convert "
            "the backbone with tools/convert_to_mmdet.py into a .pth file"
        )
    try:
        if safe_globals:
            with torch.serialization.safe_globals(list(safe_globals)):
                obj = torch.load(path, map_location="cpu", weights_only=True)
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, EOFError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MMDetWeightsError(
            f"{path}: refused by the safe loader (torch.load weights_only=True): {first}"
        ) from exc
    if not isinstance(obj, Mapping):
        raise MMDetWeightsError(f"{path}: expected a dict, got {type(obj).__name__}")
    sd = obj.get("state_dict", obj)
    if not isinstance(sd, Mapping):
        raise MMDetWeightsError(f"{path}: 'state_dict' is a {type(sd).__name__}, not a dict")
    tensors = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if "state_dict" not in obj and len(tensors) != len(sd):
        others = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)][:5]
        raise MMDetWeightsError(
            f"{path}: neither a 'state_dict' entry nor a bare state_dict (non-tensor keys {others})"
        )
    if not tensors:
        raise MMDetWeightsError(f"{path}: no tensors found")
    meta = obj.get("meta", {}) if "state_dict" in obj else {}
    return dict(tensors), dict(meta) if isinstance(meta, Mapping) else {}


def check_depth(
    state_dict: Mapping[str, torch.Tensor],
    meta: Mapping[str, Any],
    depth: int,
    path: str,
    prefixes: Optional[Mapping[str, str]] = None,
) -> int:
    """Check that weights hold the ResNet depth a config builds.

    Both the recorded ``meta["depth"]`` / ``meta["arch"]`` (when present) and the depth inferred
    from the block counts must agree with ``depth``.

    Args:
        state_dict: detector-named tensors.
        meta: the file's meta.
        depth: the config's backbone depth.
        path: the file (for messages).
        prefixes: detector prefix -> stripped prefix for the ResNet tensors (default: the C4
            backbone and shared head).

    Returns:
        The number of ResNet tensors found.

    Raises:
        MMDetWeightsError: on a mismatch or when no ResNet tensors are found.
    """
    if prefixes is None:
        prefixes = {"backbone.": "", "roi_head.shared_head.": ""}
    recorded = meta.get("depth")
    if recorded is None and isinstance(meta.get("arch"), str):
        recorded = depth_of_arch(meta["arch"])
    if recorded is not None and int(recorded) != int(depth):
        raise MMDetWeightsError(
            f"{path}: weights record arch {meta.get('arch', '?')} (depth {recorded}) but the "
            f"config builds a ResNet-{depth}"
        )
    resnet = split_prefixed(state_dict, prefixes)
    resnet = {k: v for k, v in resnet.items() if is_backbone_key(k)}
    if not resnet:
        raise MMDetWeightsError(
            f"{path}: no ResNet tensors under {', '.join(repr(p) for p in prefixes)}"
        )
    inferred = infer_depth(list(resnet))
    if inferred is not None and inferred != int(depth):
        raise MMDetWeightsError(
            f"{path}: the weights hold a ResNet-{inferred} (block counts) but the config builds "
            f"a ResNet-{depth}"
        )
    return len(resnet)

"""Torchvision ResNet weights -> Detectron2 weights (key renaming and pickle writer).

This module does not import Detectron2: the conversion runs and is tested anywhere.

Output names carry no model prefix ("stem.conv1.weight", "res5.2.conv3.norm.running_var"), and
the pickle sets ``matching_heuristics: True``. Detectron2's checkpointer then aligns each model
key with the longest checkpoint key that is a dot-separated suffix of it, so the same file loads
into every layout of a ResNet in Detectron2:

- R50-C4: ``backbone.res2..res4`` and ``roi_heads.res5`` (res5 lives in the ROI head);
- R50-FPN: ``backbone.bottom_up.stem`` / ``backbone.bottom_up.res2..res5``.

The extra norm of the Res5ROIHeadsExtraNorm head (``roi_heads.res5.norm``) has no suffix among
these names, so it keeps its fresh initialisation like the other untrained heads.
"""

from __future__ import annotations

import os
import pickle
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch

from pretrain.checkpoint import atomic_write

__all__ = [
    "D2ConversionError",
    "ConversionReport",
    "torchvision_key_to_d2",
    "convert_torchvision_to_d2",
    "write_d2_pickle",
    "read_d2_pickle",
]

D2_AUTHOR = "IMSVD"

# Keys that are dropped on purpose, by category. Anything not dropped must map.
_DROP_PATTERNS: Tuple[Tuple[str, "re.Pattern[str]"], ...] = (
    ("num_batches_tracked", re.compile(r"(^|\.)num_batches_tracked$")),
    ("fc", re.compile(r"^fc\.")),
    ("projector", re.compile(r"^projector\.")),
)

_BN_PARAM = r"(weight|bias|running_mean|running_var)"
_STEM_CONV = re.compile(r"^conv1\.weight$")
_STEM_BN = re.compile(rf"^bn1\.{_BN_PARAM}$")
_BLOCK_CONV = re.compile(r"^layer([1-4])\.(\d+)\.conv(\d)\.weight$")
_BLOCK_BN = re.compile(rf"^layer([1-4])\.(\d+)\.bn(\d)\.{_BN_PARAM}$")
_SHORTCUT_CONV = re.compile(r"^layer([1-4])\.(\d+)\.downsample\.0\.weight$")
_SHORTCUT_BN = re.compile(rf"^layer([1-4])\.(\d+)\.downsample\.1\.{_BN_PARAM}$")


class D2ConversionError(ValueError):
    """Raised when a state_dict cannot be converted or an output cannot be written."""


@dataclass
class ConversionReport:
    """What a conversion did.

    Attributes:
        converted: number of tensors written.
        dropped: category -> list of dropped source keys.
        stage_params: Detectron2 stage ("stem", "res2".."res5") -> number of parameters.
        shapes: a few representative output names -> shapes.
    """

    converted: int = 0
    dropped: Dict[str, List[str]] = field(default_factory=dict)
    stage_params: Dict[str, int] = field(default_factory=dict)
    shapes: Dict[str, Tuple[int, ...]] = field(default_factory=dict)

    def summary(self) -> str:
        """Return a short multi-line human-readable summary."""
        lines = [f"converted {self.converted} tensors"]
        for stage, n in self.stage_params.items():
            lines.append(f"  {stage:<5} {n:>12,d} values")
        if self.dropped:
            parts = [f"{cat} ({len(keys)})" for cat, keys in self.dropped.items()]
            lines.append("dropped: " + ", ".join(parts))
        else:
            lines.append("dropped: nothing")
        for name, shape in self.shapes.items():
            lines.append(f"  {name}: {tuple(shape)}")
        return "\n".join(lines)


def torchvision_key_to_d2(key: str) -> Optional[str]:
    """Rename one torchvision ResNet backbone key to its Detectron2 name.

    Args:
        key: a torchvision ResNet state_dict key without prefix ("layer1.0.bn2.weight").

    Returns:
        The Detectron2 name ("res2.0.conv2.norm.weight"), or None when the key is not a
        ResNet backbone tensor (callers decide whether that is an error).
    """
    if _STEM_CONV.match(key):
        return "stem.conv1.weight"
    m = _STEM_BN.match(key)
    if m:
        return f"stem.conv1.norm.{m.group(1)}"
    m = _BLOCK_CONV.match(key)
    if m:
        return f"res{int(m.group(1)) + 1}.{m.group(2)}.conv{m.group(3)}.weight"
    m = _BLOCK_BN.match(key)
    if m:
        return f"res{int(m.group(1)) + 1}.{m.group(2)}.conv{m.group(3)}.norm.{m.group(4)}"
    m = _SHORTCUT_CONV.match(key)
    if m:
        return f"res{int(m.group(1)) + 1}.{m.group(2)}.shortcut.weight"
    m = _SHORTCUT_BN.match(key)
    if m:
        return f"res{int(m.group(1)) + 1}.{m.group(2)}.shortcut.norm.{m.group(3)}"
    return None


def _to_numpy(name: str, value: object) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.float()  # Detectron2 trains in fp32; fp16/bf16 exports are widened
        return value.numpy().copy()
    if isinstance(value, np.ndarray):
        return value.astype(np.float32) if value.dtype.kind == "f" else value.copy()
    raise D2ConversionError(f"key {name!r}: expected a tensor, got {type(value).__name__}")


def convert_torchvision_to_d2(
    state_dict: Mapping[str, object],
) -> Tuple["OrderedDict[str, np.ndarray]", ConversionReport]:
    """Convert a torchvision ResNet backbone state_dict to Detectron2 names and numpy arrays.

    Strict: ``num_batches_tracked``, ``fc.*`` and ``projector.*`` are dropped deliberately (and
    reported); any other key that is not a ResNet backbone tensor is an error, as is a state_dict
    without a stem or without all four stages.

    Args:
        state_dict: torchvision-named tensors (as returned by pretrain.checkpoint.load_backbone).

    Returns:
        (blobs, report): Detectron2 name -> float32 array, in source order; and a report.

    Raises:
        D2ConversionError: on keys that cannot be mapped or an incomplete backbone.
    """
    blobs: "OrderedDict[str, np.ndarray]" = OrderedDict()
    report = ConversionReport()
    unknown: List[str] = []
    for key, value in state_dict.items():
        category = next((cat for cat, pat in _DROP_PATTERNS if pat.search(key)), None)
        if category is not None:
            report.dropped.setdefault(category, []).append(key)
            continue
        new = torchvision_key_to_d2(key)
        if new is None:
            unknown.append(key)
            continue
        if new in blobs:  # cannot happen with the patterns above; guards future edits
            raise D2ConversionError(f"key {key!r}: target name {new!r} produced twice")
        arr = _to_numpy(key, value)
        blobs[new] = arr
        stage = new.split(".", 1)[0]
        report.stage_params[stage] = report.stage_params.get(stage, 0) + int(arr.size)
    if unknown:
        shown = ", ".join(repr(k) for k in unknown[:8])
        more = f" (+{len(unknown) - 8} more)" if len(unknown) > 8 else ""
        raise D2ConversionError(
            f"{len(unknown)} key(s) are not torchvision ResNet backbone tensors: {shown}{more}. "
            "Expected names like 'conv1.weight', 'layer1.0.bn1.weight' (no 'module.' prefix)."
        )
    present = {name.split(".", 1)[0] for name in blobs}
    missing_stages = [s for s in ("stem", "res2", "res3", "res4", "res5") if s not in present]
    if missing_stages:
        raise D2ConversionError(
            f"incomplete ResNet backbone: no tensors for {', '.join(missing_stages)} "
            f"(got {len(blobs)} backbone tensors)"
        )
    report.converted = len(blobs)
    for name in ("stem.conv1.weight", "res2.0.conv1.weight", "res5.0.shortcut.weight"):
        if name in blobs:
            report.shapes[name] = tuple(blobs[name].shape)
    last = next(reversed(blobs))
    report.shapes[last] = tuple(blobs[last].shape)
    return blobs, report


def write_d2_pickle(
    blobs: Mapping[str, np.ndarray],
    path: str,
    force: bool = False,
    author: str = D2_AUTHOR,
) -> None:
    """Write Detectron2's weight pickle atomically (``pretrain.checkpoint.atomic_write``).

    The file is ``{"model": blobs, "__author__": author, "matching_heuristics": True}``: with an
    ``__author__`` Detectron2 takes the names as its own (otherwise it assumes Caffe2 names), and
    the heuristics match them by suffix (see the module docstring).

    Args:
        blobs: Detectron2 name -> numpy array.
        path: output file (normally ``.pkl``).
        force: overwrite an existing file.
        author: recorded in ``__author__``.

    Raises:
        D2ConversionError: if the output exists and force is False, or its folder is missing.
    """
    path = os.fspath(path)
    if os.path.exists(path) and not force:
        raise D2ConversionError(f"output {path!r} already exists (pass --force to overwrite)")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise D2ConversionError(f"output folder {folder!r} does not exist")
    payload = {"model": dict(blobs), "__author__": author, "matching_heuristics": True}
    atomic_write(
        path,
        lambda f: pickle.dump(payload, f, protocol=pickle.HIGHEST_PROTOCOL),
        make_parents=False,
    )


def read_d2_pickle(path: str) -> Dict[str, object]:
    """Read a Detectron2 weight pickle written by :func:`write_d2_pickle` (for checks and tests).

    Args:
        path: the ``.pkl`` file.

    Returns:
        The unpickled dict with keys "model", "__author__", "matching_heuristics".

    Raises:
        D2ConversionError: if the file is not such a pickle.
    """
    try:
        with open(path, "rb") as f:
            data = pickle.load(f, encoding="latin1")
    except (OSError, pickle.UnpicklingError, EOFError) as exc:
        raise D2ConversionError(f"cannot read Detectron2 weights {path!r}: {exc}") from exc
    if not isinstance(data, dict) or "model" not in data or "__author__" not in data:
        raise D2ConversionError(f"{path!r} is not a Detectron2 weight pickle with '__author__'")
    return data

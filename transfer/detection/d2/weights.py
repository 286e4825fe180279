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
from typing import Dict, Mapping, Optional, Tuple

import numpy as np
import torch

from pretrain.checkpoint import CheckpointError, read_torch_file, read_weights_pickle
from pretrain.errors import IMSVDError
from pretrain.fileio import atomic_write

# The key rules (what is a backbone tensor, what is dropped on purpose) and the walk over them
# are shared with the MMDetection exporter; the renaming below is Detectron2's own.
from transfer.detection import resnet_keys
from transfer.detection.conversion import (
    ConversionReport,
    backbone_entries,
    check_output,
    check_stages,
    fp32_cpu,
)

__all__ = [
    "D2ConversionError",
    "D2ConversionReport",
    "torchvision_key_to_d2",
    "convert_torchvision_to_d2",
    "write_d2_pickle",
    "read_d2_pickle",
    "read_d2_weights",
    "check_arch",
    "check_trunk_loaded",
]

D2_AUTHOR = "IMSVD"


class D2ConversionError(IMSVDError, ValueError):
    """Raised when a state_dict cannot be converted or an output cannot be written."""


@dataclass
class D2ConversionReport(ConversionReport):
    """What a conversion to Detectron2 did (``converted`` and ``dropped`` as every report).

    Attributes:
        stage_params: Detectron2 stage ("stem", "res2".."res5") -> number of parameters.
        shapes: a few representative output names -> shapes.
    """

    stage_params: Dict[str, int] = field(default_factory=dict)
    shapes: Dict[str, Tuple[int, ...]] = field(default_factory=dict)

    def summary(self) -> str:
        """Return a short multi-line human-readable summary."""
        lines = [f"converted {self.converted} tensors"]
        lines += self.values_lines(self.stage_params, 5) + [self.dropped_line()]
        lines += [f"  {name}: {tuple(shape)}" for name, shape in self.shapes.items()]
        return "\n".join(lines)


def torchvision_key_to_d2(key: str) -> Optional[str]:
    """Rename one torchvision ResNet backbone key to its Detectron2 name.

    Args:
        key: a torchvision ResNet state_dict key without prefix ("layer1.0.bn2.weight").

    Returns:
        The Detectron2 name ("res2.0.conv2.norm.weight"), or None when the key is not a
        ResNet backbone tensor (callers decide whether that is an error).
    """
    if resnet_keys.STEM_CONV.match(key):
        return "stem.conv1.weight"
    m = resnet_keys.STEM_BN.match(key)
    if m:
        return f"stem.conv1.norm.{m.group(1)}"
    m = resnet_keys.BLOCK_CONV.match(key)
    if m:
        return f"res{int(m.group(1)) + 1}.{m.group(2)}.conv{m.group(3)}.weight"
    m = resnet_keys.BLOCK_BN.match(key)
    if m:
        return f"res{int(m.group(1)) + 1}.{m.group(2)}.conv{m.group(3)}.norm.{m.group(4)}"
    m = resnet_keys.SHORTCUT_CONV.match(key)
    if m:
        return f"res{int(m.group(1)) + 1}.{m.group(2)}.shortcut.weight"
    m = resnet_keys.SHORTCUT_BN.match(key)
    if m:
        return f"res{int(m.group(1)) + 1}.{m.group(2)}.shortcut.norm.{m.group(3)}"
    return None


def _d2_stage(stage: str) -> str:
    """Detectron2's name of a torchvision stage: "stem", "layer1".."layer4" -> "res2".."res5"."""
    return stage if stage == "stem" else f"res{int(stage[len('layer'):]) + 1}"


def _to_numpy(name: str, value: object) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return fp32_cpu(value).numpy().copy()
    if isinstance(value, np.ndarray):
        return value.astype(np.float32) if value.dtype.kind == "f" else value.copy()
    raise D2ConversionError(f"key {name!r}: expected a tensor, got {type(value).__name__}")


def convert_torchvision_to_d2(
    state_dict: Mapping[str, object],
) -> Tuple["OrderedDict[str, np.ndarray]", D2ConversionReport]:
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
    report = D2ConversionReport()
    converted = []
    for key, value in backbone_entries(state_dict, report, D2ConversionError):
        new = torchvision_key_to_d2(key)
        if new in blobs:  # cannot happen with the patterns above; guards future edits
            raise D2ConversionError(f"key {key!r}: target name {new!r} produced twice")
        arr = _to_numpy(key, value)
        blobs[new] = arr
        converted.append(key)
        stage = new.split(".", 1)[0]
        report.stage_params[stage] = report.stage_params.get(stage, 0) + int(arr.size)
    check_stages(converted, len(blobs), D2ConversionError, _d2_stage)
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
    extra: Optional[Mapping[str, object]] = None,
) -> None:
    """Write Detectron2's weight pickle atomically (``pretrain.fileio.atomic_write``).

    The file is ``{"model": blobs, "__author__": author, "matching_heuristics": True}``: with an
    ``__author__`` Detectron2 takes the names as its own (otherwise it assumes Caffe2 names), and
    the heuristics match them by suffix (see the module docstring).

    Args:
        blobs: Detectron2 name -> numpy array.
        path: output file (normally ``.pkl``).
        force: overwrite an existing file.
        author: recorded in ``__author__``.
        extra: additional top-level entries (plain str/int values), e.g. ``arch`` and ``stem``
            of the source backbone; Detectron2 ignores them, ``train_net.py`` checks them.

    Raises:
        D2ConversionError: if the output exists and force is False, its folder is missing, or
            ``extra`` would replace one of Detectron2's own entries.
    """
    path = check_output(path, force, D2ConversionError)
    payload = {"model": dict(blobs), "__author__": author, "matching_heuristics": True}
    clash = sorted(set(extra or {}) & set(payload))
    if clash:
        raise D2ConversionError(f"extra entries {clash} would replace Detectron2's own entries")
    payload.update(extra or {})
    atomic_write(
        path,
        lambda f: pickle.dump(payload, f, protocol=pickle.HIGHEST_PROTOCOL),
        make_parents=False,
    )


def read_d2_pickle(path: str) -> Dict[str, object]:
    """Read a Detectron2 weight pickle written by :func:`write_d2_pickle` without running code.

    Args:
        path: the ``.pkl`` file.

    Returns:
        The unpickled dict with keys "model", "__author__", "matching_heuristics" (and the
        ``extra`` entries of the writer).

    Raises:
        D2ConversionError: if the file is unreadable, holds anything but plain data and numpy
            arrays, or is not such a pickle.
    """
    try:
        data = read_weights_pickle(path)
    except CheckpointError as exc:
        raise D2ConversionError(f"cannot read Detectron2 weights {path!r}: {exc}") from None
    if not isinstance(data, dict) or "model" not in data or "__author__" not in data:
        raise D2ConversionError(f"{path!r} is not a Detectron2 weight pickle with '__author__'")
    return data


D2_ACCEPTED = (
    "a .pkl written by tools/convert_to_d2.py",
    "a Detectron2 model-zoo .pkl ({'model': ..., '__author__': ...} or Caffe2 blobs)",
    "a Detectron2 training checkpoint (model_final.pth, model_XXXXXXX.pth)",
)


def read_d2_weights(path: str, allow_unsafe: bool = False) -> Tuple[Dict[str, object], str]:
    """Read MODEL.WEIGHTS the way Detectron2 would, but without executing code from the file.

    ``.pkl`` files go through the restricted unpickler (numpy arrays and plain data only);
    other files through ``pretrain.checkpoint.read_torch_file``. With ``allow_unsafe`` a
    refused ``.pkl`` is unpickled fully (trusted files only).

    Args:
        path: the weights file.
        allow_unsafe: permit a full unpickle of a trusted file the safe readers refuse.

    Returns:
        ``(checkpoint, label)``: the dict Detectron2's checkpointer expects (``model`` plus
        ``__author__`` / ``matching_heuristics`` for pickles) and a description of what was read.

    Raises:
        D2ConversionError: refused or unreadable file (the accepted inputs are listed).
    """
    path = os.fspath(path)
    accepted = "; ".join(D2_ACCEPTED)
    try:
        if path.endswith(".pkl"):
            try:
                data = read_weights_pickle(path)
            except CheckpointError:
                if not allow_unsafe:
                    raise
                with open(path, "rb") as f:
                    data = pickle.load(f, encoding="latin1")
        else:
            data, _ = read_torch_file(path, "cpu", allow_unsafe)
    except CheckpointError as exc:
        raise D2ConversionError(
            f"{exc}\nMODEL.WEIGHTS must be one of: {accepted}. A trusted file that holds other "
            "Python objects loads with --allow-unsafe."
        ) from None
    if not isinstance(data, dict):
        raise D2ConversionError(
            f"{path}: holds a {type(data).__name__}, not a dict of weights; expected {accepted}"
        )
    if path.endswith(".pkl"):
        if "model" in data and "__author__" in data:
            author = data["__author__"]
            if "arch" in data:
                label = (
                    f"Detectron2 weights converted by {author} (arch {data['arch']}, stem "
                    f"{data.get('stem')}, from {data.get('source_format', '?')})"
                )
            else:
                label = f"Detectron2 weights pickle (author {author!r})"
            return data, label
        # Caffe2 model-zoo layout: the blobs, without the solver's momentum buffers
        blobs = data.get("blobs", data)
        blobs = {k: v for k, v in blobs.items() if not str(k).endswith("_momentum")}
        ckpt = {"model": blobs, "__author__": "Caffe2", "matching_heuristics": True}
        return ckpt, "Detectron2 weights pickle with Caffe2 names"
    if "model" not in data:
        data = {"model": data}
    return data, f"PyTorch checkpoint (.pth, {len(data['model'])} model entries)"


ARCH_DEPTH = {"resnet18": 18, "resnet34": 34, "resnet50": 50, "resnet101": 101}


def check_arch(data: Mapping[str, object], depth: int, path: str) -> None:
    """Refuse converted weights whose recorded arch / stem the config cannot hold.

    Args:
        data: the checkpoint from :func:`read_d2_weights`.
        depth: ``cfg.MODEL.RESNETS.DEPTH``.
        path: the weights file (for the message).

    Raises:
        D2ConversionError: recorded arch with another depth, or a stem other than "standard".
    """
    arch = data.get("arch")
    if arch is None:
        return
    if ARCH_DEPTH.get(str(arch)) != int(depth):
        raise D2ConversionError(
            f"{path} holds a {arch} backbone (recorded by tools/convert_to_d2.py) but the config "
            f"builds MODEL.RESNETS.DEPTH {depth}: most of its tensors would not fit. Convert a "
            f"ResNet-{depth} or use a config for {arch} (MODEL.RESNETS.DEPTH "
            f"{ARCH_DEPTH.get(str(arch), '?')})."
        )
    stem = data.get("stem", "standard")
    if stem != "standard":
        raise D2ConversionError(f"{path}: backbone stem is {stem!r}; Detectron2 needs 'standard'")


_TRUNK_KEY = re.compile(r"(^|\.)(stem|res[2-5])\.")
_NOT_TRUNK_KEY = re.compile(r"(^|\.)res5\.norm\.|num_batches_tracked$")


def check_trunk_loaded(missing_keys, incorrect_shapes, path: str) -> None:
    """Error when loading MODEL.WEIGHTS left a ResNet trunk tensor out or met a shape mismatch.

    Detectron2 only logs these (and then trains from partly random weights). The trunk is every
    model key with a ``stem.`` / ``res2.``..``res5.`` component, except the extra norm after res5
    and BatchNorm counters; heads (RPN, box / mask predictors) may be missing.

    Args:
        missing_keys: model keys the checkpoint did not fill.
        incorrect_shapes: ``(key, checkpoint shape, model shape)`` triples.
        path: the weights file (for the message).

    Raises:
        D2ConversionError: listing the shape mismatches and missing trunk keys.
    """
    missing = [k for k in missing_keys if _TRUNK_KEY.search(k) and not _NOT_TRUNK_KEY.search(k)]
    if not missing and not incorrect_shapes:
        return
    parts = [f"{path} does not fit the model built by the config:"]
    if incorrect_shapes:
        shown = "; ".join(
            f"{k}: {tuple(a)} in the file vs {tuple(b)}" for k, a, b in incorrect_shapes[:8]
        )
        parts.append(f"shape mismatches ({len(incorrect_shapes)}): {shown}")
    if missing:
        more = f" (+{len(missing) - 12} more)" if len(missing) > 12 else ""
        parts.append(f"backbone keys not loaded ({len(missing)}): {', '.join(missing[:12])}{more}")
    parts.append("(a shape mismatch during suffix matching also leaves a key unloaded)")
    raise D2ConversionError("\n  ".join(parts))


def check_heads_loaded(missing_keys, incorrect_shapes, path: str) -> None:
    """Error when weights to be EVALUATED leave detector tensors (heads included) unloaded.

    A converted backbone has no RPN, box or mask heads: Detectron2 would evaluate randomly
    initialised heads and report an AP near 0 with only a warning. For ``--eval-only`` every
    model tensor (BatchNorm counters aside) must come from the file, with its shape.

    Args:
        missing_keys: model keys the checkpoint did not fill.
        incorrect_shapes: ``(key, checkpoint shape, model shape)`` triples.
        path: the weights file (for the message).

    Raises:
        D2ConversionError: naming the missing parts (key prefixes, counted) and the mismatches.
    """
    missing = [k for k in missing_keys if not k.endswith("num_batches_tracked")]
    if not missing and not incorrect_shapes:
        return
    parts: dict[str, int] = {}
    for k in missing:
        prefix = ".".join(k.split(".")[:2])
        parts[prefix] = parts.get(prefix, 0) + 1
    named = ", ".join(f"{p} ({n} tensors)" for p, n in sorted(parts.items()))
    msg = f"--eval-only: {path} cannot be evaluated as it is:"
    if missing:
        msg += f" it has no trained weights for {named}"
    if incorrect_shapes:
        shown = "; ".join(
            f"{k}: {tuple(a)} in the file vs {tuple(b)}" for k, a, b in incorrect_shapes[:4]
        )
        msg += f"{';' if missing else ''} shapes differ ({len(incorrect_shapes)}): {shown}"
    raise D2ConversionError(
        msg + ". Evaluating it would score randomly initialised parts; fine-tune first "
        "(imsvd-d2-train without --eval-only) and evaluate its model_final.pth"
    )

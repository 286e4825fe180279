"""Format constants, the error type, the content hash and key-diff helpers of the checkpoints.

Nothing here reads or writes files; every other module of the package builds on these.
"""

from __future__ import annotations

import hashlib
import re
import sys
from collections import OrderedDict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from pretrain.errors import IMSVDError

TRAIN_STATE_FORMAT = "imsvd-train-state"
# v2 adds the content hash of the model + optimizer tensors (``sha256``); v1 files still load.
TRAIN_STATE_VERSION = 2
BACKBONE_FORMAT = "imsvd-backbone"
BACKBONE_VERSION = 1
HASH_SCHEME = "imsvd-tensor-sha256-v1"
TRAIN_HASH_SCHEME = "imsvd-train-sha256-v1"

CHECKPOINT_RE = re.compile(r"^checkpoint_e(\d{4,})_s(\d{8,})\.pth$")

REQUIRED_TRAIN_FIELDS = (
    "format",
    "format_version",
    "arch",
    "stem",
    "epoch",
    "step",
    "step_in_epoch",
    "model",
    "optimizer",
    "scaler",
    "rng",
    "config",
)
REQUIRED_BACKBONE_FIELDS = (
    "format",
    "format_version",
    "arch",
    "stem",
    "epoch",
    "config",
    "state_dict",
    "sha256",
)


class CheckpointError(IMSVDError, ValueError):
    """A checkpoint cannot be written or read (wrong format, missing keys, bad hash, ...).

    ``about_content``: the file's content was not understood, so the command lines add the list
    of accepted inputs to the message (:func:`pretrain.checkpoint.with_accepted_inputs`).
    """

    about_content = True


class CheckpointPathError(CheckpointError):
    """A path problem, not the content's: no such file, or an output that already exists."""

    about_content = False


def now_utc() -> str:
    """The current UTC time as ``YYYY-MM-DDTHH:MM:SSZ``."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def unwrap_model(model: nn.Module) -> nn.Module:
    """Return the plain module under DistributedDataParallel / DataParallel / torch.compile."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def strip_prefix(sd: Mapping[str, Any], prefix: str) -> "OrderedDict[str, Any]":
    """The entries of ``sd`` whose key starts with ``prefix``, with the prefix removed."""
    return OrderedDict((k[len(prefix) :], v) for k, v in sd.items() if k.startswith(prefix))


def fold_out_norm(sd: Mapping[str, Any]) -> "OrderedDict[str, Any]":
    """An PretrainModel state dict of the earlier layout in today's: the projector-output norm
    (``model.out_norm: bn``) that was stored as ``out_norm.*`` becomes the projector's last
    layer ``projector.<i>.*`` (i = one past the projector's last index). Other dicts are
    returned unchanged (as a copy).
    """
    out = OrderedDict(sd)
    if not any(k.startswith("out_norm.") for k in out):
        return out
    indices = [
        int(k.split(".")[1])
        for k in out
        if k.startswith("projector.") and k.split(".")[1].isdigit()
    ]
    last = max(indices, default=-1) + 1
    return OrderedDict(
        (f"projector.{last}.{k[len('out_norm.'):]}" if k.startswith("out_norm.") else k, v)
        for k, v in out.items()
    )


def is_tensor_dict(obj: Any) -> bool:
    """True for a non-empty mapping of str keys to tensors (a state_dict)."""
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def model_section(config: Any) -> Mapping[str, Any]:
    """The ``model`` section of a config dict, or an empty mapping."""
    if isinstance(config, Mapping) and isinstance(config.get("model"), Mapping):
        return config["model"]
    return {}


def check_version(obj: Mapping[str, Any], fmt: str, supported: int, path: Path) -> int:
    """Return the file's ``format_version``; error if invalid or newer than ``supported``."""
    v = obj.get("format_version")
    if type(v) is not int or v < 1:
        raise CheckpointError(f"{path}: format '{fmt}' with invalid format_version {v!r}")
    if v > supported:
        raise CheckpointError(
            f"{path}: format '{fmt}' version {v} was written by a newer release of this toolkit; "
            f"this reader supports versions 1..{supported}. Update the code to read it."
        )
    return v


def check_fields(obj: Mapping[str, Any], fields: Sequence[str], fmt: str, path: Path) -> None:
    """Error naming the required fields that ``obj`` lacks."""
    missing = [f for f in fields if f not in obj]
    if missing:
        raise CheckpointError(f"{path}: '{fmt}' checkpoint lacks required field(s) {missing}")


def fmt_keys(keys: Sequence[str], limit: int = 10) -> str:
    """Sorted keys joined by commas, at most ``limit`` of them (+N more)."""
    keys = sorted(keys)
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def diff_keys(
    got: Mapping[str, torch.Tensor], expected: Mapping[str, Any]
) -> tuple[list[str], list[str], list[str]]:
    """Missing keys, unexpected keys and 'key: got shape vs expected shape' mismatches."""
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    shapes = [
        f"{k}: {tuple(got[k].shape)} vs expected {tuple(expected[k].shape)}"
        for k in expected
        if k in got and tuple(got[k].shape) != tuple(expected[k].shape)
    ]
    return missing, unexpected, shapes


def key_error(prefix: str, missing: list, unexpected: list, shapes: list) -> CheckpointError:
    """A CheckpointError listing missing / unexpected keys and shape mismatches."""
    parts = [prefix]
    if missing:
        parts.append(f"missing keys ({len(missing)}): {fmt_keys(missing)}")
    if unexpected:
        parts.append(f"unexpected keys ({len(unexpected)}): {fmt_keys(unexpected)}")
    if shapes:
        parts.append(f"shape mismatches ({len(shapes)}): {'; '.join(shapes[:5])}")
    return CheckpointError("\n  ".join(parts))


def describe(obj: Any, limit: int = 8) -> str:
    """Short description of an unrecognised object for error messages."""
    if is_tensor_dict(obj):
        keys = [str(k) for k in list(obj.keys())[:limit]]
        return f"a dict of {len(obj)} tensors, e.g. {keys}"
    if isinstance(obj, Mapping):
        keys = list(obj.keys())
        parts = [f"a dict with {len(keys)} top-level keys {[str(k) for k in keys[:limit]]}"]
        for k in keys[:limit]:
            v = obj[k]
            if isinstance(v, Mapping) and v:
                sample = [str(x) for x in list(v.keys())[:4]]
                parts.append(f"'{k}' holds {len(v)} keys, e.g. {sample}")
        return "; ".join(parts)
    if isinstance(obj, torch.Tensor):
        return f"a bare tensor of shape {tuple(obj.shape)}"
    return f"an object of type {type(obj).__name__}"


def tensor_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Content hash of a state_dict (scheme ``imsvd-tensor-sha256-v1``, see the spec).

    For every key in sorted order (Unicode code points) the SHA-256 stream receives:
    the key in UTF-8, a NUL byte, the dtype name without ``torch.`` (e.g. ``float32``), a NUL,
    the shape as comma-separated decimal sizes (empty for a 0-d tensor), a NUL, and the tensor's
    elements in C order as little-endian raw bytes.

    Args:
        state_dict: mapping from names to tensors.

    Returns:
        The hexadecimal digest (64 characters).

    Raises:
        CheckpointError: if a value is not a tensor.
    """
    if sys.byteorder != "little":  # the raw bytes below are defined as little-endian
        raise NotImplementedError("tensor_sha256 is defined for little-endian hosts only")
    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key]
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"cannot hash state_dict entry '{key}': not a tensor")
        t = t.detach().cpu().contiguous()
        header = "{}\0{}\0{}\0".format(
            key, str(t.dtype).replace("torch.", ""), ",".join(str(s) for s in t.shape)
        )
        h.update(header.encode("utf-8"))
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def collect_tensors(obj: Any, prefix: str, out: "OrderedDict[str, torch.Tensor]") -> None:
    """Add every tensor nested in dicts / lists / tuples of ``obj`` to ``out``.

    Keys are the path of the tensor: ``prefix`` then each dict key or list index, joined by
    ``/`` (e.g. ``optimizer/state/3/momentum_buffer``).
    """
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            collect_tensors(v, f"{prefix}/{k}", out)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            collect_tensors(v, f"{prefix}/{i}", out)

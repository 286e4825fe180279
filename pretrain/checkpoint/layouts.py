"""What the readers of :mod:`pretrain.checkpoint.readers` share: finding the tensor dict of a
file's object (top level, or under ``model`` / ``state_dict``), removing a DDP ``module.``
prefix, dropping heads, renaming a CIFAR ResNet's shortcuts to torchvision's names."""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import Any, Mapping

import torch

from .common import is_tensor_dict, strip_prefix

TensorDict = "OrderedDict[str, torch.Tensor]"


def epoch_of(obj: Any) -> int | None:
    e = obj.get("epoch") if isinstance(obj, Mapping) else None
    return e if isinstance(e, int) and not isinstance(e, bool) else None


def tensor_section(obj: Any) -> tuple[str | None, Mapping[str, torch.Tensor] | None]:
    """The tensor dict at the top level, or under 'model' / 'state_dict': (wrapper, dict)."""
    if is_tensor_dict(obj):
        return None, obj
    if isinstance(obj, Mapping):
        for w in ("model", "state_dict"):
            if is_tensor_dict(obj.get(w)):
                return w, obj[w]
    return None, None


def unmodule(sd: Mapping[str, torch.Tensor], notes: list[str]) -> "OrderedDict[str, Any]":
    """Remove a DDP ``module.`` prefix carried by every key."""
    if sd and all(k.startswith("module.") for k in sd):
        notes.append("stripped the 'module.' prefix")
        return strip_prefix(sd, "module.")
    return OrderedDict(sd)


def unwrapped_keys(obj: Any) -> list[str]:
    """Keys of the unwrapped tensor dict (``module.`` removed), or [] when there is none."""
    _, sd = tensor_section(obj)
    return list(unmodule(sd, [])) if sd is not None else []


def drop_prefixed(
    sd: Mapping[str, Any], prefixes: tuple[str, ...], what: str, notes: list
) -> TensorDict:
    dropped = [k for k in sd if k.startswith(prefixes)]
    if dropped:
        notes.append(f"dropped {what} ({', '.join(dropped)})")
    return OrderedDict((k, v) for k, v in sd.items() if not k.startswith(prefixes))


def base_read(obj: Any) -> tuple[str | None, "OrderedDict[str, Any]", dict[str, Any]]:
    wrapper, sd = tensor_section(obj)
    meta: dict[str, Any] = {"epoch": epoch_of(obj), "config": None, "notes": []}
    return wrapper, unmodule(sd, meta["notes"]), meta


CIFAR_SHORTCUT = re.compile(r"^(layer\d+\.\d+\.)shortcut\.(\d+\..+)$")


def cifar_to_torchvision(sd: Mapping[str, Any], notes: list[str]) -> TensorDict:
    """Rename a CIFAR ResNet's ``shortcut.0/1`` to torchvision's ``downsample.0/1``."""
    out: "OrderedDict[str, Any]" = OrderedDict()
    renamed = 0
    for k, v in sd.items():
        m = CIFAR_SHORTCUT.match(k)
        if m:
            k = f"{m.group(1)}downsample.{m.group(2)}"
            renamed += 1
        out[k] = v
    if renamed:
        notes.append(f"renamed {renamed} CIFAR ResNet 'shortcut.*' keys to 'downsample.*'")
    return out

"""The checked ``torch.save`` of every checkpoint: plain content only, written atomically.

:func:`check_plain` refuses, before anything touches the disk, a value that
``torch.load(weights_only=True)`` would not load; :func:`atomic_torch_save` then writes through
:func:`pretrain.fileio.atomic_write` (temp file, fsync, rename).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from pretrain.fileio import atomic_write

from .common import CheckpointError

# Exact types (not isinstance) because numpy scalars subclass float/int yet are pickled as numpy
# objects, which torch.load(weights_only=True) refuses.
_PLAIN_TYPES = (str, int, float, bool, type(None), bytes, torch.Size, torch.dtype, torch.device)


def check_plain(obj: Any, where: str = "<root>") -> None:
    """Raise CheckpointError at the first value that ``torch.load(weights_only=True)`` refuses.

    Args:
        obj: the object to be saved.
        where: path of ``obj`` inside the saved object (used in the error).

    Raises:
        CheckpointError: naming the location and type of the first offending value.
    """
    if isinstance(obj, torch.Tensor):
        return
    t = type(obj)
    if t in _PLAIN_TYPES:
        return
    if t in (dict, OrderedDict):
        for k, v in obj.items():
            if type(k) not in (str, int):
                raise CheckpointError(
                    f"cannot save checkpoint: key {k!r} at {where} has type {t.__name__}; "
                    "only str/int keys are allowed"
                )
            check_plain(v, f"{where}[{k!r}]")
        return
    if t in (list, tuple):
        for i, v in enumerate(obj):
            check_plain(v, f"{where}[{i}]")
        return
    raise CheckpointError(
        f"cannot save checkpoint: value at {where} has type {t.__module__}.{t.__qualname__}; "
        "checkpoints hold only dicts, lists, str/int/float/bool/None and tensors so that they "
        "load with torch.load(weights_only=True) (convert numpy values with .tolist() or "
        "torch.as_tensor, and keep callables out of optimizer param_groups)"
    )


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` through :func:`atomic_write`, after checking ``obj`` is plain.

    The object is checked first (plain containers and tensors only, see :func:`check_plain`),
    so nothing touches the disk when it would not load with ``weights_only=True``.

    Args:
        obj: the object to save.
        path: destination file; parent folders are created.

    Returns:
        The destination path.
    """
    check_plain(obj)
    return atomic_write(path, lambda f: torch.save(obj, f))

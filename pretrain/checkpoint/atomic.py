"""The one atomic file writer of the project, and the checked ``torch.save`` built on it.

Every file the toolkit writes (checkpoints, configs, JSON results, feature caches, Detectron2
weight pickles, figures) goes through :func:`atomic_write`: a reader sees either the previous
complete file or the new complete file, never a partial one.
"""

from __future__ import annotations

import os
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import IO, Any, Callable

import torch

from .common import CheckpointError


def fsync_dir(directory: str | os.PathLike) -> None:
    """fsync a folder so that a rename inside it is durable (silently skipped where unsupported)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(
    path: str | os.PathLike,
    writer_fn: Callable[[IO], Any],
    *,
    mode: str = "wb",
    make_parents: bool = True,
) -> Path:
    """Write a file atomically: temp file in the same folder, fsync, rename, fsync the folder.

    ``writer_fn`` receives the open temporary file (``.<name>.<random>.tmp`` next to ``path``;
    ``f.name`` is its path) and writes the content. Then the file is flushed and fsync'ed, made
    0644, moved over ``path`` with os.replace, and the folder is fsync'ed. On any failure
    (including KeyboardInterrupt) the temporary file is removed and a previous file at ``path``
    is left untouched.

    Args:
        path: destination file.
        writer_fn: called once with the open file object.
        mode: "wb" (binary) or "w" (text, UTF-8).
        make_parents: create missing parent folders (else a missing folder is an OSError).

    Returns:
        The destination path.

    Raises:
        ValueError: for a mode other than "wb" / "w".
        Whatever ``writer_fn`` or the file system raises (after the cleanup).
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write: mode must be 'wb' or 'w', got {mode!r}")
    path = Path(path)
    if make_parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    os.close(fd)  # reopened by name so that ``f.name`` is the temporary file's path
    try:
        encoding = "utf-8" if mode == "w" else None
        with open(tmp, mode, encoding=encoding) as f:
            writer_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; outputs are ordinary shared files
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


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

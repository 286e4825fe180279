"""Plain file I/O, under every other module: the atomic writer, JSON and YAML.

* :func:`atomic_write`: every file the toolkit writes (checkpoints, configs, JSON results,
  feature caches, Detectron2 weight pickles, figures) goes through it, so a reader sees either
  the previous complete file or the new complete file, never a partial one; :func:`fsync_dir`
  makes a rename inside a folder durable;
* :func:`write_json_atomic` (results, metadata), with :func:`jsonable` for tensor and numpy
  scalars;
* :func:`yaml_load` / :func:`yaml_dump`: YAML read with the scalars of the YAML 1.2 core schema
  (the one rule of the config files and overrides), and written so that it reads back the same
  under that rule and PyYAML's.

Imports nothing of the project, and no torch: configs, logs and results are written without it.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import IO, Any, Callable

import yaml

__all__ = [
    "atomic_write",
    "fsync_dir",
    "jsonable",
    "write_json_atomic",
    "yaml_dump",
    "yaml_load",
]


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


# ------------------------------------------------------------------------------------ JSON


def jsonable(v: Any) -> Any:
    """A value JSON can hold: a tensor / numpy scalar as its Python number (an array as a list),
    a non-finite float as its text ("nan", "inf"); anything else unchanged."""
    if hasattr(v, "item") and callable(v.item):
        try:
            v = v.item()
        except (ValueError, RuntimeError):
            v = v.tolist()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def write_json_atomic(obj: Any, path: str | os.PathLike) -> None:
    """Write ``obj`` as indented JSON to ``path`` through :func:`atomic_write`.

    Values JSON cannot hold go through :func:`jsonable` (tensor and numpy scalars).
    """

    def write(f) -> None:
        json.dump(obj, f, indent=2, default=jsonable)
        f.write("\n")

    atomic_write(path, write, mode="w")


# ------------------------------------------------------------------------------------ YAML


class _Loader(yaml.SafeLoader):
    """YAML with the scalars of the YAML 1.2 core schema.

    PyYAML's SafeLoader follows YAML 1.1, where ``1:30`` is 90 (sexagesimal), ``010`` is 8
    (octal), ``1_000`` is 1000 and ``no`` / ``on`` are booleans. Here a plain scalar is an int
    only as ``[-+]?(0|[1-9][0-9]*)``, a float only in decimal / exponent form or ``.inf`` /
    ``.nan``, a bool only ``true`` / ``false``, null only ``null`` / ``~`` / empty; anything
    else is a string (so a number key given ``010`` or ``1:30`` is refused, never reread).
    """

    yaml_implicit_resolvers: dict = {}


_INT_RE = r"^[-+]?(?:0|[1-9][0-9]*)$"
_FLOAT_RE = (
    r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
)
_RESOLVERS = (
    ("tag:yaml.org,2002:bool", r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF"),
    ("tag:yaml.org,2002:null", r"^(?:~|null|Null|NULL|)$", ["~", "n", "N", ""]),
    ("tag:yaml.org,2002:int", _INT_RE, "-+0123456789"),
    ("tag:yaml.org,2002:float", _FLOAT_RE, "-+0123456789."),
)
for _tag, _regexp, _first in _RESOLVERS:
    _Loader.add_implicit_resolver(_tag, re.compile(_regexp), list(_first))


def _construct_int(loader: yaml.SafeLoader, node: yaml.Node) -> int:
    text = loader.construct_scalar(node)
    if not re.match(_INT_RE, text):
        raise yaml.constructor.ConstructorError(
            None, None, f"{text!r} is not a decimal integer", node.start_mark
        )
    return int(text)


def _construct_float(loader: yaml.SafeLoader, node: yaml.Node) -> float:
    text = loader.construct_scalar(node)
    if not re.match(_FLOAT_RE, text) and not re.match(_INT_RE, text):
        raise yaml.constructor.ConstructorError(
            None, None, f"{text!r} is not a decimal number", node.start_mark
        )
    return float(
        text.replace(".inf", "inf")
        .replace(".Inf", "inf")
        .replace(".INF", "inf")
        .replace(".nan", "nan")
        .replace(".NaN", "nan")
        .replace(".NAN", "nan")
    )


_Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)
_Loader.add_constructor("tag:yaml.org,2002:float", _construct_float)


class _Dumper(yaml.SafeDumper):
    """SafeDumper that also quotes strings the YAML 1.2 rules of :class:`_Loader` would read as
    numbers (``1e-3``), so a saved config reads back the same with either rule set."""

    yaml_implicit_resolvers = copy.deepcopy(yaml.SafeDumper.yaml_implicit_resolvers)


for _tag, _regexp, _first in _RESOLVERS:
    _Dumper.add_implicit_resolver(_tag, re.compile(_regexp), list(_first))


def yaml_load(stream: Any) -> Any:
    """Parse YAML text or a file object with the YAML 1.2 core scalars of :class:`_Loader`.

    Raises:
        yaml.YAMLError: not valid YAML.
    """
    return yaml.load(stream, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


def yaml_dump(obj: Any, stream: IO) -> None:
    """Write ``obj`` as block YAML (keys in their order) that :func:`yaml_load` and PyYAML's
    ``safe_load`` both read back as ``obj``."""
    yaml.dump(obj, stream, Dumper=_Dumper, sort_keys=False, default_flow_style=None)

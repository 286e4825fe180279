"""YAML configs with `_base_` inheritance, a schema given by the root file, and dotted overrides.

Every recipe is a YAML file. A file may name a parent with ``_base_: other.yaml`` (relative to
the file); the chain ends in a *root* file that declares every key and its default. The root is
the schema: a key it does not declare, or a value whose type differs from the root's, is a
:class:`ConfigError` naming the key and the file (or override) it came from. A file that says
``_schema_: true`` extends the schema of its parents: the keys it adds are declared by it (with
their values as defaults), which is how the evaluation recipes share the sections of
``configs/eval/base.yaml``.

The shipped recipes live in the ``configs`` package (``configs/pretrain``, ``configs/eval``),
installed as package data; :func:`find_config` resolves a bare name there.
"""

from __future__ import annotations

import copy
import importlib.resources
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

BASE_KEY = "_base_"
SCHEMA_KEY = "_schema_"
_META_KEYS = (BASE_KEY, SCHEMA_KEY)
CONFIG_KINDS = ("pretrain", "eval")


class ConfigError(ValueError):
    """A config file or override is invalid (unknown key, wrong type, unreadable file)."""


def resolve_config_path(name_or_path: str | os.PathLike, default_dir: str | os.PathLike) -> Path:
    """Find a config given as a path or as a bare name inside ``default_dir``.

    Args:
        name_or_path: an existing path, or a file name (with or without ``.yaml``).
        default_dir: folder searched for bare names.

    Returns:
        The resolved path.
    """
    p = Path(name_or_path)
    if p.is_file():
        return p
    candidates = [Path(default_dir) / p, Path(default_dir) / f"{p}.yaml"]
    for c in candidates:
        if c.is_file():
            return c
    raise ConfigError(
        f"config '{name_or_path}' not found (looked at {p} and in {Path(default_dir)})"
    )


def config_dir(kind: str) -> Path:
    """Folder of the shipped recipes of one kind.

    Resolved through the installed ``configs`` package (package data), so bare names work after
    a non-editable install; a source checkout without that package on the path falls back to
    the ``configs/`` folder next to ``pretrain/``.

    Args:
        kind: "pretrain" or "eval".

    Returns:
        The folder (it exists).

    Raises:
        ConfigError: unknown kind, or no shipped recipes found.
    """
    if kind not in CONFIG_KINDS:
        raise ConfigError(f"unknown config kind '{kind}' (one of {', '.join(CONFIG_KINDS)})")
    candidates = []
    try:
        candidates.append(Path(str(importlib.resources.files("configs") / kind)))
    except ModuleNotFoundError:
        pass
    candidates.append(Path(__file__).resolve().parent.parent / "configs" / kind)
    for folder in candidates:
        if (folder / "base.yaml").is_file():
            return folder
    raise ConfigError(f"shipped {kind} recipes not found (looked in {candidates})")


def config_names(kind: str) -> list[str]:
    """Names (without ``.yaml``) of the shipped recipes of ``kind``, sub-folders included."""
    folder = config_dir(kind)
    return sorted(str(p.relative_to(folder).with_suffix("")) for p in folder.rglob("*.yaml"))


def find_config(name_or_path: str | os.PathLike, kind: str) -> Path:
    """A recipe given as a path, or as the name of a shipped recipe of ``kind``.

    Args:
        name_or_path: an existing file, or a name such as ``knn_tiny`` / ``knn_tiny.yaml``.
        kind: "pretrain" or "eval".

    Returns:
        The path of the YAML file.

    Raises:
        ConfigError: naming what was tried and listing the shipped names.
    """
    try:
        return resolve_config_path(name_or_path, config_dir(kind))
    except ConfigError as e:
        raise ConfigError(f"{e}; shipped {kind} recipes: {', '.join(config_names(kind))}") from None


def _read_yaml(path: Path) -> dict:
    try:
        with open(path, "r", encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping, found {type(data).__name__}")
    return data


def _type_ok(default: Any, value: Any) -> bool:
    if default is None or value is None:
        return True
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    if isinstance(default, int):
        return isinstance(value, int)
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple))
    return isinstance(value, type(default))


def _merge(schema: dict, base: dict, update: Mapping, source: str, prefix: str = "") -> dict:
    """Merge ``update`` into ``base`` (a copy), checked against ``schema``."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        dotted = f"{prefix}{key}"
        if key in _META_KEYS:
            continue
        if key not in schema:
            known = ", ".join(sorted(k for k in schema if k not in _META_KEYS))
            raise ConfigError(f"unknown config key '{dotted}' in {source} (known here: {known})")
        default = schema[key]
        if isinstance(default, dict):
            if not isinstance(value, Mapping):
                raise ConfigError(
                    f"config key '{dotted}' in {source} must be a mapping, got {value!r}"
                )
            out[key] = _merge(default, out.get(key, {}), value, source, prefix=f"{dotted}.")
            continue
        if isinstance(default, float) and not isinstance(default, bool) and isinstance(value, str):
            # YAML 1.1 reads "1e-3" (no dot) as a string; accept it as the float it means
            try:
                value = float(value)
            except ValueError:
                pass
        if not _type_ok(default, value):
            raise ConfigError(
                f"config key '{dotted}' in {source} expects {type(default).__name__} "
                f"(default {default!r}), got {type(value).__name__} {value!r}"
            )
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        out[key] = value
    return out


def _chain(path: Path, seen: tuple = ()) -> list[tuple[Path, dict]]:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"config inheritance cycle through {path}")
    data = _read_yaml(path)
    base = data.get(BASE_KEY)
    if base is None:
        return [(path, data)]
    if not isinstance(base, str):
        raise ConfigError(f"'{BASE_KEY}' in {path} must be a file name, got {base!r}")
    base_path = (path.parent / base).resolve()
    if not base_path.is_file():
        raise ConfigError(f"'{BASE_KEY}: {base}' in {path}: file {base_path} does not exist")
    return _chain(base_path, seen + (path,)) + [(path, data)]


def _extend_schema(schema: dict, data: Mapping) -> dict:
    """``schema`` plus the keys of ``data`` it does not declare yet (their values as defaults)."""
    out = copy.deepcopy(schema)
    for key, value in data.items():
        if key in _META_KEYS:
            continue
        if key not in out:
            out[key] = copy.deepcopy(value)
        elif isinstance(out[key], dict) and isinstance(value, Mapping):
            out[key] = _extend_schema(out[key], value)
    return out


def complete_section(
    partial: Mapping[str, Any], kind: str, section: str, extra: Mapping[str, Any] | None = None
) -> dict:
    """One section of a shipped schema root, updated with ``partial`` (checked like a file).

    For library functions that take one section of a config and may be called with only a few
    of its keys (tests, benchmarks): the missing keys take the defaults of
    ``configs/<kind>/base.yaml``, so that file stays the only home of the values.

    Args:
        partial: the keys given.
        kind: "pretrain" or "eval".
        section: a top-level section of that kind's base.yaml (e.g. "data").
        extra: further keys accepted in ``partial`` with their defaults (not part of the YAML
            schema, e.g. a flag the caller passes along from another section).

    Returns:
        The complete section.

    Raises:
        ConfigError: unknown key or wrong type, naming ``section.key``.
    """
    root = config_dir(kind) / "base.yaml"
    schema = _read_yaml(root).get(section)
    if not isinstance(schema, dict):
        raise ConfigError(f"{root} declares no section '{section}'")
    schema = {**schema, **dict(extra or {})}
    return _merge(schema, schema, partial, source=f"the {section} section", prefix=f"{section}.")


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b=value`` into (["a", "b"], parsed value).

    The value is parsed as a YAML scalar or flow collection (``1e-3``, ``true``, ``[1, 2]``).
    """
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}' has an empty key part")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{text}': cannot parse value: {e}") from None
    return key.split("."), value


def load_config(path: str | os.PathLike, overrides: Iterable[str] = ()) -> dict:
    """Load a YAML config with inheritance and dotted overrides.

    Args:
        path: the config file.
        overrides: strings ``key.sub=value``; applied in order after the files.

    Returns:
        The resolved config as a nested plain dict (no ``_base_`` key).
    """
    chain = _chain(Path(path))
    root_path, schema = chain[0]
    schema = {k: v for k, v in schema.items() if k not in _META_KEYS}
    cfg = copy.deepcopy(schema)
    for file_path, data in chain[1:]:
        if data.get(SCHEMA_KEY, False) is True:
            schema = _extend_schema(schema, data)
        elif SCHEMA_KEY in data:
            raise ConfigError(f"'{SCHEMA_KEY}' in {file_path} must be true when present")
        cfg = _merge(schema, cfg, data, source=str(file_path))
    for text in overrides:
        keys, value = parse_override(text)
        nested: Any = value
        for k in reversed(keys):
            nested = {k: nested}
        cfg = _merge(schema, cfg, nested, source=f"command-line override '{text}'")
    return cfg


def save_config(cfg: Mapping, path: str | os.PathLike) -> None:
    """Write a resolved config as YAML, atomically (``pretrain.checkpoint.atomic_write``)."""
    # pretrain.checkpoint imports torch: loading and checking configs stays free of it
    from pretrain.checkpoint import atomic_write

    atomic_write(
        path,
        lambda f: yaml.safe_dump(dict(cfg), f, sort_keys=False, default_flow_style=None),
        mode="w",
    )


def get(cfg: Mapping, dotted: str) -> Any:
    """Read ``a.b.c`` from a nested dict, with a clear error when absent."""
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise ConfigError(f"config has no key '{dotted}'")
        node = node[part]
    return node

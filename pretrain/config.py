"""YAML configs with `_base_` inheritance, a schema given by the root file, and dotted overrides.

Every recipe is a YAML file. A file may name a parent with ``_base_: other.yaml`` (relative to
the file); the chain ends in a *root* file that declares every key and its default. The root is
the schema: a key it does not declare, or a value whose type differs from the root's, is a
:class:`ConfigError` naming the key and the file (or override) it came from. A file that says
``_schema_: true`` extends the schema of its parents: the keys it adds are declared by it (with
their values as defaults), which is how the evaluation recipes share the sections of
``configs/eval/base.yaml``.

Every key has a type (:mod:`pretrain.keytypes`): the type of its default, or a declaration in
the schema file's ``_types_`` section (``data.root: str?``, ``train.batch_size: int >=1``);
keys whose default is null must be declared. Null is refused unless the type allows it, floats
must be finite, declared bounds are checked, each error naming the key and the file or override.
Files and overrides are read with one rule, the YAML 1.2 core schema
(:func:`pretrain.fileio.yaml_load`): ``010`` and ``1:30`` are not numbers and ``no`` is not a
boolean, so no value changes its meaning in the reading. An override of a string key keeps its
text exactly (``#``, ``: `` and all); a string starting with ``~`` is refused (it would not be
expanded).

The shipped recipes live in the repository's ``configs/`` folder (``configs/pretrain``,
``configs/eval``), installed as the package ``imsvd_configs`` (package data);
:func:`find_config` resolves a bare name there.
"""

from __future__ import annotations

import copy
import importlib.resources
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from pretrain.errors import IMSVDError
from pretrain.fileio import atomic_write, yaml_dump, yaml_load
from pretrain.keytypes import KeyType, KeyTypeError, check_value, key_type

BASE_KEY = "_base_"
SCHEMA_KEY = "_schema_"
TYPES_KEY = "_types_"
_META_KEYS = (BASE_KEY, SCHEMA_KEY, TYPES_KEY)
CONFIG_KINDS = ("pretrain", "eval")
CONFIGS_PACKAGE = "imsvd_configs"  # the installed name of configs/ (setup.cfg package_dir)


class ConfigError(IMSVDError, ValueError):
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

    Resolved through the installed package :data:`CONFIGS_PACKAGE` (the repository's
    ``configs/`` folder as package data), so bare names work after a wheel or an editable
    install; a source checkout without that package on the path falls back to the ``configs/``
    folder next to ``pretrain/``.

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
        candidates.append(Path(str(importlib.resources.files(CONFIGS_PACKAGE) / kind)))
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
            data = yaml_load(f)
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping, found {type(data).__name__}")
    return data


def _leaf_type(dotted: str, default: Any, types: Mapping[str, str], source: str) -> KeyType:
    try:
        return key_type(dotted, default, dict(types))
    except KeyTypeError as e:
        raise ConfigError(f"{e} (schema of {source})") from None


def _merge(
    schema: dict, base: dict, update: Mapping, source: str, types: Mapping[str, str], prefix=""
) -> dict:
    """Merge ``update`` into ``base`` (a copy), each value checked against its key's type.

    Args:
        schema: the declared keys and their defaults (nested).
        base: the values so far.
        update: the values to apply (nested).
        source: where ``update`` comes from (a file, an override), for errors.
        types: the ``_types_`` declarations, by dotted key.
        prefix: dotted path of ``schema`` inside the whole config.

    Raises:
        ConfigError: unknown key, wrong type, null where not allowed, non-finite or out-of-range
            number (naming the key and ``source``).
    """
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
            out[key] = _merge(default, out.get(key, {}), value, source, types, f"{dotted}.")
            continue
        try:
            out[key] = check_value(_leaf_type(dotted, default, types, source), value)
        except KeyTypeError as e:
            raise ConfigError(f"config key '{dotted}' in {source} {e}") from None
        if isinstance(out[key], str) and out[key].startswith("~"):
            raise ConfigError(
                f"config key '{dotted}' in {source}: {out[key]!r} starts with '~', which is not "
                "expanded here: write the full path"
            )
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


def _types_of(path: Path, data: Mapping) -> dict[str, str]:
    types = data.get(TYPES_KEY, {})
    if not isinstance(types, Mapping) or not all(isinstance(v, str) for v in types.values()):
        raise ConfigError(f"'{TYPES_KEY}' in {path} must map dotted keys to type declarations")
    return {str(k): v for k, v in types.items()}


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
    data = _read_yaml(root)
    schema = data.get(section)
    if not isinstance(schema, dict):
        raise ConfigError(f"{root} declares no section '{section}'")
    schema = {**schema, **dict(extra or {})}
    types = _types_of(root, data)
    return _merge(schema, schema, partial, f"the {section} section", types, f"{section}.")


_QUOTED_RE = re.compile(r"""^\s*(?:"(?:[^"\\]|\\.)*"|'(?:[^']|'')*')\s*$""")
_NULL_WORDS = ("null", "Null", "NULL")


def parse_override(text: str, string: bool = False) -> tuple[list[str], Any]:
    """Split ``a.b=value`` into (["a", "b"], parsed value).

    The value is parsed as a YAML 1.2 core scalar or flow collection (``1e-3``, ``true``,
    ``[1, 2]``; :func:`pretrain.fileio.yaml_load`). With ``string=True`` (the key holds a string
    or a path) the value is the text after ``=`` exactly as given, whatever it contains (``#``,
    ``: ``, spaces), except a value written in YAML quotes (which are removed) and ``null``
    (null; the key's type decides whether that is allowed). A string starting with ``~`` is
    refused by the schema check (it is not expanded).

    Raises:
        ConfigError: no ``=``, an empty key part, or a value that is not valid YAML.
    """
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}' has an empty key part")
    if string and raw.strip() in _NULL_WORDS:
        return key.split("."), None
    if string and not _QUOTED_RE.match(raw):
        return key.split("."), raw
    try:
        value = yaml_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{text}': cannot parse value: {e}") from None
    return key.split("."), value


def _schema_leaf(schema: Mapping, keys: list[str]) -> tuple[bool, Any]:
    node: Any = schema
    for k in keys:
        if not isinstance(node, Mapping) or k not in node:
            return False, None
        node = node[k]
    return True, node


def _is_string_key(schema: Mapping, types: Mapping[str, str], keys: list[str]) -> bool:
    found, default = _schema_leaf(schema, keys)
    if not found or isinstance(default, dict):
        return False
    try:
        return key_type(".".join(keys), default, dict(types)).base == "str"
    except KeyTypeError:
        return False


def load_config(path: str | os.PathLike, overrides: Iterable[str] = ()) -> dict:
    """Load a YAML config with inheritance and dotted overrides.

    Args:
        path: the config file.
        overrides: strings ``key.sub=value``; applied in order after the files (a string key
            takes the text after ``=`` as it is; :func:`parse_override`).

    Returns:
        The resolved config as a nested plain dict (no ``_base_`` / ``_types_`` key).

    Raises:
        ConfigError: unreadable file, unknown key, wrong type, null where not allowed,
            non-finite or out-of-range number (naming the key and the file or override).
    """
    chain = _chain(Path(path))
    root_path, root_data = chain[0]
    types = _types_of(root_path, root_data)
    schema = {k: v for k, v in root_data.items() if k not in _META_KEYS}
    cfg = _merge(schema, copy.deepcopy(schema), schema, str(root_path), types)
    for file_path, data in chain[1:]:
        if data.get(SCHEMA_KEY, False) is True:
            schema = _extend_schema(schema, data)
            types = {**types, **_types_of(file_path, data)}
        elif SCHEMA_KEY in data:
            raise ConfigError(f"'{SCHEMA_KEY}' in {file_path} must be true when present")
        elif TYPES_KEY in data:
            raise ConfigError(f"'{TYPES_KEY}' in {file_path}: only a schema file declares types")
        cfg = _merge(schema, cfg, data, str(file_path), types)
    for text in overrides:
        head = text.split("=", 1)[0].strip().split(".")
        keys, value = parse_override(text, string=_is_string_key(schema, types, head))
        nested: Any = value
        for k in reversed(keys):
            nested = {k: nested}
        cfg = _merge(schema, cfg, nested, f"command-line override '{text}'", types)
    return cfg


def save_config(cfg: Mapping, path: str | os.PathLike) -> None:
    """Write a resolved config as YAML (:func:`pretrain.fileio.yaml_dump`), atomically."""
    atomic_write(path, lambda f: yaml_dump(dict(cfg), f), mode="w")

"""The type of each config key: inferred from its default, or declared in the schema's
``_types_`` section.

A declaration is a string: a base type, ``?`` when null is allowed, then optional bounds::

    int >=1            an integer of at least 1
    float >0           a finite float above 0 (an int is accepted and converted)
    str?               a string or null
    int? >=1           null, or an integer of at least 1
    list[float] len=2 >0 <=1    two floats in (0, 1]
    list[int] len>=1 >=1        a non-empty list of positive integers

Bounds apply to a number, or to each element of a list; ``len`` bounds the length of a list or
a string (``str len>=1``: not empty). A key
without a declaration takes the type of its default (a list's element type from its elements)
with no bounds, and null is refused. Every float must be finite. Keys whose default is null
must be declared (:func:`key_type` raises otherwise): the default says nothing of their type.
"""

from __future__ import annotations

import math
import operator
import os
import re
from dataclasses import dataclass, field
from typing import Any

from pretrain.errors import IMSVDError

__all__ = ["KeyType", "KeyTypeError", "parse_spec", "infer_type", "key_type", "check_value"]

_OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "=": operator.eq}
_BOUND_RE = re.compile(r"^(len)?(>=|<=|>|<|=)([-+]?[0-9.]+(?:[eE][-+]?[0-9]+)?)$")
_SCALARS = {"bool": bool, "int": int, "float": float, "str": str}


class KeyTypeError(IMSVDError, ValueError):
    """A value does not fit its key's type, or a declaration is malformed."""


@dataclass(frozen=True)
class KeyType:
    """A key's type.

    Attributes:
        base: "bool", "int", "float", "str", "list" or "any" (a list element of unknown type).
        nullable: null accepted.
        item: the element type of a list (a KeyType without bounds of its own; None: any
            scalar).
        bounds: (operator text, number) pairs for a number or each element of a list.
        length: (operator text, number) pairs for a list's or a string's length.
    """

    base: str
    nullable: bool = False
    item: "KeyType | None" = None
    bounds: tuple = field(default_factory=tuple)
    length: tuple = field(default_factory=tuple)

    def describe(self) -> str:
        """The type as a declaration would write it (for error messages)."""
        name = f"list[{self.item.base}]" if self.base == "list" and self.item else self.base
        parts = [name + ("?" if self.nullable else "")]
        parts += [f"len{op}{n:g}" for op, n in self.length]
        parts += [f"{op}{n:g}" for op, n in self.bounds]
        return " ".join(parts)


def parse_spec(spec: str) -> KeyType:
    """A declaration (see the module docstring) as a :class:`KeyType`.

    Raises:
        KeyTypeError: unknown base type or malformed bound.
    """
    tokens = str(spec).split()
    if not tokens:
        raise KeyTypeError("empty type declaration")
    head, nullable = tokens[0].rstrip("?"), tokens[0].endswith("?")
    item = None
    m = re.match(r"^list\[(\w+)\]$", head)
    if m:
        if m.group(1) not in _SCALARS:
            raise KeyTypeError(f"unknown list element type in {spec!r}")
        item, head = KeyType(m.group(1)), "list"
    elif head not in _SCALARS:
        raise KeyTypeError(f"unknown type {head!r} in {spec!r} (bool, int, float, str, list[T])")
    bounds, length = [], []
    for tok in tokens[1:]:
        b = _BOUND_RE.match(tok)
        try:
            number = float(b.group(3)) if b else None
        except ValueError:  # the pattern admits e.g. "1.2.3" and "."
            number = None
        if number is None:
            raise KeyTypeError(f"malformed bound {tok!r} in {spec!r} (e.g. >=1, <1, len=2)")
        (length if b.group(1) else bounds).append((b.group(2), number))
    return KeyType(head, nullable, item, tuple(bounds), tuple(length))


def infer_type(default: Any) -> KeyType | None:
    """The type a default implies (None for a null default: it must be declared)."""
    if default is None:
        return None
    for name in ("bool", "int", "float", "str"):  # bool before int: True is an int
        if isinstance(default, _SCALARS[name]):
            return KeyType(name)
    if isinstance(default, (list, tuple)):
        kinds = {infer_type(v).base for v in default if infer_type(v) is not None}
        if kinds == {"int", "float"}:
            kinds = {"float"}
        return KeyType("list", item=KeyType(kinds.pop()) if len(kinds) == 1 else None)
    return KeyType(type(default).__name__)


def key_type(dotted: str, default: Any, declared: dict[str, str]) -> KeyType:
    """The type of ``dotted``: its declaration in ``declared``, else the default's.

    Raises:
        KeyTypeError: a malformed declaration, or a null default without one.
    """
    if dotted in declared:
        try:
            return parse_spec(declared[dotted])
        except KeyTypeError as e:
            raise KeyTypeError(f"'_types_' declaration of '{dotted}': {e}") from None
    kt = infer_type(default)
    if kt is None:
        raise KeyTypeError(f"schema key '{dotted}' has a null default and no type in '_types_'")
    return kt


def _bounded(value: float, bounds: tuple, what: str) -> None:
    for op, n in bounds:
        if not _OPS[op](value, n):
            raise KeyTypeError(f"{what} {value!r} must be {op} {n:g}")


def _scalar(kt: KeyType, value: Any, what: str = "value") -> Any:
    if kt.base == "str" and isinstance(value, os.PathLike):
        value = os.fspath(value)
    if kt.base == "float" and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    expected = _SCALARS.get(kt.base)
    if expected is not None:
        ok = isinstance(value, expected) and (kt.base == "bool") == isinstance(value, bool)
        if not ok:
            raise KeyTypeError(f"expects {kt.describe()}, got {type(value).__name__} {value!r}")
    elif isinstance(value, (dict, list, tuple)):
        raise KeyTypeError(f"expects a scalar, got {type(value).__name__} {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise KeyTypeError(f"must be a finite number, got {value!r}")
    if kt.base == "str" and kt.length:
        if value == "" and not all(_OPS[op](0, n) for op, n in kt.length):
            raise KeyTypeError("must not be empty")
        _bounded(len(value), kt.length, "string length")
    if kt.base in ("int", "float"):
        _bounded(value, kt.bounds, what)
    return value


def check_value(kt: KeyType, value: Any) -> Any:
    """``value`` checked against ``kt`` (an int for a float key becomes a float).

    Returns:
        The value (lists as lists).

    Raises:
        KeyTypeError: wrong type, null where not allowed, non-finite float, out of bounds.
    """
    if value is None:
        if kt.nullable:
            return None
        raise KeyTypeError(f"expects {kt.describe()}, got null")
    if kt.base != "list":
        return _scalar(kt, value)
    if not isinstance(value, (list, tuple)):
        raise KeyTypeError(f"expects {kt.describe()}, got {type(value).__name__} {value!r}")
    _bounded(len(value), kt.length, "list length")
    item = kt.item or KeyType("any")
    item = KeyType(item.base, bounds=kt.bounds)
    out = []
    for i, v in enumerate(value):
        try:
            out.append(_scalar(item, v, what="element"))
        except KeyTypeError as e:
            raise KeyTypeError(f"element {i} of {list(value)!r}: {e}") from None
    return out

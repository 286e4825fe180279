"""Reading weight files without executing code from them.

Unpickling can call any importable function, so a weights file from elsewhere is read here in
three steps:

1. ``torch.load(weights_only=True)``: PyTorch's own allow-list of tensors and containers.
2. If that refuses an unknown global, a restricted unpickler of this module: it resolves only
   the same allow-listed names (from a fixed table, never by importing), refuses to call or
   build anything unknown, and turns a bare reference to an unknown global into an inert
   :class:`UnresolvedGlobal` placeholder. Placeholders are accepted only inside the file's
   ``optimizer`` entry (the reference IMSVD ``model.pth`` pickles its LARS filter function
   ``__main__.exclude_bias_and_norm`` there); anywhere else the file is refused.
3. ``allow_unsafe=True`` (``--allow-unsafe`` on the command lines): a full unpickle, for files
   from a trusted source only.

Detectron2 weight pickles (``.pkl``) are read by :func:`read_weights_pickle`, which accepts only
numpy arrays / dtypes / scalars, dicts, OrderedDicts, lists, tuples, strings, numbers, booleans
and None, and names the first other global it meets.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import types
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from .common import CheckpointError, CheckpointPathError

logger = logging.getLogger("imsvd.checkpoint")

UNSAFE_HINT = (
    "If you trust the file, pass --allow-unsafe on the command line (allow_unsafe=True in "
    "Python), or re-save its tensors as a plain dict."
)
# top-level entries of a checkpoint where unknown globals may stay as inert placeholders
PLACEHOLDER_ENTRIES = ("optimizer",)

_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")


class UnresolvedGlobal:
    """Inert stand-in for a global the restricted unpickler would not resolve.

    It records the name only; calling it raises, so an unpickled ``REDUCE`` on it fails instead
    of running anything, and it cannot be pickled again.
    """

    __slots__ = ("module", "name")

    def __init__(self, module: str, name: str) -> None:
        self.module = module
        self.name = name

    @property
    def qualname(self) -> str:
        """``module.name`` of the global that was referenced."""
        return f"{self.module}.{self.name}"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise pickle.UnpicklingError(f"refusing to call the unresolved global {self.qualname}")

    def __reduce__(self) -> Any:
        raise TypeError(f"{self!r} is a placeholder and cannot be saved")

    def __repr__(self) -> str:
        return f"<unresolved global {self.qualname}>"


class _Refused(pickle.UnpicklingError):
    """The restricted unpickler met something it will not resolve, call or build."""

    def __init__(self, message: str, found: list[str]) -> None:
        super().__init__(message)
        self.found = found


def _numpy_globals() -> dict[str, Any]:
    core = getattr(np, "_core", None) or np.core
    table: dict[str, Any] = {"numpy.ndarray": np.ndarray, "numpy.dtype": np.dtype}
    for spelling in ("numpy.core", "numpy._core"):
        table[f"{spelling}.multiarray._reconstruct"] = core.multiarray._reconstruct
        table[f"{spelling}.multiarray.scalar"] = core.multiarray.scalar
        table[f"{spelling}.numeric._frombuffer"] = core.numeric._frombuffer
    for name in dir(np.dtypes):  # numpy >= 1.25 may pickle dtypes by their DType class
        obj = getattr(np.dtypes, name)
        if isinstance(obj, type) and issubclass(obj, np.dtype):
            table[f"numpy.dtypes.{name}"] = obj
    return table


def _torch_globals() -> dict[str, Any]:
    try:  # the names torch.load(weights_only=True) itself resolves
        from torch._weights_only_unpickler import _get_allowed_globals

        table = dict(_get_allowed_globals())
    except (ImportError, AttributeError):  # pragma: no cover - older / newer torch layouts
        table = {
            "collections.OrderedDict": OrderedDict,
            "torch.Size": torch.Size,
            "torch.device": torch.device,
            "torch._utils._rebuild_tensor_v2": torch._utils._rebuild_tensor_v2,
            "torch._utils._rebuild_parameter": torch._utils._rebuild_parameter,
        }
    table.pop("collections.Counter", None)  # not needed for weights; a mutable Python class
    return table


_PLAIN_BUILD_TYPES = (OrderedDict, np.ndarray, np.dtype)


def _restricted_module(allowed: Mapping[str, Any], placeholders: bool) -> types.ModuleType:
    """A pickle-module stand-in whose Unpickler resolves only ``allowed`` names.

    The pure-Python unpickler is used because it lets BUILD be restricted too: state may only
    be set on tensors, OrderedDicts and numpy arrays / dtypes, never on a class.
    """
    found: list[str] = []

    class Unpickler(pickle._Unpickler):  # type: ignore[name-defined]
        def find_class(self, module: str, name: str) -> Any:
            key = f"{module}.{name}"
            if key in allowed:
                return allowed[key]
            found.append(key)
            if placeholders:
                return UnresolvedGlobal(module, name)
            raise _Refused(f"global {key} is not allowed", found)

        def load_build(self) -> None:
            inst = self.stack[-2]
            if isinstance(inst, type) or not isinstance(inst, (torch.Tensor, *_PLAIN_BUILD_TYPES)):
                what = getattr(inst, "qualname", None) or type(inst).__qualname__
                raise _Refused(f"refusing to set the state of {what}", found)
            super().load_build()

        def load(self) -> Any:
            try:
                return super().load()
            except _Refused:
                raise
            except (pickle.UnpicklingError, TypeError, AttributeError) as e:
                # a placeholder was called / built, or NEWOBJ got a non-class: name the globals
                raise _Refused(f"{type(e).__name__}: {e}", found) from None

        dispatch = dict(pickle._Unpickler.dispatch)  # type: ignore[attr-defined]
        dispatch[pickle.BUILD[0]] = load_build

    mod = types.ModuleType("imsvd_restricted_pickle")
    mod.Unpickler = Unpickler  # type: ignore[attr-defined]
    mod.load = lambda f, **kw: Unpickler(f, **kw).load()  # type: ignore[attr-defined]
    mod.found = found  # type: ignore[attr-defined]
    return mod


def _placeholders(obj: Any, where: str, out: list[tuple[str, str]]) -> None:
    if isinstance(obj, UnresolvedGlobal):
        out.append((where, obj.qualname))
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            _placeholders(v, f"{where}[{k!r}]", out)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _placeholders(v, f"{where}[{i}]", out)


def _restricted_torch_load(path: Path, map_location: Any) -> tuple[Any, list[str], str | None]:
    """(object or None, unknown globals seen, reason for refusing or None)."""
    mod = _restricted_module(_torch_globals(), placeholders=True)
    try:
        obj = torch.load(path, map_location=map_location, pickle_module=mod, weights_only=False)
    except _Refused as e:
        return None, sorted(set(e.found)), str(e)
    except Exception as e:  # noqa: BLE001 - reported with the globals found
        return None, sorted(set(mod.found)), f"{type(e).__name__}: {str(e)[:200]}"
    found: list[tuple[str, str]] = []
    _placeholders(obj, "", found)
    outside = [
        w for w, _ in found if not w.startswith(tuple(f"[{e!r}]" for e in PLACEHOLDER_ENTRIES))
    ]
    if outside:
        return None, sorted({q for _, q in found}), f"referenced at {', '.join(outside[:3])}"
    return obj, sorted({q for _, q in found}), None


def read_torch_file(
    path: str | os.PathLike, map_location: Any = "cpu", allow_unsafe: bool = False
) -> tuple[Any, list[str]]:
    """Load a ``torch.save`` file without executing code from it (see the module docstring).

    Args:
        path: the file.
        map_location: passed to torch.load.
        allow_unsafe: permit a full unpickle when the safe readers refuse the file.

    Returns:
        ``(object, notes)``; notes say when placeholders replaced globals or an unsafe load ran.

    Raises:
        CheckpointError: missing, empty, corrupt, or refused file (naming the globals found).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointPathError(f"checkpoint file not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint file {path} is empty")
    not_torch = _not_a_torch_file(path)
    if not_torch is not None:
        raise CheckpointError(f"{path} is not a PyTorch checkpoint: {not_torch}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True), []
    except Exception as e:  # noqa: BLE001 - turned into a CheckpointError below
        msg = str(e)
        first_line = f"{type(e).__name__}: {msg.splitlines()[0][:200] if msg else 'no message'}"
    if "Weights only load failed" not in msg:
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({first_line})")
    obj, globals_seen, reason = _restricted_torch_load(path, map_location)
    if reason is None:
        notes = []
        if globals_seen:
            notes.append(
                f"the optimizer state referenced {', '.join(globals_seen)}; kept as inert "
                "placeholders (nothing was imported or called)"
            )
            logger.info("%s: %s", path, notes[0])
        return obj, notes
    found = globals_seen or sorted(set(_GLOBAL_RE.findall(msg)))
    if not found:  # no global involved: corrupt / truncated / not a torch.save file at all
        first = next((ln for ln in msg.splitlines() if "rror" in ln), msg.splitlines()[0])
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint (corrupt, truncated or not written "
            f"by torch.save: {first.strip()[:200]})"
        )
    names = ", ".join(found)
    if allow_unsafe:
        return _unsafe_load(path, map_location, names)
    raise CheckpointError(
        f"{path} contains pickled Python objects ({names}), which torch.load(weights_only=True) "
        f"refuses because unpickling can run arbitrary code ({reason}). {UNSAFE_HINT}"
    )


# torch.save's legacy (non-zip) files start with this pickled number (torch.serialization)
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class _NoGlobals(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        raise _Refused(f"{module}.{name}", [f"{module}.{name}"])


def _not_a_torch_file(path: Path) -> str | None:
    """Why ``path`` is not a ``torch.save`` file (a zip archive, or the legacy format that opens
    with its pickled magic number), or None when it may be one. Reads at most the first object
    of a pickle, without resolving any global."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise CheckpointPathError(f"cannot open {path}: {e.strerror or e}") from None
    with f:
        head = f.read(32)
        if head.startswith(b"PK\x03\x04"):  # torch.save's zip format
            return None
        f.seek(0)
        try:
            first = _NoGlobals(f, encoding="latin1").load()
        except _Refused:
            first = None  # a pickle of objects, not of the legacy magic number
        except Exception:  # noqa: BLE001 - not a pickle, or a damaged one
            if head.startswith(b"\x80"):
                return None  # a damaged pickle: torch.load names the problem
            return (
                f"a torch.save file is a zip archive (or a pickle); this one starts with {head!r}"
            )
    if isinstance(first, int) and first == _LEGACY_MAGIC:
        return None
    return _plain_pickle_reason(path)


def _plain_pickle_reason(path: Path) -> str:
    """What a plain pickle (not written by torch.save) is, for the error message."""
    try:
        obj = read_weights_pickle(path)
    except CheckpointError:
        return "it is a plain pickle file, not written by torch.save"
    model = obj.get("model") if isinstance(obj, Mapping) else None
    # Detectron2's weights layout: {"model": {name: numpy array}, "__author__": ..., ...}
    if isinstance(model, Mapping) and any(isinstance(v, np.ndarray) for v in model.values()):
        return (
            "it is a Detectron2 weights pickle (.pkl, e.g. from imsvd-convert-d2), which "
            "Detectron2 loads as MODEL.WEIGHTS; give the backbone file it was converted from "
            "instead"
        )
    return "it is a plain pickle file, not written by torch.save"


def _unsafe_load(path: Path, map_location: Any, names: str) -> tuple[Any, list[str]]:
    """A full unpickle of ``path``, asked for with ``allow_unsafe`` (it holds ``names``)."""
    logger.warning(
        "%s holds pickled Python objects (%s); loading it with a full unpickle because "
        "allow_unsafe was given",
        path,
        names,
    )
    try:
        obj = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e2:  # noqa: BLE001
        raise CheckpointError(
            f"{path} could not be loaded even with a full unpickle "
            f"({type(e2).__name__}: {str(e2)[:200]})"
        ) from None
    return obj, [f"loaded with a full unpickle (allow_unsafe): it holds {names}"]


def load_plain(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """Load an auxiliary artifact written with ``atomic_torch_save`` (e.g. a linear head).

    Always ``weights_only=True``; unreadable files raise :class:`CheckpointError` naming them.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointPathError(f"checkpoint file not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001
        msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise CheckpointError(f"{path} is not a readable plain checkpoint ({msg})") from None


def read_weights_pickle(path: str | os.PathLike) -> Any:
    """Unpickle a Detectron2-style weights ``.pkl`` allowing only plain data and numpy arrays.

    Accepted: dict, OrderedDict, list, tuple, str, bytes, int, float, bool, None, numpy arrays,
    dtypes and scalars. Anything else (e.g. ``os.system`` in a ``__reduce__``) is refused
    before it is called.

    Args:
        path: the pickle file.

    Returns:
        The unpickled object.

    Raises:
        CheckpointError: unreadable file, or a refused global (named in the message).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointPathError(f"weights file not found: {path}")
    allowed = _numpy_globals()
    allowed["collections.OrderedDict"] = OrderedDict
    allowed["_codecs.encode"] = __import__("_codecs").encode  # bytes under protocol 2
    mod = _restricted_module(allowed, placeholders=False)
    try:
        with open(path, "rb") as f:
            return mod.Unpickler(f, encoding="latin1").load()
    except _Refused as e:
        names = ", ".join(sorted(set(e.found))) or "no global"
        raise CheckpointError(
            f"{path}: refused to unpickle: found global(s) {names} ({e}); a weights pickle may "
            "hold only numpy arrays, dicts, lists, tuples, strings and numbers"
        ) from None
    except (OSError, EOFError, pickle.UnpicklingError, ValueError) as e:
        raise CheckpointError(
            f"{path} is not a readable pickle ({type(e).__name__}: {e})"
        ) from None

"""The one reader and writer of checkpoint artifacts (spec: pretrain/CHECKPOINT_FORMAT.md).

Two artifacts are written by this project:

* the training state (``"imsvd-train-state"``): everything needed to resume a run exactly
  (model with backbone + projector, optimizer, gradient scaler, position, RNG streams, config);
* the exported backbone (``"imsvd-backbone"``): torchvision-named ResNet weights without ``fc``,
  with metadata and a content hash, the artifact every downstream evaluation reads.

Every file written here loads with ``torch.load(path, weights_only=True)``: only dicts, lists,
strings, numbers and tensors are stored, and :func:`atomic_torch_save` refuses anything else
before touching the disk. :func:`load_backbone` also reads the checkpoints of the reference IMSVD
code, VICReg / Barlow Twins, MoCo v1/v2 and plain torchvision state_dicts, detected by content.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import re
import sys
import tempfile
from collections import OrderedDict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

logger = logging.getLogger("imsvd.checkpoint")

TRAIN_STATE_FORMAT = "imsvd-train-state"
TRAIN_STATE_VERSION = 1
BACKBONE_FORMAT = "imsvd-backbone"
BACKBONE_VERSION = 1
HASH_SCHEME = "imsvd-tensor-sha256-v1"

CHECKPOINT_RE = re.compile(r"^checkpoint_e(\d{4,})_s(\d{8,})\.pth$")

ACCEPTED_INPUTS = (
    "this project's exported backbone (format 'imsvd-backbone')",
    "this project's training state (format 'imsvd-train-state', checkpoint_e*_s*.pth)",
    "the reference IMSVD model.pth: {'epoch', 'model': {'module.backbone.*', "
    "'module.projector.*'}, 'optimizer'}",
    "a bare torchvision ResNet state_dict (reference model_final.pth, VICReg / Barlow Twins "
    "resnet50.pth, torchvision ImageNet-supervised weights; fc.* is dropped)",
    "MoCo v1/v2: {'state_dict': {'module.encoder_q.*', 'module.encoder_k.*', ...}}",
)

_REQUIRED_TRAIN_FIELDS = (
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
_REQUIRED_BACKBONE_FIELDS = (
    "format",
    "format_version",
    "arch",
    "stem",
    "epoch",
    "config",
    "state_dict",
    "sha256",
)


class CheckpointError(ValueError):
    """A checkpoint cannot be written or read (wrong format, missing keys, bad hash, ...)."""


# ---------------------------------------------------------------------------------------------
# low-level I/O
# ---------------------------------------------------------------------------------------------

# Exact types (not isinstance) because numpy scalars subclass float/int yet are pickled as numpy
# objects, which torch.load(weights_only=True) refuses.
_PLAIN_TYPES = (str, int, float, bool, type(None), bytes, torch.Size, torch.dtype, torch.device)


def _check_plain(obj: Any, where: str = "<root>") -> None:
    """Raise CheckpointError at the first value that weights_only loading would refuse."""
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
            _check_plain(v, f"{where}[{k!r}]")
        return
    if t in (list, tuple):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
        return
    raise CheckpointError(
        f"cannot save checkpoint: value at {where} has type {t.__module__}.{t.__qualname__}; "
        "checkpoints hold only dicts, lists, str/int/float/bool/None and tensors so that they "
        "load with torch.load(weights_only=True) (convert numpy values with .tolist() or "
        "torch.as_tensor, and keep callables out of optimizer param_groups)"
    )


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not supported on every platform/filesystem.
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


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """Write ``obj`` with torch.save so that ``path`` holds either the old or the complete new file.

    The object is checked first (plain containers and tensors only), written to a temporary file
    in the destination folder (``.<name>.<random>.tmp``), flushed and fsync'ed, then renamed over
    ``path`` with os.replace. On any failure the temporary file is removed and the previous file
    at ``path`` is left untouched.

    Args:
        obj: the object to save.
        path: destination file; parent folders are created.

    Returns:
        The destination path.
    """
    path = Path(path)
    _check_plain(obj)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; checkpoints are ordinary shared files
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


_UNSAFE_GLOBAL_RE = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def _torch_load(path: str | os.PathLike, map_location: Any, allow_unsafe: bool) -> Any:
    """torch.load with weights_only=True and clear errors; full unpickling only if allowed."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint file {path} is empty")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - turned into a CheckpointError below
        msg = str(e)
        if "Weights only load failed" not in msg:
            raise CheckpointError(
                f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}: "
                f"{msg.splitlines()[0][:200] if msg else 'no message'})"
            ) from None
        found = sorted(set(_UNSAFE_GLOBAL_RE.findall(msg)))
        if not found and "Unsupported" not in msg:  # corrupt / not a torch.save file at all
            first = next((ln for ln in msg.splitlines() if "rror" in ln), msg.splitlines()[0])
            raise CheckpointError(
                f"{path} is not a readable PyTorch checkpoint (corrupt, truncated or not written "
                f"by torch.save: {first.strip()[:200]})"
            ) from None
        if allow_unsafe:
            logger.warning(
                "%s holds pickled Python objects (%s); loading it with weights_only=False "
                "because allow_unsafe=True was given",
                path,
                ", ".join(found) or "unknown",
            )
            try:
                return torch.load(path, map_location=map_location, weights_only=False)
            except Exception as e2:  # noqa: BLE001
                raise CheckpointError(
                    f"{path} could not be loaded even with weights_only=False "
                    f"({type(e2).__name__}: {str(e2)[:200]})"
                ) from None
        raise CheckpointError(
            f"{path} contains pickled Python objects ({', '.join(found) or 'unknown globals'}), "
            "which torch.load(weights_only=True) refuses because unpickling can run arbitrary "
            "code. If you trust the file, pass allow_unsafe=True (or re-save its tensors as a "
            "plain dict)."
        ) from None


def load_plain(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """Load an auxiliary artifact written with :func:`atomic_torch_save` (e.g. a linear head).

    Always ``weights_only=True``; unreadable files raise :class:`CheckpointError` naming them.
    """
    return _torch_load(path, map_location, allow_unsafe=False)


def _describe(obj: Any, limit: int = 8) -> str:
    """Short description of an unrecognised object for error messages."""
    if _is_tensor_dict(obj):
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


def _unrecognised(path: Path, obj: Any, what: str = "a ResNet backbone") -> CheckpointError:
    accepted = "\n  - ".join(ACCEPTED_INPUTS)
    return CheckpointError(
        f"{path}: could not find {what}. Found {_describe(obj)}.\nAccepted inputs:\n  - "
        f"{accepted}"
    )


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def unwrap_model(model: nn.Module) -> nn.Module:
    """Return the plain module under DistributedDataParallel / DataParallel / torch.compile."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _strip_prefix(sd: Mapping[str, Any], prefix: str) -> "OrderedDict[str, Any]":
    return OrderedDict((k[len(prefix) :], v) for k, v in sd.items() if k.startswith(prefix))


def _is_tensor_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def _model_section(config: Any) -> Mapping[str, Any]:
    if isinstance(config, Mapping) and isinstance(config.get("model"), Mapping):
        return config["model"]
    return {}


def _check_version(obj: Mapping[str, Any], fmt: str, supported: int, path: Path) -> int:
    v = obj.get("format_version")
    if type(v) is not int or v < 1:
        raise CheckpointError(f"{path}: format '{fmt}' with invalid format_version {v!r}")
    if v > supported:
        raise CheckpointError(
            f"{path}: format '{fmt}' version {v} was written by a newer release of this toolkit; "
            f"this reader supports versions 1..{supported}. Update the code to read it."
        )
    return v


def _check_fields(obj: Mapping[str, Any], fields: Sequence[str], fmt: str, path: Path) -> None:
    missing = [f for f in fields if f not in obj]
    if missing:
        raise CheckpointError(f"{path}: '{fmt}' checkpoint lacks required field(s) {missing}")


def _fmt_keys(keys: Sequence[str], limit: int = 10) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _diff_keys(
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


def _key_error(prefix: str, missing: list, unexpected: list, shapes: list) -> CheckpointError:
    parts = [prefix]
    if missing:
        parts.append(f"missing keys ({len(missing)}): {_fmt_keys(missing)}")
    if unexpected:
        parts.append(f"unexpected keys ({len(unexpected)}): {_fmt_keys(unexpected)}")
    if shapes:
        parts.append(f"shape mismatches ({len(shapes)}): {'; '.join(shapes[:5])}")
    return CheckpointError("\n  ".join(parts))


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


def _reference_backbone(arch: str, stem: str) -> "OrderedDict[str, torch.Tensor]":
    """Key -> (meta) tensor of the torchvision backbone this project builds for arch/stem."""
    from pretrain.model import ARCHS, STEMS, build_backbone

    if arch not in ARCHS or stem not in STEMS:
        raise CheckpointError(
            f"unknown backbone arch/stem '{arch}'/'{stem}' (arch one of {list(ARCHS)}, "
            f"stem one of {list(STEMS)})"
        )
    # The meta device gives names and shapes without allocating or initialising weights.
    with torch.device("meta"):
        net = build_backbone(arch, zero_init_residual=False, stem=stem)
    return net.state_dict()


def _validate_backbone(
    sd: Mapping[str, torch.Tensor], arch: str, stem: str, path: Path, source: str
) -> tuple["OrderedDict[str, torch.Tensor]", list[str]]:
    """Check sd against torchvision's key set; returns it in torchvision order plus notes."""
    expected = _reference_backbone(arch, stem)
    notes: list[str] = []
    missing, unexpected, shapes = _diff_keys(sd, expected)
    # Old torchvision releases (e.g. the original resnet50-19c8e357.pth) predate the
    # num_batches_tracked buffer; it only matters for BN with momentum=None, so fill it.
    filled = [k for k in missing if k.endswith("num_batches_tracked")]
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected or shapes:
        raise _key_error(
            f"{path} ({source}): weights do not match a torchvision {arch} backbone "
            f"(stem '{stem}')",
            missing,
            unexpected,
            shapes,
        )
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    for k in expected:
        out[k] = sd[k] if k in sd else torch.zeros((), dtype=torch.long)
    if filled:
        notes.append(f"filled {len(filled)} missing BatchNorm num_batches_tracked buffers with 0")
    return out, notes


def _infer_arch(sd: Mapping[str, torch.Tensor], path: Path, source: str) -> str:
    from pretrain.model import infer_arch

    try:
        return infer_arch(sd)
    except ValueError as e:
        raise CheckpointError(f"{path} ({source}): {e}") from None


def _infer_stem(sd: Mapping[str, torch.Tensor], path: Path, source: str) -> str:
    from pretrain.model import infer_stem

    try:
        return infer_stem(sd)
    except ValueError as e:
        raise CheckpointError(f"{path} ({source}): {e}") from None


def _arch_stem(config: Any, backbone_sd: Mapping[str, torch.Tensor]) -> tuple[str, str]:
    """arch/stem from the config's model section, else inferred from the weights."""
    from pretrain.model import infer_arch, infer_stem

    model_cfg = _model_section(config)
    try:
        arch = model_cfg.get("arch") or infer_arch(backbone_sd)
        stem = model_cfg.get("stem") or infer_stem(backbone_sd)
    except ValueError as e:
        raise CheckpointError(f"cannot determine the backbone arch/stem: {e}") from None
    return str(arch), str(stem)


# ---------------------------------------------------------------------------------------------
# RNG state
# ---------------------------------------------------------------------------------------------


def capture_rng_state() -> dict[str, Any]:
    """Snapshot every random stream of this process as tensors/ints (weights_only friendly).

    Returns:
        ``{"torch": ByteTensor, "cuda": [ByteTensor per device], "numpy": {...},
        "python": {...}}``.
    """
    np_state = np.random.get_state()
    if np_state[0] != "MT19937":
        raise CheckpointError(f"unsupported numpy bit generator {np_state[0]!r}")
    py_version, py_internal, py_gauss = random.getstate()
    cuda = [s.clone() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else []
    return {
        "torch": torch.get_rng_state().clone(),
        "cuda": cuda,
        "numpy": {
            "bit_generator": "MT19937",
            "state": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64).copy()),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {
            "version": int(py_version),
            "state": torch.tensor(py_internal, dtype=torch.int64),
            "gauss_next": None if py_gauss is None else float(py_gauss),
        },
    }


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Restore the streams captured by :func:`capture_rng_state`.

    CUDA states are restored for the devices present (a different device count is logged);
    saved CUDA states are ignored on a machine without CUDA.

    Args:
        state: the dict returned by :func:`capture_rng_state` (e.g. ``train_state["rng"]``).
    """
    try:
        torch.set_rng_state(state["torch"].cpu().to(torch.uint8))
        np_s = state["numpy"]
        np.random.set_state(
            (
                np_s["bit_generator"],
                np_s["state"].cpu().numpy().astype(np.uint32),
                int(np_s["pos"]),
                int(np_s["has_gauss"]),
                float(np_s["cached_gaussian"]),
            )
        )
        py = state["python"]
        random.setstate(
            (int(py["version"]), tuple(int(x) for x in py["state"].tolist()), py["gauss_next"])
        )
        cuda = list(state.get("cuda") or [])
    except (KeyError, TypeError, AttributeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"invalid RNG state in checkpoint ({type(e).__name__}: {e})") from e
    if cuda:
        if not torch.cuda.is_available():
            logger.info("checkpoint holds CUDA RNG states but CUDA is unavailable: not restored")
        else:
            n = torch.cuda.device_count()
            if n != len(cuda):
                logger.warning(
                    "checkpoint holds %d CUDA RNG states, this machine has %d devices: "
                    "restoring the first %d",
                    len(cuda),
                    n,
                    min(n, len(cuda)),
                )
            for i in range(min(n, len(cuda))):
                torch.cuda.set_rng_state(cuda[i].cpu().to(torch.uint8), i)


def rng_state_for_rank(state: Mapping[str, Any], rank: int, world_size: int) -> dict | None:
    """Pick the RNG snapshot a given rank should restore from a training state.

    Args:
        state: a loaded training state.
        rank: this process's rank.
        world_size: the current number of processes.

    Returns:
        The rank's own snapshot when per-rank states were saved for the same world size; the
        single saved snapshot for a one-process run; otherwise None (the caller should re-seed,
        e.g. with seed + rank + step, rather than give every rank the same streams).
    """
    per_rank = state.get("rng_per_rank")
    if isinstance(per_rank, list) and len(per_rank) == world_size:
        return per_rank[rank]
    if world_size == 1 and state.get("rng") is not None:
        return state["rng"]
    return None


# ---------------------------------------------------------------------------------------------
# training state
# ---------------------------------------------------------------------------------------------


def checkpoint_name(epoch: int, step: int) -> str:
    """File name of a training state: ``checkpoint_e{epoch:04d}_s{step:08d}.pth``."""
    if epoch < 0 or step < 0:
        raise ValueError(f"epoch and step must be >= 0 (got epoch={epoch}, step={step})")
    return f"checkpoint_e{epoch:04d}_s{step:08d}.pth"


def save_training_state(
    path: str | os.PathLike,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scaler: Any | None,
    epoch: int,
    step: int,
    step_in_epoch: int,
    config: Mapping[str, Any],
    extra: Mapping[str, Any] | None = None,
    rng: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
) -> Path:
    """Atomically write an ``imsvd-train-state`` checkpoint.

    Position convention: ``(epoch, step_in_epoch)`` is where training resumes; ``epoch`` is the
    0-based epoch in progress and ``step_in_epoch`` the optimizer steps of it already done. At
    the end of epoch e save ``epoch=e+1, step_in_epoch=0``. ``step`` counts all optimizer steps.

    Args:
        path: destination (use :func:`checkpoint_name` inside the output folder).
        model: the IMSVDModel, possibly wrapped in DDP / DataParallel / torch.compile; its
            state_dict must consist of ``backbone.*`` and ``projector.*`` keys.
        optimizer: optimizer whose state_dict is stored (None allowed).
        scaler: torch.amp.GradScaler or None; a disabled scaler is stored as None.
        epoch: epoch in progress (0-based), see above.
        step: global optimizer step count.
        step_in_epoch: optimizer steps done in ``epoch``.
        config: the resolved config (plain nested dict).
        extra: optional plain dict for additional engine state (e.g. meters, sampler state).
        rng: None to capture this process's RNG streams; a dict to store it; a list with one dict
            per rank (rank order) to store every rank's streams (``rng`` is then rank 0's).

    Returns:
        The written path.
    """
    net = unwrap_model(model)
    model_sd = net.state_dict()
    if any(k.startswith("module.") for k in model_sd):
        model_sd = OrderedDict((k.removeprefix("module."), v) for k, v in model_sd.items())
    bad = [k for k in model_sd if not k.startswith(("backbone.", "projector."))]
    if bad or not any(k.startswith("backbone.") for k in model_sd):
        raise CheckpointError(
            "save_training_state expects an IMSVDModel (keys backbone.* and projector.*); "
            f"got keys such as {_fmt_keys(bad or list(model_sd), 5)}"
        )
    if not isinstance(config, Mapping):
        raise CheckpointError(f"config must be a plain dict, got {type(config).__name__}")
    arch, stem = _arch_stem(config, _strip_prefix(model_sd, "backbone."))
    for name, v in (("epoch", epoch), ("step", step), ("step_in_epoch", step_in_epoch)):
        if type(v) is not int or v < 0:
            raise CheckpointError(f"save_training_state: {name} must be an int >= 0, got {v!r}")

    scaler_sd = None
    if scaler is not None and getattr(scaler, "is_enabled", lambda: True)():
        scaler_sd = scaler.state_dict()
    rng_per_rank = None
    if rng is None:
        rng_main: Mapping[str, Any] = capture_rng_state()
    elif isinstance(rng, Mapping):
        rng_main = rng
    else:
        rng_per_rank = [dict(r) for r in rng]
        if not rng_per_rank:
            raise CheckpointError("save_training_state: rng list is empty")
        rng_main = rng_per_rank[0]

    state: dict[str, Any] = {
        "format": TRAIN_STATE_FORMAT,
        "format_version": TRAIN_STATE_VERSION,
        "arch": arch,
        "stem": stem,
        "epoch": epoch,
        "step": step,
        "step_in_epoch": step_in_epoch,
        "model": model_sd,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scaler": scaler_sd,
        "rng": dict(rng_main),
        "config": dict(config),
        "created": _now(),
        "torch_version": str(torch.__version__),
        "extra": dict(extra) if extra is not None else None,
    }
    if rng_per_rank is not None:
        state["rng_per_rank"] = rng_per_rank
    return atomic_torch_save(state, path)


def _validate_train_state(obj: Any, path: Path) -> dict[str, Any]:
    if not isinstance(obj, Mapping):
        raise _unrecognised(path, obj, f"a '{TRAIN_STATE_FORMAT}' checkpoint")
    fmt = obj.get("format")
    if fmt != TRAIN_STATE_FORMAT:
        hint = ""
        if fmt == BACKBONE_FORMAT:
            hint = " It is an exported backbone (read it with load_backbone); resume needs a "
            hint += "training state (checkpoint_e*_s*.pth)."
        elif fmt is None:
            hint = f" Found {_describe(obj)}."
        raise CheckpointError(
            f"{path}: expected format '{TRAIN_STATE_FORMAT}', found "
            f"{repr(fmt) if fmt is not None else 'no format field'}.{hint}"
        )
    _check_version(obj, TRAIN_STATE_FORMAT, TRAIN_STATE_VERSION, path)
    _check_fields(obj, _REQUIRED_TRAIN_FIELDS, TRAIN_STATE_FORMAT, path)
    if not _is_tensor_dict(obj["model"]):
        raise CheckpointError(f"{path}: field 'model' is not a non-empty dict of tensors")
    return dict(obj)


def load_training_state(
    path: str | os.PathLike, map_location: Any = "cpu", *, allow_unsafe: bool = False
) -> dict[str, Any]:
    """Read and validate an ``imsvd-train-state`` checkpoint.

    Args:
        path: checkpoint file.
        map_location: passed to torch.load.
        allow_unsafe: permit full unpickling of files that weights_only loading refuses.

    Returns:
        The checkpoint dict (fields as in the spec).
    """
    path = Path(path)
    return _validate_train_state(_torch_load(path, map_location, allow_unsafe), path)


def restore_training_state(
    state: Mapping[str, Any],
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scaler: Any | None = None,
) -> dict[str, int]:
    """Load model (strict), optimizer and scaler states from a loaded training state.

    RNG streams are not touched: call ``restore_rng_state(rng_state_for_rank(...))`` after the
    data pipeline is rebuilt.

    Args:
        state: dict from :func:`load_training_state`.
        model: the IMSVDModel (may be DDP-wrapped); its keys must match exactly.
        optimizer: optimizer to restore, or None to skip.
        scaler: GradScaler to restore, or None to skip.

    Returns:
        ``{"epoch", "step", "step_in_epoch"}``: the position to resume from.
    """
    net = unwrap_model(model)
    saved = state["model"]
    own = net.state_dict()
    missing, unexpected, shapes = _diff_keys(saved, own)
    if missing or unexpected or shapes:
        raise _key_error(
            "training state does not match the model being restored", missing, unexpected, shapes
        )
    net.load_state_dict(saved, strict=True)
    if optimizer is not None:
        if state.get("optimizer") is None:
            raise CheckpointError("training state holds no optimizer state to restore")
        try:
            optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(
                f"optimizer state does not match the optimizer being restored: {e}"
            ) from None
    if scaler is not None and getattr(scaler, "is_enabled", lambda: True)():
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        else:
            logger.warning(
                "training state holds no gradient-scaler state (saved without fp16); "
                "the scaler starts from its defaults"
            )
    return {
        "epoch": int(state["epoch"]),
        "step": int(state["step"]),
        "step_in_epoch": int(state["step_in_epoch"]),
    }


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Training-state files in ``directory`` named by :func:`checkpoint_name`, oldest first.

    Temporary files (``.checkpoint_...tmp``) and other names are ignored.
    """
    d = Path(directory)
    if not d.is_dir():
        return []
    found = []
    for p in d.iterdir():
        m = CHECKPOINT_RE.match(p.name)
        if m and p.is_file():
            found.append(((int(m.group(2)), int(m.group(1))), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The training state with the highest global step in ``directory`` (None if there is none).

    Args:
        directory: the run's output folder.

    Returns:
        Path of the newest checkpoint or None.
    """
    found = list_checkpoints(directory)
    return found[-1] if found else None


def prune_checkpoints(directory: str | os.PathLike, keep_last: int | None) -> list[Path]:
    """Delete all but the ``keep_last`` newest training states.

    Args:
        directory: the run's output folder.
        keep_last: number to keep; None or <= 0 keeps everything.

    Returns:
        The deleted paths.
    """
    if keep_last is None or keep_last <= 0:
        return []
    found = list_checkpoints(directory)
    doomed = found[:-keep_last] if len(found) > keep_last else []
    for p in doomed:
        p.unlink(missing_ok=True)
    return doomed


# ---------------------------------------------------------------------------------------------
# exported backbone
# ---------------------------------------------------------------------------------------------


def export_backbone(
    path: str | os.PathLike,
    backbone_state_dict: Mapping[str, torch.Tensor],
    *,
    arch: str,
    stem: str,
    epoch: int,
    config: Mapping[str, Any] | None,
) -> str:
    """Atomically write an ``imsvd-backbone`` file (torchvision names, no fc, content hash).

    Args:
        path: destination file.
        backbone_state_dict: ``model.backbone.state_dict()`` (torchvision names, no fc).
        arch: resnet18/34/50/101.
        stem: "standard", "small" or "small_s2" (records whether the max-pool is used).
        epoch: number of completed training epochs.
        config: the resolved config (plain dict) or None.

    Returns:
        The content hash (hex sha256) stored in the file.
    """
    from pretrain.model import ARCHS, STEMS

    path = Path(path)
    if arch not in ARCHS:
        raise CheckpointError(f"export_backbone: unknown arch '{arch}' (one of {ARCHS})")
    if stem not in STEMS:
        raise CheckpointError(f"export_backbone: unknown stem '{stem}' (one of {STEMS})")
    sd = OrderedDict((k, v.detach().cpu().contiguous()) for k, v in backbone_state_dict.items())
    sd, _ = _validate_backbone(sd, arch, stem, path, "export_backbone input")
    digest = tensor_sha256(sd)
    obj = {
        "format": BACKBONE_FORMAT,
        "format_version": BACKBONE_VERSION,
        "arch": arch,
        "stem": stem,
        "epoch": int(epoch),
        "config": dict(config) if config is not None else None,
        "state_dict": sd,
        "hash_scheme": HASH_SCHEME,
        "sha256": digest,
        "created": _now(),
        "torch_version": str(torch.__version__),
    }
    atomic_torch_save(obj, path)
    return digest


def _extract_backbone(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Detect the checkpoint kind by content and return (raw backbone sd, partial meta)."""
    if not isinstance(obj, Mapping):
        raise _unrecognised(path, obj)
    meta: dict[str, Any] = {"epoch": None, "config": None, "notes": []}
    fmt = obj.get("format")
    if isinstance(fmt, str):
        if fmt == BACKBONE_FORMAT:
            meta["format_version"] = _check_version(obj, fmt, BACKBONE_VERSION, path)
            _check_fields(obj, _REQUIRED_BACKBONE_FIELDS, fmt, path)
            if not _is_tensor_dict(obj["state_dict"]):
                raise CheckpointError(f"{path}: field 'state_dict' is not a dict of tensors")
            meta.update(
                source_format=BACKBONE_FORMAT,
                arch=obj["arch"],
                stem=obj["stem"],
                epoch=obj["epoch"],
                config=obj["config"],
                stored_sha256=obj["sha256"],
                created=obj.get("created"),
                torch_version=obj.get("torch_version"),
            )
            return dict(obj["state_dict"]), meta
        if fmt == TRAIN_STATE_FORMAT:
            st = _validate_train_state(obj, path)
            meta.update(
                source_format=TRAIN_STATE_FORMAT,
                format_version=st["format_version"],
                arch=st["arch"],
                stem=st["stem"],
                epoch=st["epoch"],
                step=st["step"],
                step_in_epoch=st["step_in_epoch"],
                config=st["config"],
                created=st.get("created"),
                torch_version=st.get("torch_version"),
                _model=st["model"],
            )
            return _strip_prefix(st["model"], "backbone."), meta
        raise CheckpointError(
            f"{path}: unknown checkpoint format '{fmt}' (this reader knows "
            f"'{BACKBONE_FORMAT}' and '{TRAIN_STATE_FORMAT}')"
        )

    # Foreign files: a dict of tensors at the top level or under 'model' / 'state_dict'.
    wrapper = None
    if _is_tensor_dict(obj):
        sd: Mapping[str, torch.Tensor] = obj
    else:
        for w in ("model", "state_dict"):
            if _is_tensor_dict(obj.get(w)):
                wrapper, sd = w, obj[w]
                break
        else:
            raise _unrecognised(path, obj)
    if isinstance(obj.get("epoch"), int) and not isinstance(obj.get("epoch"), bool):
        meta["epoch"] = obj["epoch"]
    if all(k.startswith("module.") for k in sd):
        sd = _strip_prefix(sd, "module.")
        meta["notes"].append("stripped the 'module.' prefix")
    keys = list(sd)
    meta["_model"] = sd
    if any(k.startswith("backbone.") for k in keys):
        meta["source_format"] = (
            "imsvd-reference-model" if wrapper == "model" else "imsvd-model-state-dict"
        )
        return _strip_prefix(sd, "backbone."), meta
    if any(k.startswith("encoder_q.") for k in keys):
        meta["source_format"] = "moco"
        q = _strip_prefix(sd, "encoder_q.")
        dropped = [k for k in q if k.startswith("fc.")]
        if dropped:
            meta["notes"].append(f"dropped the MoCo projection head ({', '.join(dropped)})")
        return OrderedDict((k, v) for k, v in q.items() if not k.startswith("fc.")), meta
    if "conv1.weight" in sd and any(k.startswith("layer1.") for k in keys):
        meta["source_format"] = "torchvision-state-dict"
        if wrapper is not None:
            meta["notes"].append(f"weights read from the '{wrapper}' entry")
        dropped = [k for k in keys if k.startswith("fc.")]
        if dropped:
            meta["notes"].append(f"dropped the classifier ({', '.join(dropped)})")
        return OrderedDict((k, v) for k, v in sd.items() if not k.startswith("fc.")), meta
    raise _unrecognised(path, obj)


def load_backbone(
    path: str | os.PathLike,
    map_location: Any = "cpu",
    *,
    allow_unsafe: bool = False,
    verify_hash: bool = True,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read ResNet backbone weights from any accepted checkpoint kind (detected by content).

    Args:
        path: checkpoint file.
        map_location: passed to torch.load.
        allow_unsafe: permit full unpickling of files that weights_only loading refuses (only
            for files from a trusted source).
        verify_hash: check the stored content hash of exported backbones.

    Returns:
        ``(state_dict, meta)``. state_dict has exactly the keys of this project's
        ``build_backbone(arch, stem=stem)`` (torchvision names, no fc; num_batches_tracked kept,
        or filled with 0 when the file predates it). meta holds ``source_format``, ``arch``,
        ``stem``, ``stem_source`` ("metadata" or "inferred"), ``epoch`` (None if unknown),
        ``sha256`` (content hash of the returned weights), ``config`` (None for foreign files),
        ``notes`` (what was dropped, stripped or filled) and ``path``.
    """
    path = Path(path)
    obj = _torch_load(path, map_location, allow_unsafe)
    raw, meta = _extract_backbone(obj, path)
    meta.pop("_model", None)
    source = meta["source_format"]
    if not raw:
        raise CheckpointError(f"{path} ({source}): no backbone weights found")
    if "arch" in meta:
        arch, stem = str(meta["arch"]), str(meta["stem"])
        meta["stem_source"] = "metadata"
    else:
        arch = _infer_arch(raw, path, source)
        stem = _infer_stem(raw, path, source)
        meta["stem_source"] = "inferred"
        if stem != "standard":
            meta["notes"].append(
                "3x3 stem inferred from conv1; whether it used a max-pool is not recorded in "
                "this file (assumed 'small': stride 1, no max-pool)"
            )
    sd, notes = _validate_backbone(raw, arch, stem, path, source)
    meta["notes"].extend(notes)
    digest = tensor_sha256(sd)
    stored = meta.pop("stored_sha256", None)
    if stored is not None and verify_hash and stored != digest:
        raise CheckpointError(
            f"{path}: content hash mismatch (stored {stored}, computed {digest}); the file was "
            "modified or corrupted after export"
        )
    meta.update(arch=arch, stem=stem, sha256=digest, path=str(path))
    return dict(sd), meta


# ---------------------------------------------------------------------------------------------
# projector
# ---------------------------------------------------------------------------------------------


def _projector_meta(sd: Mapping[str, torch.Tensor], path: Path) -> dict[str, Any]:
    linears = []
    for k, v in sd.items():
        head, _, name = k.partition(".")
        if not head.isdigit():
            raise CheckpointError(f"{path}: unexpected projector key 'projector.{k}'")
        if name == "weight" and v.dim() == 2:
            linears.append((int(head), v))
    if not linears:
        raise CheckpointError(f"{path}: projector weights hold no Linear layer")
    linears.sort(key=lambda t: t[0])
    spec = "-".join(str(w.shape[0]) for _, w in linears)
    in_dim = int(linears[0][1].shape[1])
    meta: dict[str, Any] = {
        "spec": spec,
        "in_dim": in_dim,
        "out_dim": int(linears[-1][1].shape[0]),
        "num_linear": len(linears),
        "linear_bias": [f"{i}.bias" in sd for i, _ in linears],
    }
    from pretrain.model import Projector

    with torch.device("meta"):
        expected = Projector(in_dim, spec).state_dict()
    missing, unexpected, shapes = _diff_keys(sd, expected)
    meta["matches_projector"] = not (missing or unexpected or shapes)
    if not meta["matches_projector"]:
        meta["mismatch"] = {"missing": missing, "unexpected": unexpected, "shapes": shapes}
    return meta


def load_projector(
    path: str | os.PathLike, map_location: Any = "cpu", *, allow_unsafe: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read the projector weights from a training state or the reference model.pth.

    Args:
        path: checkpoint file.
        map_location: passed to torch.load.
        allow_unsafe: permit full unpickling of files that weights_only loading refuses.

    Returns:
        ``(state_dict, meta)``: nn.Sequential-style keys ("0.weight", "1.running_mean", ...);
        meta holds ``source_format``, ``spec`` (e.g. "8192-8160", from the Linear shapes),
        ``in_dim``, ``out_dim``, ``num_linear``, ``linear_bias``, ``matches_projector`` (whether
        ``pretrain.model.Projector(in_dim, spec)`` loads it strictly; else ``mismatch``),
        ``epoch`` and ``path``.
    """
    path = Path(path)
    obj = _torch_load(path, map_location, allow_unsafe)
    if isinstance(obj, Mapping) and obj.get("format") == BACKBONE_FORMAT:
        raise CheckpointError(
            f"{path} is an exported backbone ('{BACKBONE_FORMAT}'), which carries no projector; "
            "use a training-state checkpoint (checkpoint_e*_s*.pth) of the same run"
        )
    try:
        raw, meta = _extract_backbone(obj, path)
    except CheckpointError:
        raise _unrecognised(path, obj, "a projector") from None
    source = meta["source_format"]
    if source not in (TRAIN_STATE_FORMAT, "imsvd-reference-model", "imsvd-model-state-dict"):
        raise CheckpointError(
            f"{path} ({source}) holds a backbone only, no projector; projectors are read from "
            f"this project's training state or the reference IMSVD model.pth"
        )
    sd = _strip_prefix(meta["_model"], "projector.")
    if not sd:
        raise CheckpointError(f"{path} ({source}): no 'projector.*' weights found")
    pmeta = _projector_meta(sd, path)
    pmeta.update(source_format=source, epoch=meta.get("epoch"), path=str(path))
    return dict(sd), pmeta

"""Training state (``imsvd-train-state``): save with a content hash, load and verify, restore,
and the checkpoint files of a run folder (list, newest loadable, prune).

Position convention: ``(epoch, step_in_epoch)`` is where training resumes; ``epoch`` is the
0-based epoch in progress and ``step_in_epoch`` the optimizer steps of it already done. At the
end of epoch e a state is saved with ``epoch=e+1, step_in_epoch=0``. ``step`` counts all
optimizer steps.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from pretrain.models.resnet import infer_arch, infer_stem

from .atomic import atomic_torch_save
from .common import (
    BACKBONE_FORMAT,
    CHECKPOINT_RE,
    REQUIRED_TRAIN_FIELDS,
    TRAIN_HASH_SCHEME,
    TRAIN_STATE_FORMAT,
    TRAIN_STATE_VERSION,
    CheckpointError,
    check_fields,
    check_version,
    collect_tensors,
    describe,
    diff_keys,
    fmt_keys,
    fold_out_norm,
    is_tensor_dict,
    key_error,
    model_section,
    now_utc,
    strip_prefix,
    tensor_sha256,
    unwrap_model,
)
from .rng import capture_rng_state
from .safe_load import read_torch_file

logger = logging.getLogger("imsvd.checkpoint")


def _arch_stem(config: Any, backbone_sd: Mapping[str, torch.Tensor]) -> tuple[str, str]:
    """arch/stem from the config's model section, else inferred from the weights."""
    model_cfg = model_section(config)
    try:
        arch = model_cfg.get("arch") or infer_arch(backbone_sd)
        stem = model_cfg.get("stem") or infer_stem(backbone_sd)
    except ValueError as e:
        raise CheckpointError(f"cannot determine the backbone arch/stem: {e}") from None
    return str(arch), str(stem)


def train_state_sha256(state: Mapping[str, Any]) -> str:
    """Content hash of a training state's tensors (scheme ``imsvd-train-sha256-v1``).

    The ``imsvd-tensor-sha256-v1`` digest of one flat dict holding every tensor of ``model``
    under ``model/<key>`` and every tensor nested in ``optimizer`` under its path
    (``optimizer/state/<index>/<name>``, ``optimizer/param_groups/<i>/<name>``).

    Args:
        state: a training-state dict (``model`` and ``optimizer`` entries).

    Returns:
        The hexadecimal digest.
    """
    flat: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    collect_tensors(state.get("model"), "model", flat)
    collect_tensors(state.get("optimizer"), "optimizer", flat)
    return tensor_sha256(flat)


def checkpoint_name(epoch: int, step: int) -> str:
    """File name of a training state: ``checkpoint_e{epoch:04d}_s{step:08d}.pth``."""
    if epoch < 0 or step < 0:
        raise ValueError(f"epoch and step must be >= 0 (got epoch={epoch}, step={step})")
    return f"checkpoint_e{epoch:04d}_s{step:08d}.pth"


def _model_state(model: nn.Module) -> "OrderedDict[str, torch.Tensor]":
    """The state dict of a (possibly wrapped) PretrainModel, without a ``module.`` prefix."""
    model_sd = unwrap_model(model).state_dict()
    if any(k.startswith("module.") for k in model_sd):
        model_sd = OrderedDict((k.removeprefix("module."), v) for k, v in model_sd.items())
    bad = [k for k in model_sd if not k.startswith(("backbone.", "projector."))]
    if bad or not any(k.startswith("backbone.") for k in model_sd):
        raise CheckpointError(
            "save_training_state expects a PretrainModel (keys backbone.* and projector.*); "
            f"got keys such as {fmt_keys(bad or list(model_sd), 5)}"
        )
    return model_sd


def _check_position(config, **position: int) -> None:
    """CheckpointError unless ``config`` is a mapping and each position an int >= 0."""
    if not isinstance(config, Mapping):
        raise CheckpointError(f"config must be a plain dict, got {type(config).__name__}")
    for name, v in position.items():
        if type(v) is not int or v < 0:
            raise CheckpointError(f"save_training_state: {name} must be an int >= 0, got {v!r}")


def _rng_fields(rng) -> tuple[dict, list | None]:
    """(rank 0's RNG state, every rank's or None) from ``save_training_state``'s ``rng``."""
    if rng is None:
        return dict(capture_rng_state()), None
    if isinstance(rng, Mapping):
        return dict(rng), None
    per_rank = [dict(r) for r in rng]
    if not per_rank:
        raise CheckpointError("save_training_state: rng list is empty")
    return per_rank[0], per_rank


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
    """Atomically write an ``imsvd-train-state`` checkpoint (positions: the module docstring).

    Args:
        path: destination (use :func:`checkpoint_name` inside the output folder).
        model: the PretrainModel, possibly wrapped in DDP / DataParallel / torch.compile; its
            state_dict must consist of ``backbone.*`` and ``projector.*`` keys (the norm of
            ``model.out_norm: bn`` is the projector's last layer).
        optimizer: optimizer whose state_dict is stored (None allowed).
        scaler: torch.amp.GradScaler or None; a disabled scaler is stored as None.
        epoch: epoch in progress (0-based).
        step: global optimizer step count.
        step_in_epoch: optimizer steps done in ``epoch``.
        config: the resolved config (plain nested dict).
        extra: optional plain dict for additional engine state (e.g. meters, sampler state).
        rng: None to capture this process's RNG streams; a dict to store it; a list with one dict
            per rank (rank order) to store every rank's streams (``rng`` is then rank 0's).

    Returns:
        The written path.
    """
    model_sd = _model_state(model)
    _check_position(config, epoch=epoch, step=step, step_in_epoch=step_in_epoch)
    arch, stem = _arch_stem(config, strip_prefix(model_sd, "backbone."))
    enabled = scaler is not None and getattr(scaler, "is_enabled", lambda: True)()
    scaler_sd = scaler.state_dict() if enabled else None
    rng_main, rng_per_rank = _rng_fields(rng)

    state: dict[str, Any] = {
        "format": TRAIN_STATE_FORMAT,
        "format_version": TRAIN_STATE_VERSION,
        **dict(arch=arch, stem=stem, epoch=epoch, step=step, step_in_epoch=step_in_epoch),
        "model": model_sd,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scaler": scaler_sd,
        "rng": dict(rng_main),
        "config": dict(config),
        "created": now_utc(),
        "torch_version": str(torch.__version__),
        "extra": dict(extra) if extra is not None else None,
    }
    if rng_per_rank is not None:
        state["rng_per_rank"] = rng_per_rank
    state["hash_scheme"] = TRAIN_HASH_SCHEME
    state["sha256"] = train_state_sha256(state)
    return atomic_torch_save(state, path)


def validate_train_state(obj: Any, path: Path, verify_hash: bool = True) -> dict[str, Any]:
    """Check format, version, fields and (version >= 2) the content hash of a training state.

    Args:
        obj: the unpickled file content.
        path: the file (for messages).
        verify_hash: recompute and compare the stored ``sha256``.

    Returns:
        The state as a dict.

    Raises:
        CheckpointError: naming the file and what is wrong.
    """
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path}: expected a '{TRAIN_STATE_FORMAT}' checkpoint, found {describe(obj)}"
        )
    fmt = obj.get("format")
    if fmt != TRAIN_STATE_FORMAT:
        hint = ""
        if fmt == BACKBONE_FORMAT:
            hint = " It is an exported backbone (read it with load_backbone); resume needs a "
            hint += "training state (checkpoint_e*_s*.pth)."
        elif fmt is None:
            hint = f" Found {describe(obj)}."
        raise CheckpointError(
            f"{path}: expected format '{TRAIN_STATE_FORMAT}', found "
            f"{repr(fmt) if fmt is not None else 'no format field'}.{hint}"
        )
    version = check_version(obj, TRAIN_STATE_FORMAT, TRAIN_STATE_VERSION, path)
    required = REQUIRED_TRAIN_FIELDS + (("hash_scheme", "sha256") if version >= 2 else ())
    check_fields(obj, required, TRAIN_STATE_FORMAT, path)
    if not is_tensor_dict(obj["model"]):
        raise CheckpointError(f"{path}: field 'model' is not a non-empty dict of tensors")
    if version >= 2 and verify_hash:
        if obj["hash_scheme"] != TRAIN_HASH_SCHEME:
            raise CheckpointError(
                f"{path}: unknown hash_scheme {obj['hash_scheme']!r} (expected "
                f"'{TRAIN_HASH_SCHEME}')"
            )
        digest = train_state_sha256(obj)
        if digest != obj["sha256"]:
            raise CheckpointError(
                f"{path}: content hash mismatch of the model/optimizer tensors (stored "
                f"{obj['sha256']}, computed {digest}); the file was modified or corrupted after "
                "it was written"
            )
    return dict(obj)


def load_training_state(
    path: str | os.PathLike,
    map_location: Any = "cpu",
    *,
    allow_unsafe: bool = False,
    verify_hash: bool = True,
) -> dict[str, Any]:
    """Read and validate an ``imsvd-train-state`` checkpoint (content hash checked for v2+).

    Args:
        path: checkpoint file.
        map_location: passed to torch.load.
        allow_unsafe: permit a full unpickle of files the safe readers refuse.
        verify_hash: check the stored content hash (format_version >= 2; v1 files have none).

    Returns:
        The checkpoint dict (fields as in the spec).

    Raises:
        CheckpointError: unreadable file, wrong format, missing fields or hash mismatch.
    """
    path = Path(path)
    obj, _ = read_torch_file(path, map_location, allow_unsafe)
    return validate_train_state(obj, path, verify_hash)


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
        model: the PretrainModel (may be DDP-wrapped); its keys must match exactly.
        optimizer: optimizer to restore, or None to skip.
        scaler: GradScaler to restore, or None to skip.

    Returns:
        ``{"epoch", "step", "step_in_epoch"}``: the position to resume from.
    """
    net = unwrap_model(model)
    saved = fold_out_norm(state["model"])  # a state of the earlier out_norm.* layout resumes too
    own = net.state_dict()
    missing, unexpected, shapes = diff_keys(saved, own)
    if missing or unexpected or shapes:
        raise key_error(
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


def load_latest_training_state(
    directory: str | os.PathLike, map_location: Any = "cpu"
) -> tuple[Path | None, dict[str, Any] | None]:
    """Load the newest training state of a run folder that reads and verifies.

    Files are tried newest first (highest step); one that fails to load, validate or match
    its content hash is skipped with a logged warning naming it, and the previous one is tried.

    Args:
        directory: the run's output folder.
        map_location: passed to torch.load.

    Returns:
        ``(path, state)`` of the newest good file, or ``(None, None)`` when there is no
        training-state file at all.

    Raises:
        CheckpointError: when files exist but none of them loads (each failure is listed):
            starting from scratch silently would discard the run.
    """
    failures = []
    for path in reversed(list_checkpoints(directory)):
        try:
            return path, load_training_state(path, map_location)
        except CheckpointError as e:
            logger.warning("skipping unusable training state %s: %s", path, e)
            failures.append(f"{path.name}: {str(e).splitlines()[0]}")
    if failures:
        raise CheckpointError(
            f"{directory}: none of the {len(failures)} training states could be loaded:\n  "
            + "\n  ".join(failures)
        )
    return None, None

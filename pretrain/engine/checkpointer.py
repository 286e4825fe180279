"""When and how a pretraining run saves, resumes and exports (the engine's checkpoint policy).

:class:`Checkpointer` owns the run folder's checkpoint side, in the spirit of Detectron2's
PeriodicCheckpointer and timm's CheckpointSaver; the file formats themselves belong to
:mod:`pretrain.checkpoint`, the one reader and writer of checkpoint artifacts.

* one run per folder: an exclusive lock (``.lock``) while the run lives; stale temporary files
  of a killed write are removed at start;
* resume: the newest training state that loads and verifies (a corrupt or bit-flipped newest
  file falls back to the previous one, with a warning); its recipe is compared with the current
  one and a change of any key that changes the run is refused with the list of differences
  (``checkpoint.allow_config_change=true`` continues anyway);
* saving: every rank's RNG streams are gathered; parameters and buffers must be finite (a
  diverged model is never written over the last good state); a full disk is one clear error;
  the newest ``checkpoint.keep_last`` training states are kept;
* export: ``backbone_final.pth`` only once the schedule's last step is done.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from pretrain import checkpoint as ckpt
from pretrain import dist
from pretrain.errors import IMSVDError

logger = logging.getLogger("imsvd")

FINAL_BACKBONE = "backbone_final.pth"

# Keys that do not change what the run computes: a resume may change them freely (data moved to
# another mount, more workers, other logging or probe settings, another checkpoint policy).
RUN_NEUTRAL_KEYS = (
    "data.root",
    "data.num_workers",
    "data.pin_memory",
    "data.pipeline",
    "data.strict",
    "train.device",
    "train.compile",
    "train.monitors",
    "train.channels_last",
    "checkpoint.",
    "log.",
    "eval.",
)


class CheckpointWriteError(IMSVDError, RuntimeError):
    """A checkpoint could not be written (disk full, permissions); the message names the path."""


class NonFiniteStateError(IMSVDError, RuntimeError):
    """Parameters or buffers hold NaN/inf; nothing was written over the last good checkpoint."""


class RunFolderBusyError(IMSVDError, RuntimeError):
    """Another live run holds the output folder's lock."""


class ConfigChangedError(IMSVDError, ValueError):
    """Resuming with a recipe that changes the run (the message lists the differing keys)."""


def _flatten(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = list(v) if isinstance(v, tuple) else v
    return out


def run_changing_differences(
    saved: Mapping[str, Any], current: Mapping[str, Any], neutral: Sequence[str] = RUN_NEUTRAL_KEYS
) -> list[str]:
    """Keys whose values differ between two resolved configs and change the run: the one rule
    every resume of the toolkit applies (pretraining, the supervised-head trainer).

    Args:
        saved, current: the two resolved configs.
        neutral: keys that do not change the run (a name ending in "." covers a section);
            pretraining's are :data:`RUN_NEUTRAL_KEYS`.
    Returns:
        Lines ``"key: saved -> current"`` (a key absent on one side shows as ``<absent>``),
        sorted; ``neutral`` keys are ignored.
    """
    a, b = _flatten(saved), _flatten(current)
    lines = []
    for key in sorted(set(a) | set(b)):
        if any(key == n or (n.endswith(".") and key.startswith(n)) for n in neutral):
            continue
        va, vb = a.get(key, "<absent>"), b.get(key, "<absent>")
        if va != vb:
            lines.append(f"{key}: {va!r} -> {vb!r}")
    return lines


def first_non_finite(model: nn.Module) -> str | None:
    """Name of the first floating-point parameter or buffer holding NaN/inf (None if all finite)."""
    for name, t in ckpt.unwrap_model(model).state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


class Checkpointer:
    """Checkpoint policy of one pretraining run.

    Args:
        cfg: the resolved config (``checkpoint`` section: output_dir, every_steps, every_epochs,
            keep_last, resume, allow_config_change).
        model: the unwrapped model (backbone + projector).
        optimizer: its optimizer.
        scaler: the GradScaler (saved when enabled).
        info: the process's :class:`pretrain.dist.DistInfo`.
    """

    def __init__(self, cfg: Mapping[str, Any], model, optimizer, scaler, info) -> None:
        self.cfg = cfg
        self.c = cfg["checkpoint"]
        self.out = Path(self.c["output_dir"])
        self.model, self.optimizer, self.scaler, self.info = model, optimizer, scaler, info
        self.last_saved_step: int | None = None
        self.last_saved_path: Path | None = None

    # ------------------------------------------------------------------ resume
    def resume(self) -> tuple[int, int, int]:
        """Restore the newest good training state, if any: (epoch, step_in_epoch, step).

        Raises:
            ConfigChangedError: the stored recipe differs in run-changing keys.
            pretrain.checkpoint.CheckpointError: training states exist but none loads.
        """
        if not self.c["resume"]:
            return 0, 0, 0
        path, state = ckpt.load_latest_training_state(self.out)
        if state is None:
            return 0, 0, 0
        diffs = run_changing_differences(state.get("config") or {}, self.cfg)
        if diffs and not self.c["allow_config_change"]:
            raise ConfigChangedError(
                f"{path} was written by a different recipe; resuming would mix two runs:\n  "
                + "\n  ".join(diffs)
                + f"\nUse another checkpoint.output_dir (this one is {self.out}), or set "
                "checkpoint.allow_config_change=true to continue with the new values."
            )
        if diffs:
            logger.warning("resuming with a changed recipe (allowed): %s", "; ".join(diffs))
        ckpt.restore_training_state(
            state, model=self.model, optimizer=self.optimizer, scaler=self.scaler
        )
        rng = ckpt.rng_state_for_rank(state, self.info.rank, self.info.world_size)
        if rng is not None:
            ckpt.restore_rng_state(rng)
        else:  # per-rank streams were not saved for this world size: fresh, rank-distinct seeds
            torch.manual_seed(self.cfg["train"]["seed"] + self.info.rank + int(state["step"]))
        logger.info("resumed from %s (epoch %d, step %d)", path, state["epoch"], state["step"])
        self.last_saved_step = int(state["step"])
        return int(state["epoch"]), int(state["step_in_epoch"]), int(state["step"])

    # -------------------------------------------------------------------- save
    def save(self, epoch: int, step_in_epoch: int, step: int) -> None:
        """Write a training state (once per step), then prune old ones; every rank calls this.

        Raises:
            NonFiniteStateError: a parameter or buffer is NaN/inf (nothing written).
            CheckpointWriteError: the file could not be written (nothing half-written is left).
        """
        if step == self.last_saved_step:
            return
        rng = None  # one process: save_training_state captures this process's streams
        if self.info.distributed:  # every rank's streams, so each resumes its own
            rng = [None] * self.info.world_size
            torch.distributed.all_gather_object(rng, ckpt.capture_rng_state())
        path = self.out / ckpt.checkpoint_name(epoch, step)
        _, error, failed = dist.run_on_main(
            lambda: self._write(path, epoch, step_in_epoch, step, rng),
            self.info.device,
            (NonFiniteStateError, CheckpointWriteError),
        )
        if error is not None:
            raise error
        if failed:
            raise CheckpointWriteError("the main process could not write the checkpoint")
        self.last_saved_step = step

    def _write(self, path: Path, epoch: int, step_in_epoch: int, step: int, rng) -> None:
        bad = first_non_finite(self.model)
        if bad is not None:
            keep = self.last_saved_path or ckpt.latest_checkpoint(self.out)
            raise NonFiniteStateError(
                f"'{bad}' holds non-finite values at step {step}: checkpoint not written; the "
                f"last finite one ({keep or 'none yet'}) is kept. Try a lower optim.base_lr or "
                f"train.precision=bf16/fp32."
            )
        try:
            ckpt.save_training_state(
                path,
                model=self.model,
                optimizer=self.optimizer,
                scaler=self.scaler if self.scaler.is_enabled() else None,
                epoch=epoch,
                step=step,
                step_in_epoch=step_in_epoch,
                config=dict(self.cfg),
                rng=rng,
            )
        except OSError as e:
            raise CheckpointWriteError(write_error_message(path, e)) from None
        self.last_saved_path = path
        ckpt.prune_checkpoints(self.out, self.c["keep_last"])
        logger.info("saved %s", path)

    def export_final(self, epoch: int) -> Path:
        """Write ``backbone_final.pth`` (main process) and return its path."""
        path = self.out / FINAL_BACKBONE
        if self.info.is_main:
            bad = first_non_finite(self.model.backbone)
            if bad is not None:
                raise NonFiniteStateError(f"'{bad}' holds non-finite values: {path} not written")
            try:
                ckpt.export_backbone(
                    path,
                    self.model.backbone.state_dict(),
                    arch=self.cfg["model"]["arch"],
                    stem=self.cfg["model"]["stem"],
                    epoch=epoch,
                    config=dict(self.cfg),
                )
            except OSError as e:
                raise CheckpointWriteError(write_error_message(path, e)) from None
            logger.info("exported backbone to %s", path)
        dist.barrier()
        return path


def write_error_message(path: Path, e: OSError) -> str:
    """One line for a failed write of ``path`` (a full disk says so and what to do)."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return (
            f"cannot write {path}: no space left on device (free some space, or set "
            f"checkpoint.output_dir to another disk)"
        )
    return f"cannot write {path}: {e.strerror or e}"


class RunFolder:
    """Exclusive use of an output folder by one run (rank 0 holds an flock on ``.lock``).

    Entering removes stale temporary files (``.<name>.<random>.tmp``) of an interrupted write.

    Args:
        out: the folder (created if needed).
        is_main: only rank 0 takes the lock.
        key: the config key that names the folder (in the busy message).

    Raises:
        RunFolderBusyError: another live process holds the lock (its pid is in the message).
    """

    def __init__(self, out: Path, is_main: bool, key: str = "checkpoint.output_dir") -> None:
        self.out, self.is_main, self.key = Path(out), is_main, key
        self._fd: int | None = None

    def __enter__(self) -> "RunFolder":
        if not self.is_main:
            return self
        self.out.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.out / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunFolderBusyError(
                f"output folder {self.out} is in use by another run (pid {holder}); wait for it "
                f"to end or choose another {self.key}"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        for stale in self.out.glob(".*.tmp"):
            stale.unlink(missing_ok=True)
            logger.info("removed the stale temporary file %s of an interrupted write", stale)
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


_BUSY, _LOCK_FAILED = 1, 2


def take_output_folder(out: Path | None, info: dist.DistInfo) -> RunFolder | None:
    """The output folder's lock, taken by rank 0; every rank learns whether it was taken.

    Rank 0 tries the flock (:class:`RunFolder`) and shares the outcome
    (:func:`pretrain.dist.run_on_main`), so that when the folder is busy every rank stops with
    the error, instead of the other ranks going on into collectives rank 0 never joins. Every
    rank must call it, with or without a folder.

    Returns:
        The held lock on rank 0, None on the other ranks or without a folder.

    Raises:
        RunFolderBusyError: another run holds the folder (on every rank; rank 0's message
            names the holder's pid). Rank 0 re-raises its own error when taking the lock failed
            otherwise (e.g. an OSError), the other ranks raise RunFolderBusyError.
    """

    held: list[RunFolder] = []

    def take() -> RunFolder | None:
        if out is not None:
            held.append(RunFolder(out, True, key="output_dir").__enter__())
        return held[0] if held else None

    try:
        lock, error, outcome = dist.run_on_main(
            take,
            info.device,
            (Exception,),  # shared with the other ranks, then re-raised
            lambda e: _BUSY if isinstance(e, RunFolderBusyError) else _LOCK_FAILED,
        )
    except BaseException:  # the exchange failed: the lock is not left held
        for folder in held:
            folder.__exit__(None, None, None)
        raise
    if not outcome:
        return lock
    if error is not None:
        raise error
    if outcome == _BUSY:
        raise RunFolderBusyError(
            f"output folder {out} is in use by another run (found by rank 0); wait for it to "
            "end or choose another output_dir"
        )
    raise RunFolderBusyError(f"rank 0 could not lock the output folder {out} (see its error)")

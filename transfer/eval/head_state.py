"""The supervised-head trainer's files: its checkpoint
(``OUTPUT_DIR/{linear,finetune}_checkpoint.pth``), the rule that decides whether a run may resume
from it, and the export of the fine-tuned backbone.

Format ``imsvd-supervised-state`` version 1, a plain dict written atomically (read with
``weights_only=True``): ``format``, ``format_version``, ``mode`` (frozen | finetune),
``epoch`` / ``step_in_epoch`` / ``step`` (where training resumes: ``epoch`` is the 0-based epoch
in progress, ``step_in_epoch`` the batches of it consumed (skipped ones included), ``step`` the
optimizer steps done), ``head`` and ``backbone`` (state dicts; ``backbone`` None when frozen),
``optimizer``, ``scaler`` (None unless fp16), ``epoch_sums`` (the epoch in progress: loss sum,
steps, unreadable images over all processes), ``history``, ``config``, ``weights_sha256`` (the
pretrained weights read), ``data`` (the training set's signature, :func:`train_signature`) and
``subset`` (:func:`transfer.eval.subsets.apply_subset`).
Files of the earlier linear-probe layout (no ``format``; written at epoch ends) load as frozen
states at ``step_in_epoch`` 0, their recipe read with the values that trainer had for the keys
it did not know (no label subset, fp32, epoch-end checkpoints).

A run resumes only when the weights, the training set and the config agree with the file; the
config is compared with the rule pretraining resumes by
(:func:`pretrain.engine.checkpointer.run_changing_differences`) over every key except
:data:`NEUTRAL_KEYS` (and ``train.epochs`` when both runs use a step schedule: more epochs
extend the run; under cosine they change every epoch's learning rate).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from pretrain.checkpoint import CheckpointError, atomic_torch_save, export_backbone, load_plain
from pretrain.dist import run_on_main
from pretrain.engine.checkpointer import run_changing_differences, write_error_message
from pretrain.errors import IMSVDError

FORMAT, VERSION = "imsvd-supervised-state", 1

# Keys a resumed run may change: where the files are (their content is compared through the
# weights hash and the training set's signature), how much is read at once, logging, checking
# and checkpoint cadence.
NEUTRAL_KEYS = (
    "output_dir",
    "device",
    "model.weights",
    "model.allow_unsafe",
    "data.train_root",
    "data.train_list",
    "data.val_root",
    "data.val_list",
    "data.train_subset",
    "data.num_workers",
    "data.batch_size",
    "data.strict",
    "features.cache_check",
    "features.precision",
    "features.channels_last",
    "train.resume",
    "train.channels_last",
    "train.log_every",
    "train.eval_every",
    "train.checkpoint_every_steps",
)

_V0_FIELDS = ("epoch", "head", "optimizer", "history", "weights_sha256", "data", "config")
_V1_FIELDS = _V0_FIELDS + (
    "format_version",
    "mode",
    "step_in_epoch",
    "step",
    "backbone",
    "scaler",
    "epoch_sums",
    "subset",
)


# Keys the earlier linear-probe trainer did not have, with the behaviour it had: a file of that
# layout is compared as if its recipe had held these values.
_V0_IMPLIED = {
    "data": {"train_subset": "", "train_fraction": 0.0, "subset_seed": 0},
    "train": {"checkpoint_every_steps": 0, "precision": "fp32"},
}


class HeadStateError(IMSVDError, ValueError):
    """A supervised-head checkpoint cannot be read, written or resumed from."""


def train_signature(dataset, base: str | None) -> dict:
    """What identifies a training set for resuming: class names, size and a sample-list hash.

    Paths are hashed relative to ``base`` (the data root, or the list file's folder), so the
    same tree moved elsewhere keeps its signature.

    Returns:
        {"classes": list or None, "num_samples": int, "samples_sha256": hex str}.
    """
    h = hashlib.sha256(str(len(dataset.samples)).encode())
    for path, label in dataset.samples:
        rel = os.path.relpath(path, base) if base else path
        h.update(f"{rel}\0{label}\n".encode())
    classes = list(dataset.classes) if dataset.classes is not None else None
    return {
        "classes": classes,
        "num_samples": len(dataset.samples),
        "samples_sha256": h.hexdigest(),
    }


def run_identity(mode: str, weights_sha256: str, dataset, cfg: dict) -> dict:
    """What a checkpoint must match to be resumed by a run (:func:`resume_mismatch`): the mode,
    the pretrained weights' hash, the training set's :func:`train_signature` (paths relative to
    ``data.train_root``, or to the folder of ``data.train_list``) and the config."""
    d = cfg["data"]
    base = d["train_root"] or os.path.dirname(os.path.abspath(d["train_list"]))
    data = train_signature(dataset, base)
    return {"mode": mode, "weights_sha256": weights_sha256, "data": data, "config": cfg}


def config_differences(saved: dict, current: dict) -> list[str]:
    """The run-changing config differences (``key: saved -> current`` lines), see the module."""
    neutral = NEUTRAL_KEYS
    schedules = {(saved.get("train") or {}).get("schedule"), current["train"]["schedule"]}
    if schedules == {"multistep"}:
        neutral = neutral + ("train.epochs",)
    return run_changing_differences(saved, current, neutral)


def _data_difference(old: dict, new: dict) -> str | None:
    if old["classes"] != new["classes"]:
        a, b = old["classes"] or [], new["classes"] or []
        gone, added = [c for c in a if c not in b], [c for c in b if c not in a]
        detail = []
        if gone:
            detail.append(f"only in the checkpoint: {gone[:5]}")
        if added:
            detail.append(f"only now: {added[:5]}")
        if not detail:
            detail.append("same names in another order")
        return f"training classes ({len(a)} vs {len(b)}; {'; '.join(detail)})"
    if old["samples_sha256"] != new["samples_sha256"]:
        return (
            f"training samples ({old['num_samples']} in the checkpoint, {new['num_samples']} now,"
            " or other files / labels)"
        )
    return None


def resume_mismatch(state: dict, now: dict) -> list[str]:
    """What differs between a checkpoint and this run, one readable item per difference.

    Args:
        state: the loaded checkpoint (``weights_sha256``, ``data``, ``config``, ``mode``).
        now: the same four fields for this run.
    Returns:
        Descriptions of the differences (empty when the run may resume).
    """
    diffs = []
    if state["mode"] != now["mode"]:
        diffs.append(f"mode: {state['mode']} in the checkpoint, {now['mode']} now")
    if state["weights_sha256"] != now["weights_sha256"]:
        diffs.append(
            f"backbone weights: sha256 {state['weights_sha256'][:12]}... in the checkpoint, "
            f"{now['weights_sha256'][:12]}... now"
        )
    data = _data_difference(state["data"], now["data"])
    if data:
        diffs.append(data)
    diffs += config_differences(state["config"] or {}, now["config"])
    return diffs


def load_state(path: Path) -> dict | None:
    """The checkpoint at ``path`` (None when there is none), upgraded to the version-1 fields.

    Raises:
        HeadStateError: unreadable, another format or version, or a field missing (an older
            file that did not record the training data), naming the file and what to do.
    """
    if not path.is_file():
        return None
    try:
        obj = load_plain(path)
    except CheckpointError as e:
        raise HeadStateError(f"cannot read the head checkpoint: {e}") from None
    if not isinstance(obj, dict):
        raise HeadStateError(f"{path} is not a head checkpoint (a {type(obj).__name__})")
    fmt = obj.get("format")
    if fmt is None:  # the earlier linear-probe layout: a frozen state at an epoch end
        obj = {
            **obj,
            "format_version": 0,
            "mode": "frozen",
            "step_in_epoch": 0,
            "backbone": None,
            "scaler": None,
            "epoch_sums": None,
            "subset": None,
        }
        obj["step"] = None
        config = dict(obj.get("config") or {})
        for section, keys in _V0_IMPLIED.items():
            config[section] = {**keys, **(config.get(section) or {})}
        obj["config"] = config
    elif fmt != FORMAT or obj.get("format_version") != VERSION:
        raise HeadStateError(
            f"{path}: format {fmt!r} version {obj.get('format_version')!r}, expected {FORMAT!r} "
            f"version {VERSION}: use another --output-dir or train.resume=false"
        )
    for key in _V1_FIELDS:
        if key not in obj:
            raise HeadStateError(
                f"head checkpoint {path} lacks field '{key}' (written by an older version "
                "that did not record the training data and settings): use another --output-dir "
                "or train.resume=false"
            )
    return obj


def save_state(path: Path, state: dict[str, Any]) -> None:
    """Write a version-1 state atomically (the previous file stays whole if this fails).

    Raises:
        HeadStateError: the file cannot be written (a full disk says so).
    """
    try:
        atomic_torch_save({"format": FORMAT, "format_version": VERSION, **state}, path)
    except OSError as e:
        raise HeadStateError(write_error_message(path, e)) from None


def on_main_process(write, info, what: str) -> None:
    """Run ``write()`` on rank 0 and raise its error on EVERY rank (every rank calls this), so
    that no process waits in a later collective for a rank that stopped.

    Raises:
        HeadStateError: rank 0's error (an OSError becomes one, naming ``what``); on the other
            ranks one saying that the main process could not write ``what``.
    """

    def written() -> None:
        try:
            write()
        except OSError as e:
            raise HeadStateError(f"cannot write {what}: {e.strerror or e}") from None

    _, error, failed = run_on_main(written, info.device, (IMSVDError,))
    if error is not None:
        raise error
    if failed:
        raise HeadStateError(f"the main process could not write {what} (see its error)")


def export_finetuned(path: Path, state_dict, meta: dict, epochs: int, cfg: dict, info) -> None:
    """Write a fine-tuned backbone with :func:`pretrain.checkpoint.export_backbone` (the arch and
    stem of the weights read, ``meta``) on rank 0; every rank calls this.

    Raises:
        HeadStateError: on every rank when rank 0 could not write ``path``.
    """

    def write() -> None:
        arch, stem = meta["arch"], meta["stem"]
        export_backbone(path, state_dict, arch=arch, stem=stem, epoch=epochs, config=cfg)

    on_main_process(write, info, str(path))

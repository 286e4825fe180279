"""Backbones and projectors: export (``imsvd-backbone`` or a bare torchvision state_dict) and
reading them from any accepted checkpoint, the backbone validated against the key set of
torchvision's ResNet (:mod:`pretrain.models.resnet`). Modules are built from what is read here
in the model layer (``pretrain.models.build.model_from_checkpoint``)."""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from pretrain.models.resnet import ARCHS, STEMS, infer_arch, infer_stem, torchvision_resnet

from .atomic import atomic_torch_save
from .common import (
    BACKBONE_FORMAT,
    BACKBONE_VERSION,
    HASH_SCHEME,
    CheckpointError,
    diff_keys,
    key_error,
    now_utc,
    tensor_sha256,
)
from .projector import PROJECTOR_SOURCES, projector_of
from .readers import Extracted, extract
from .safe_load import read_torch_file

logger = logging.getLogger("imsvd.checkpoint")


def reference_backbone(arch: str, stem: str) -> "OrderedDict[str, torch.Tensor]":
    """Key -> meta-device tensor of the torchvision backbone this project builds for arch/stem.

    Raises:
        CheckpointError: for an unknown arch or stem.
    """
    if arch not in ARCHS or stem not in STEMS:
        raise CheckpointError(
            f"unknown backbone arch/stem '{arch}'/'{stem}' (arch one of {list(ARCHS)}, "
            f"stem one of {list(STEMS)})"
        )
    # The meta device gives names and shapes without allocating or initialising weights.
    with torch.device("meta"):
        net = torchvision_resnet(arch, stem)
    return net.state_dict()


def validate_backbone(
    sd: Mapping[str, torch.Tensor], arch: str, stem: str, path: Path, source: str
) -> tuple["OrderedDict[str, torch.Tensor]", list[str]]:
    """Check ``sd`` against torchvision's key set and shapes.

    Returns:
        ``(state_dict in torchvision order, notes)``; missing BatchNorm ``num_batches_tracked``
        buffers (files older than 2018) are filled with 0 and noted.

    Raises:
        CheckpointError: naming missing / unexpected keys and shape mismatches.
    """
    expected = reference_backbone(arch, stem)
    missing, unexpected, shapes = diff_keys(sd, expected)
    filled = [k for k in missing if k.endswith("num_batches_tracked")]
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected or shapes:
        raise key_error(
            f"{path} ({source}): weights do not match a torchvision {arch} backbone "
            f"(stem '{stem}')",
            missing,
            unexpected,
            shapes,
        )
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    for k in expected:
        out[k] = sd[k] if k in sd else torch.zeros((), dtype=torch.long)
    notes = []
    if filled:
        notes.append(f"filled {len(filled)} missing BatchNorm num_batches_tracked buffers with 0")
    return out, notes


def _infer(sd: Mapping[str, torch.Tensor], path: Path, source: str) -> tuple[str, str]:
    try:
        return infer_arch(sd), infer_stem(sd)
    except ValueError as e:
        raise CheckpointError(f"{path} ({source}): {e}") from None


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

    Raises:
        CheckpointError: unknown arch/stem or weights that do not match them (nothing written).
    """
    path = Path(path)
    if arch not in ARCHS:
        raise CheckpointError(f"export_backbone: unknown arch '{arch}' (one of {ARCHS})")
    if stem not in STEMS:
        raise CheckpointError(f"export_backbone: unknown stem '{stem}' (one of {STEMS})")
    sd = OrderedDict((k, v.detach().cpu().contiguous()) for k, v in backbone_state_dict.items())
    sd, _ = validate_backbone(sd, arch, stem, path, "export_backbone input")
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
        "created": now_utc(),
        "torch_version": str(torch.__version__),
    }
    atomic_torch_save(obj, path)
    return digest


def export_torchvision_state_dict(
    path: str | os.PathLike, backbone_state_dict: Mapping[str, torch.Tensor]
) -> str:
    """Atomically write a bare torchvision state_dict (no wrapper, no fc) for foreign scripts.

    Scripts that do ``resnet.load_state_dict(torch.load(path), strict=False)`` (the reference
    IMSVD evaluations) read this file correctly; with the ``imsvd-backbone`` wrapper they would
    silently keep a random network. arch and stem are not recorded: the reader infers them.

    Args:
        path: destination file.
        backbone_state_dict: torchvision-named backbone weights (as from :func:`load_backbone`).

    Returns:
        The content hash of the written tensors.
    """
    sd = OrderedDict((k, v.detach().cpu().contiguous()) for k, v in backbone_state_dict.items())
    atomic_torch_save(sd, path)
    return tensor_sha256(sd)


# the note of a 3x3 stem read from a file that does not record it (evaluations log it as a warning)
STEM_ASSUMED = (
    "3x3 stem inferred from conv1; whether it used a max-pool is not recorded in this file "
    "(assumed 'small': stride 1, no max-pool; if it was trained with the stride-2 conv + "
    "max-pool, pass --stem small_s2 / model.stem=small_s2)"
)


def _read(path: str | os.PathLike, map_location: Any, opts: dict, what: str):
    path = Path(path)
    obj, load_notes = read_torch_file(path, map_location, opts.pop("allow_unsafe", False))
    label, ex = extract(obj, path, what=what, **opts)
    ex.meta.setdefault("notes", []).extend(load_notes)
    return path, label, ex


class StemMismatchError(CheckpointError):
    """The stem given for a file contradicts the file (its metadata, layout or conv1)."""

    about_content = False  # the file was read: the accepted inputs are no help


def _given_stem(meta: dict, stem: str, backbone: Mapping, path: Path, label: str) -> str:
    """The stem the caller gives for a file: it must be known, agree with a recorded (or
    layout-implied) one and with conv1's kernel (7x7: standard; 3x3: small or small_s2)."""
    if stem not in STEMS:
        raise StemMismatchError(f"stem {stem!r} (--stem / model.stem) is not one of {STEMS}")
    known, source = meta.get("stem"), meta.get("stem_source")
    if known is not None and known != stem:
        how = "records" if source == "metadata" else "implies (by its layout)"
        raise StemMismatchError(
            f"{path} ({label}) {how} stem {known!r}; the given stem {stem!r} (--stem / "
            "model.stem) contradicts it"
        )
    kernel = None
    if "conv1.weight" in backbone:
        kernel = "7x7" if infer_stem(backbone) == "standard" else "3x3"
    if kernel is not None and (kernel == "7x7") != (stem == "standard"):
        raise StemMismatchError(
            f"{path} ({label}): conv1 has a {kernel} kernel; the given stem {stem!r} "
            f"(--stem / model.stem) needs {'7x7' if stem == 'standard' else '3x3'}"
        )
    meta["stem_source"] = source or "given"
    return stem


def _finish_backbone(
    path: Path, label: str, ex: Extracted, verify_hash: bool, stem: str | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    meta = dict(ex.meta)
    meta["source_format"] = label
    if not ex.backbone:
        raise CheckpointError(f"{path} ({label}): no backbone weights found")
    if stem is not None:
        meta["stem"] = _given_stem(meta, stem, ex.backbone, path, label)
    inferred_arch, inferred_stem = (None, None)
    if "arch" not in meta or "stem" not in meta:
        inferred_arch, inferred_stem = _infer(ex.backbone, path, label)
    arch = str(meta.get("arch") or inferred_arch)
    stem = str(meta.get("stem") or inferred_stem)
    if "stem_source" not in meta:
        meta["stem_source"] = "inferred"
        if stem != "standard":
            meta["notes"].append(STEM_ASSUMED)
    sd, notes = validate_backbone(ex.backbone, arch, stem, path, label)
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


def load_backbone(
    path: str | os.PathLike,
    map_location: Any = "cpu",
    *,
    allow_unsafe: bool = False,
    verify_hash: bool = True,
    checkpoint_key: str | None = None,
    prefix: str | None = None,
    stem: str | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read ResNet backbone weights from any accepted checkpoint kind (detected by content).

    Args:
        path: checkpoint file.
        map_location: passed to torch.load.
        allow_unsafe: permit a full unpickle of files the safe readers refuse (trusted files).
        verify_hash: check the stored content hash of this project's files.
        checkpoint_key: read the weights from this top-level entry (any other layout).
        prefix: keep the keys starting with this prefix, with it removed.
        stem: the stem of a file that does not record it (a bare state dict: a 3x3 conv1 is
            read as "small" otherwise, with a note); a file that records another one is refused.

    Returns:
        ``(state_dict, meta)``. state_dict has exactly the keys of this project's
        ``build_backbone(arch, stem=stem)`` (torchvision names, no fc; num_batches_tracked kept,
        or filled with 0 when the file predates it). meta holds ``source_format`` (the reader's
        label), ``arch``, ``stem``, ``stem_source`` ("metadata", "layout", "given" or "inferred"),
        ``epoch`` (None if unknown), ``sha256`` (content hash of the returned weights),
        ``config`` (None for foreign files), ``notes`` (what was dropped, stripped, filled or
        replaced) and ``path``.

    Raises:
        CheckpointError: unreadable or refused file, unknown layout (the accepted ones are
            listed), weights that are not a torchvision ResNet, or a hash mismatch.
    """
    opts = dict(allow_unsafe=allow_unsafe, verify_hash=verify_hash)
    opts.update(checkpoint_key=checkpoint_key, prefix=prefix)
    path, label, ex = _read(path, map_location, opts, "a ResNet backbone")
    return _finish_backbone(path, label, ex, verify_hash, stem)


def read_projector(
    path: str | os.PathLike,
    map_location: Any = "cpu",
    *,
    allow_unsafe: bool = False,
    verify_hash: bool = True,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read the projector weights from a training state or the reference model.pth.

    ``pretrain.models.build.load_projector`` adds whether
    :class:`pretrain.models.projector.Projector` loads them.

    Args:
        path: checkpoint file.
        map_location: passed to torch.load.
        allow_unsafe: permit a full unpickle of files the safe readers refuse.
        verify_hash: check the stored content hash of this project's training state.

    Returns:
        ``(state_dict, meta)``: nn.Sequential-style keys ("0.weight", "1.running_mean", ...);
        meta holds ``source_format``, ``spec`` (e.g. "8192-8160", from the Linear shapes),
        ``in_dim``, ``out_dim``, ``num_linear``, ``linear_bias``, ``out_norm``, ``epoch``,
        ``notes`` and ``path``.

    Raises:
        CheckpointError: unreadable file, or a file without projector weights.
    """
    opts = dict(allow_unsafe=allow_unsafe, verify_hash=verify_hash)
    path, label, ex = _read(path, map_location, opts, "a projector")
    return projector_of(path, label, ex)


class NonFiniteWeightsError(CheckpointError):
    """A loaded parameter or buffer holds NaN / inf, or a BatchNorm running variance is <= 0."""

    about_content = False  # the layout was read: the accepted inputs are no help


def check_finite_tensors(
    tensors: Mapping[str, Any], path: str | os.PathLike, part: str = "backbone"
) -> None:
    """Refuse tensors no evaluation can give a meaningful number with.

    Every floating-point tensor must be finite, and every ``*.running_var`` (BatchNorm,
    SyncBatchNorm, frozen BatchNorm) > 0: in eval mode it divides the activations.

    Args:
        tensors: name -> tensor (a state dict); other values are ignored.
        path: the file they were read from (named in the error).
        part: which part of the file ("backbone", "projector", "model"), named in the error.

    Raises:
        NonFiniteWeightsError: naming the file, the part and the first offending tensor.
    """
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            continue
        if not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise NonFiniteWeightsError(
                f"weights {path}: {part} tensor '{name}' holds {bad} NaN/inf value(s) of "
                f"{t.numel()}; these weights cannot be evaluated"
            )
        if name.endswith("running_var") and not bool((t > 0).all()):
            raise NonFiniteWeightsError(
                f"weights {path}: {part} tensor '{name}' has {int((t <= 0).sum())} value(s) "
                f"<= 0 (min {float(t.min()):g}); a BatchNorm variance must be positive"
            )


def check_finite_weights(
    module: nn.Module, path: str | os.PathLike, part: str = "backbone"
) -> None:
    """:func:`check_finite_tensors` on a loaded module's parameters and buffers.

    Raises:
        NonFiniteWeightsError: naming the file, the part and the first offending tensor.
    """
    check_finite_tensors(module.state_dict(), path, part)


def load_backbone_and_projector(
    path: str | os.PathLike,
    map_location: Any = "cpu",
    *,
    allow_unsafe: bool = False,
    verify_hash: bool = True,
    checkpoint_key: str | None = None,
    prefix: str | None = None,
    stem: str | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any], tuple[dict, dict] | None]:
    """:func:`load_backbone`, and from the same read of the file its projector when it has one.

    Args:
        path, map_location, allow_unsafe, verify_hash, checkpoint_key, prefix, stem: as for
            :func:`load_backbone`.

    Returns:
        ``(state_dict, meta, projector)``: the backbone as from :func:`load_backbone`;
        ``projector`` is ``(state_dict, meta)`` as from :func:`read_projector` when the file is
        of a layout that carries one and holds its weights, else None.

    Raises:
        CheckpointError: as :func:`load_backbone`.
    """
    opts = dict(allow_unsafe=allow_unsafe, verify_hash=verify_hash)
    opts.update(checkpoint_key=checkpoint_key, prefix=prefix)
    path, label, ex = _read(path, map_location, opts, "a ResNet backbone")
    sd, meta = _finish_backbone(path, label, ex, verify_hash, stem)
    projector = None
    if label in PROJECTOR_SOURCES and ex.projector:
        projector = projector_of(path, label, ex)
    return sd, meta, projector

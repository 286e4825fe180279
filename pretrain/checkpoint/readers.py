"""One small reader per checkpoint layout, in one ordered table.

Each reader has a label (reported as ``meta["source_format"]``), a one-line description (listed
in errors as the accepted inputs), a detector and an extractor. :func:`extract` asks the
readers in table order and uses the first whose detector accepts the file's content; file names
never matter. ``checkpoint_key`` / ``prefix`` bypass the table for any other layout.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from .common import (
    BACKBONE_FORMAT,
    BACKBONE_VERSION,
    REQUIRED_BACKBONE_FIELDS,
    TRAIN_STATE_FORMAT,
    CheckpointError,
    check_fields,
    check_version,
    describe,
    fold_out_norm,
    is_tensor_dict,
    strip_prefix,
)
from .layouts import (
    CIFAR_SHORTCUT,
    base_read,
    cifar_to_torchvision,
    drop_prefixed,
    epoch_of,
    tensor_section,
    unmodule,
    unwrapped_keys,
)
from .train_state import validate_train_state

logger = logging.getLogger("imsvd.checkpoint")


@dataclass
class Extracted:
    """What a reader found: raw backbone weights (torchvision names), projector, metadata.

    The projector's dict holds the norm on its output (``model.out_norm: bn``) as its last
    index, also for files of the earlier layout (``out_norm.*``). ``meta`` may hold ``epoch``,
    ``config``, ``notes`` and, when the file records them, ``arch``, ``stem`` (with
    ``stem_source``) and the other metadata of this project's formats.
    """

    backbone: "OrderedDict[str, torch.Tensor]"
    projector: "OrderedDict[str, torch.Tensor] | None" = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Reader:
    """A checkpoint layout: ``label`` (meta["source_format"]), ``accepts`` (for errors)."""

    label: str
    accepts: str
    detect: Callable[[Any], bool]
    read: Callable[[Any, Path, bool], Extracted]


# --------------------------------------------------------------------------------- readers


def _read_backbone_file(obj: Any, path: Path, verify_hash: bool) -> Extracted:
    version = check_version(obj, BACKBONE_FORMAT, BACKBONE_VERSION, path)
    check_fields(obj, REQUIRED_BACKBONE_FIELDS, BACKBONE_FORMAT, path)
    if not is_tensor_dict(obj["state_dict"]):
        raise CheckpointError(f"{path}: field 'state_dict' is not a dict of tensors")
    meta = {
        "format_version": version,
        "arch": obj["arch"],
        "stem": obj["stem"],
        "stem_source": "metadata",
        "epoch": obj["epoch"],
        "config": obj["config"],
        "stored_sha256": obj["sha256"],
        "created": obj.get("created"),
        "torch_version": obj.get("torch_version"),
        "notes": [],
    }
    return Extracted(OrderedDict(obj["state_dict"]), None, meta)


def _read_train_state(obj: Any, path: Path, verify_hash: bool) -> Extracted:
    st = validate_train_state(obj, path, verify_hash)
    meta = {k: st.get(k) for k in ("format_version", "arch", "stem", "epoch", "step")}
    meta.update(
        step_in_epoch=st["step_in_epoch"],
        config=st["config"],
        created=st.get("created"),
        torch_version=st.get("torch_version"),
        stem_source="metadata",
        notes=[],
    )
    model = fold_out_norm(st["model"])
    return Extracted(strip_prefix(model, "backbone."), strip_prefix(model, "projector."), meta)


def _is_dino(obj: Any) -> bool:
    return isinstance(obj, Mapping) and all(
        is_tensor_dict(obj.get(k)) for k in ("teacher", "student")
    )


def _read_dino(obj: Any, path: Path, verify_hash: bool) -> Extracted:
    meta: dict[str, Any] = {"epoch": epoch_of(obj), "config": None, "notes": []}
    teacher = unmodule(obj["teacher"], meta["notes"])
    if not any(k.startswith("backbone.") for k in teacher):
        raise CheckpointError(f"{path}: DINO 'teacher' holds no 'backbone.*' keys")
    meta["notes"].append("read the teacher network's backbone (the student is ignored)")
    logger.info("%s: DINO checkpoint, reading the teacher backbone", path)
    head = [k for k in teacher if k.startswith("head.")]
    if head:
        meta["notes"].append(f"dropped the DINO head ({len(head)} tensors)")
    meta["dino_network"] = "teacher"
    sd = drop_prefixed(
        strip_prefix(teacher, "backbone."), ("fc.",), "the classifier", meta["notes"]
    )
    return Extracted(sd, None, meta)


def _read_moco_v3(obj: Any, path: Path, verify_hash: bool) -> Extracted:
    _, sd, meta = base_read(obj)
    enc = strip_prefix(sd, "base_encoder.")
    enc = drop_prefixed(enc, ("fc.", "head."), "the MoCo v3 projection head", meta["notes"])
    meta["notes"].append("momentum encoder and predictor ignored")
    return Extracted(enc, None, meta)


def _read_moco(obj: Any, path: Path, verify_hash: bool) -> Extracted:
    _, sd, meta = base_read(obj)
    q = strip_prefix(sd, "encoder_q.")
    return Extracted(
        drop_prefixed(q, ("fc.",), "the MoCo projection head", meta["notes"]), None, meta
    )


def _is_cifar(obj: Any) -> bool:
    keys = unwrapped_keys(obj)
    if any(k.startswith("backbone.") for k in keys):
        keys = [k[len("backbone.") :] for k in keys if k.startswith("backbone.")]
    return any(CIFAR_SHORTCUT.match(k) for k in keys) and "conv1.weight" in keys


def _read_cifar(obj: Any, path: Path, verify_hash: bool) -> Extracted:
    wrapper, sd, meta = base_read(obj)
    projector = None
    if any(k.startswith("backbone.") for k in sd):
        projector = strip_prefix(sd, "projector.") or None
        sd = strip_prefix(sd, "backbone.")
        meta["notes"].append(f"backbone read from '{wrapper or '<top level>'}' backbone.* keys")
    sd = drop_prefixed(
        cifar_to_torchvision(sd, meta["notes"]), ("fc.", "linear."), "the classifier", meta["notes"]
    )
    # the reference CIFAR ResNet's stem: 3x3 stride-1 conv, no max-pool
    meta.update(stem="small", stem_source="layout")
    return Extracted(sd, projector, meta)


def _has_backbone(obj: Any) -> bool:
    return any(k.startswith("backbone.") for k in unwrapped_keys(obj))


def _read_imsvd_model(obj: Any, path: Path, verify_hash: bool) -> Extracted:
    _, sd, meta = base_read(obj)
    sd = fold_out_norm(sd)
    return Extracted(strip_prefix(sd, "backbone."), strip_prefix(sd, "projector.") or None, meta)


def _is_torchvision(obj: Any) -> bool:
    keys = unwrapped_keys(obj)
    return "conv1.weight" in keys and any(k.startswith("layer1.") for k in keys)


_SWAV_HEADS = ("projection_head.", "prototypes.")


def _read_swav(obj: Any, path: Path, verify_hash: bool) -> Extracted:
    _, sd, meta = base_read(obj)
    for head, what in zip(_SWAV_HEADS, ("the SwAV projection head", "the SwAV prototypes")):
        sd = drop_prefixed(sd, (head,), what, meta["notes"])
    return Extracted(drop_prefixed(sd, ("fc.",), "the classifier", meta["notes"]), None, meta)


def _read_torchvision(obj: Any, path: Path, verify_hash: bool) -> Extracted:
    wrapper, sd, meta = base_read(obj)
    if wrapper is not None:
        meta["notes"].append(f"weights read from the '{wrapper}' entry")
    return Extracted(drop_prefixed(sd, ("fc.",), "the classifier", meta["notes"]), None, meta)


def _format_is(fmt: str) -> Callable[[Any], bool]:
    return lambda obj: isinstance(obj, Mapping) and obj.get("format") == fmt


def _has_prefix(prefix: str, wrapper: str | None = "any") -> Callable[[Any], bool]:
    def detect(obj: Any) -> bool:
        if wrapper != "any" and tensor_section(obj)[0] != wrapper:
            return False
        return any(k.startswith(prefix) for k in unwrapped_keys(obj))

    return detect


READERS: tuple[Reader, ...] = (
    Reader(
        BACKBONE_FORMAT,
        "this project's exported backbone (format 'imsvd-backbone')",
        _format_is(BACKBONE_FORMAT),
        _read_backbone_file,
    ),
    Reader(
        TRAIN_STATE_FORMAT,
        "this project's training state (format 'imsvd-train-state', checkpoint_e*_s*.pth)",
        _format_is(TRAIN_STATE_FORMAT),
        _read_train_state,
    ),
    Reader(
        "dino-teacher",
        "a full DINO checkpoint: {'teacher', 'student': {'backbone.*', 'head.*'}, ...} "
        "(the teacher backbone is read)",
        _is_dino,
        _read_dino,
    ),
    Reader(
        "moco-v3",
        "MoCo v3: {'state_dict': {'module.base_encoder.*', 'module.momentum_encoder.*', "
        "'module.predictor.*'}} (fc/head dropped)",
        _has_prefix("base_encoder."),
        _read_moco_v3,
    ),
    Reader(
        "moco",
        "MoCo v1/v2: {'state_dict': {'module.encoder_q.*', 'module.encoder_k.*', ...}}",
        _has_prefix("encoder_q."),
        _read_moco,
    ),
    Reader(
        "imsvd-reference-cifar",
        "the reference IMSVD CIFAR code (imsvd_cifar.py): model.pth with "
        "'module.backbone.*' or model_final.pth, CIFAR ResNet names ('shortcut.0/1', "
        "3x3 stride-1 stem)",
        _is_cifar,
        _read_cifar,
    ),
    Reader(
        "imsvd-reference-model",
        "the reference IMSVD model.pth: {'epoch', 'model': {'module.backbone.*', "
        "'module.projector.*'}, 'optimizer'}",
        _has_prefix("backbone.", wrapper="model"),
        _read_imsvd_model,
    ),
    Reader(
        "imsvd-model-state-dict",
        "an IMSVD model state_dict with 'backbone.*' / 'projector.*' keys",
        _has_backbone,
        _read_imsvd_model,
    ),
    Reader(
        "swav",
        "SwAV: 'module.*' ResNet keys with 'projection_head.*' / 'prototypes.*' (heads dropped)",
        lambda obj: _is_torchvision(obj)
        and any(k.startswith(_SWAV_HEADS) for k in unwrapped_keys(obj)),
        _read_swav,
    ),
    Reader(
        "torchvision-state-dict",
        "a bare torchvision ResNet state_dict (reference model_final.pth, VICReg / Barlow Twins "
        "resnet50.pth, torchvision ImageNet-supervised weights; fc.* is dropped)",
        _is_torchvision,
        _read_torchvision,
    ),
)

CUSTOM_HINT = (
    "any other layout: name the entry and key prefix holding the ResNet with "
    "--checkpoint-key KEY / --prefix PREFIX (checkpoint_key= / prefix= in Python)"
)


def accepted_inputs() -> list[str]:
    """One line per accepted layout, in detection order (used in error messages and --help)."""
    return [r.accepts for r in READERS] + [CUSTOM_HINT]


def unrecognised(path: Path, obj: Any, what: str = "a ResNet backbone") -> CheckpointError:
    """The error for a file no reader accepts: what was found and the accepted inputs."""
    accepted = "\n  - ".join(accepted_inputs())
    return CheckpointError(
        f"{path}: could not find {what}. Found {describe(obj)}.\nAccepted inputs:\n  - "
        f"{accepted}"
    )


def _read_custom(
    obj: Any, path: Path, key: str | None, prefix: str | None
) -> tuple[str, Extracted]:
    meta: dict[str, Any] = {"epoch": epoch_of(obj), "config": None, "notes": []}
    node, where = obj, "<top level>"
    if key is not None:
        if not isinstance(obj, Mapping) or key not in obj:
            top = list(obj)[:10] if isinstance(obj, Mapping) else type(obj).__name__
            raise CheckpointError(f"{path}: checkpoint_key {key!r} not found (top level: {top})")
        node, where = obj[key], repr(key)
    elif not is_tensor_dict(obj):
        wrapper, node = tensor_section(obj)
        where = repr(wrapper)
    if not is_tensor_dict(node):
        raise CheckpointError(
            f"{path}: entry {where} is not a dict of tensors (found {describe(node)}); "
            "choose another --checkpoint-key"
        )
    sd = OrderedDict(node)
    if prefix:
        sd = strip_prefix(node, prefix)
        if not sd:
            raise CheckpointError(
                f"{path}: no key of entry {where} starts with prefix {prefix!r} "
                f"(e.g. {list(node)[:5]})"
            )
    sd = drop_prefixed(
        cifar_to_torchvision(sd, meta["notes"]), ("fc.",), "the classifier", meta["notes"]
    )
    label = f"custom (checkpoint_key={key!r}, prefix={prefix!r}, entry {where})"
    return label, Extracted(sd, None, meta)


def extract(
    obj: Any,
    path: Path,
    *,
    checkpoint_key: str | None = None,
    prefix: str | None = None,
    verify_hash: bool = True,
    what: str = "a ResNet backbone",
) -> tuple[str, Extracted]:
    """Find the backbone (and projector) in a loaded checkpoint.

    Args:
        obj: the unpickled file content.
        path: the file (for messages).
        checkpoint_key: top-level entry holding the weights; with ``prefix``, bypasses the table.
        prefix: key prefix of the ResNet weights inside that entry (removed).
        verify_hash: verify the content hash of this project's files.
        what: what is looked for (for the error message).

    Returns:
        ``(label, extracted)``: the reader's label and what it found.

    Raises:
        CheckpointError: unknown ``format``, or no reader accepts the content (the message lists
            the accepted inputs).
    """
    if checkpoint_key is not None or prefix:
        return _read_custom(obj, path, checkpoint_key, prefix)
    fmt = obj.get("format") if isinstance(obj, Mapping) else None
    if isinstance(fmt, str) and fmt not in (BACKBONE_FORMAT, TRAIN_STATE_FORMAT):
        raise CheckpointError(
            f"{path}: unknown checkpoint format '{fmt}' (this reader knows "
            f"'{BACKBONE_FORMAT}' and '{TRAIN_STATE_FORMAT}')"
        )
    meta = obj.get("meta") if isinstance(obj, Mapping) else None
    if isinstance(meta, Mapping) and meta.get("format") == "imsvd-mmdet-resnet":
        if meta.get("layout") == "c4":  # res5 sits in the RoI head: not one backbone
            raise CheckpointError(
                f"{path} is an MMDetection Mask R-CNN C4 weights file (from imsvd-convert-mmdet, "
                "res5 in the RoI head), which MMDetection loads; give the backbone file it was "
                "converted from instead"
            )
    for reader in READERS:
        if reader.detect(obj):
            return reader.label, reader.read(obj, path, verify_hash)
    raise unrecognised(path, obj, what)

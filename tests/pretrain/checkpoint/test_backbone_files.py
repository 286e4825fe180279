"""Backbone files: the exported format (round trip, hash), backbones read from training states
and from other projects' layouts, projectors."""

from __future__ import annotations

import argparse
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from helpers import TINY_CONFIG, assert_same_tensors, no_fc, save_state

import pretrain.checkpoint as ckpt
from pretrain.checkpoint import CheckpointError
from pretrain.models.backbone import build_backbone
from pretrain.models.build import load_projector
from pretrain.models.projector import Projector

# --------------------------------------------------------------------------- exported backbone


def test_export_backbone_roundtrip_and_hash(tmp_path: Path, trained) -> None:
    backbone = trained[0].backbone
    path = tmp_path / "backbone.pth"
    digest = ckpt.export_backbone(
        path, backbone.state_dict(), arch="resnet18", stem="small_s2", epoch=7, config=TINY_CONFIG
    )
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "imsvd-backbone" and raw["format_version"] == 1
    assert raw["sha256"] == digest == ckpt.tensor_sha256(backbone.state_dict())
    assert raw["hash_scheme"] == "imsvd-tensor-sha256-v1" and raw["config"] == TINY_CONFIG
    assert not any(k.startswith("fc.") for k in raw["state_dict"])
    sd, meta = ckpt.load_backbone(path)
    assert_same_tensors(sd, backbone.state_dict())
    assert meta["source_format"] == "imsvd-backbone"
    assert (meta["arch"], meta["stem"], meta["epoch"]) == ("resnet18", "small_s2", 7)
    assert meta["stem_source"] == "metadata" and meta["sha256"] == digest

    raw["state_dict"]["layer1.0.conv1.weight"][0, 0, 0, 0] += 1e-3
    torch.save(raw, tmp_path / "tampered.pth")
    with pytest.raises(CheckpointError, match="content hash mismatch"):
        ckpt.load_backbone(tmp_path / "tampered.pth")
    _, meta2 = ckpt.load_backbone(tmp_path / "tampered.pth", verify_hash=False)
    assert meta2["sha256"] != digest


def test_tensor_hash_definition() -> None:
    import hashlib

    sd = {"b": torch.tensor([1.0, 2.0]), "a": torch.tensor(3, dtype=torch.int64)}
    h = hashlib.sha256()
    h.update(b"a\0int64\0\0" + (3).to_bytes(8, "little"))
    h.update(b"b\0float32\0" + b"2\0" + np.array([1.0, 2.0], "<f4").tobytes())
    assert ckpt.tensor_sha256(sd) == h.hexdigest()
    assert ckpt.tensor_sha256({"b": sd["b"].double(), "a": sd["a"]}) != h.hexdigest()


def test_export_rejects_wrong_keys(tmp_path: Path, tv18) -> None:
    with pytest.raises(CheckpointError) as e:
        ckpt.export_backbone(
            tmp_path / "x.pth", tv18, arch="resnet18", stem="standard", epoch=0, config=None
        )
    assert "unexpected keys (2): fc.bias, fc.weight" in str(e.value)
    assert not (tmp_path / "x.pth").exists()


def test_load_backbone_from_training_state(tmp_path: Path, trained) -> None:
    model, opt, scaler = trained
    path = tmp_path / ckpt.checkpoint_name(1, 10)
    save_state(path, model, optimizer=opt, scaler=scaler, epoch=1, step=10)
    sd, meta = ckpt.load_backbone(path)
    assert_same_tensors(sd, model.backbone.state_dict())
    assert meta["source_format"] == "imsvd-train-state"
    assert (meta["arch"], meta["stem"], meta["epoch"], meta["step"]) == ("resnet18", "small", 1, 10)
    assert meta["config"] == TINY_CONFIG


# --------------------------------------------------------------------------- foreign formats


def _foreign(kind: str, tv: "OrderedDict[str, torch.Tensor]") -> object:
    bb = no_fc(tv)
    proj = Projector(512, "64-32").state_dict()
    if kind == "reference-model":
        model = {f"module.backbone.{k}": v for k, v in bb.items()}
        model.update({f"module.projector.{k}": v for k, v in proj.items()})
        return {"epoch": 5, "model": model, "optimizer": {"state": {}, "param_groups": []}}
    if kind in ("reference-final", "vicreg"):
        return dict(bb)
    if kind == "supervised":
        return dict(tv)
    if kind == "ddp-bare":
        return {f"module.{k}": v for k, v in bb.items()}
    if kind in ("moco-v1", "moco-v2"):
        if kind == "moco-v1":
            head = {"fc.weight": torch.randn(128, 512), "fc.bias": torch.randn(128)}
        else:
            head = {
                "fc.0.weight": torch.randn(512, 512),
                "fc.0.bias": torch.randn(512),
                "fc.2.weight": torch.randn(128, 512),
                "fc.2.bias": torch.randn(128),
            }
        sd = {}
        for enc in ("encoder_q", "encoder_k"):
            sd.update({f"module.{enc}.{k}": v.clone() for k, v in bb.items()})
            sd.update({f"module.{enc}.{k}": v.clone() for k, v in head.items()})
        sd["module.encoder_k.conv1.weight"] += 1.0  # key encoder differs: must not be read
        sd["module.queue"] = torch.randn(128, 16)
        sd["module.queue_ptr"] = torch.zeros(1, dtype=torch.long)
        return {"epoch": 200, "arch": "resnet18", "state_dict": sd, "optimizer": {}}
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind, source, epoch, note",
    [
        ("reference-model", "imsvd-reference-model", 5, "module."),
        ("reference-final", "torchvision-state-dict", None, None),
        ("vicreg", "torchvision-state-dict", None, None),
        ("supervised", "torchvision-state-dict", None, "classifier (fc.weight, fc.bias)"),
        ("ddp-bare", "torchvision-state-dict", None, "module."),
        ("moco-v1", "moco", 200, "projection head (fc.weight, fc.bias)"),
        ("moco-v2", "moco", 200, "fc.0.weight, fc.0.bias, fc.2.weight, fc.2.bias"),
    ],
)
def test_load_backbone_foreign(tmp_path: Path, tv18, kind, source, epoch, note) -> None:
    path = tmp_path / "weights.pth"  # same file name for every kind: detection is by content
    torch.save(_foreign(kind, tv18), path)
    sd, meta = ckpt.load_backbone(path)
    assert_same_tensors(sd, no_fc(tv18))
    assert meta["source_format"] == source and meta["epoch"] == epoch
    assert (meta["arch"], meta["stem"], meta["stem_source"]) == ("resnet18", "standard", "inferred")
    if note:
        assert any(note in n for n in meta["notes"]), meta["notes"]
    net = build_backbone("resnet18")
    net.load_state_dict(sd, strict=True)


def test_load_backbone_resnet50_keysets(tmp_path: Path) -> None:
    with torch.device("meta"):
        ref = torchvision.models.resnet50(weights=None).state_dict()
    full = OrderedDict((k, torch.zeros(v.shape, dtype=v.dtype)) for k, v in ref.items())
    torch.save(full, tmp_path / "r50.pth")
    sd, meta = ckpt.load_backbone(tmp_path / "r50.pth")
    assert meta["arch"] == "resnet50" and set(sd) == set(no_fc(ref))
    # pre-2018 torchvision files lack num_batches_tracked: filled so strict loading works
    old = OrderedDict((k, v) for k, v in full.items() if not k.endswith("num_batches_tracked"))
    torch.save(old, tmp_path / "r50_old.pth")
    sd, meta = ckpt.load_backbone(tmp_path / "r50_old.pth")
    assert set(sd) == set(no_fc(ref))
    assert any("filled 53" in n for n in meta["notes"]), meta["notes"]
    with torch.device("meta"):
        build_backbone("resnet50").load_state_dict(sd, strict=True, assign=True)


def test_load_backbone_key_mismatch_is_named(tmp_path: Path, tv18) -> None:
    bad = no_fc(tv18)
    del bad["layer4.1.bn2.weight"]
    bad["layer4.1.extra.weight"] = torch.zeros(1)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as e:
        ckpt.load_backbone(tmp_path / "bad.pth")
    msg = str(e.value)
    assert "missing keys (1): layer4.1.bn2.weight" in msg
    assert "unexpected keys (1): layer4.1.extra.weight" in msg and "resnet18" in msg


def test_pickled_objects_refused_unless_allowed(tmp_path: Path, tv18) -> None:
    path = tmp_path / "with_args.pth"
    torch.save({"state_dict": no_fc(tv18), "args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(CheckpointError) as e:
        ckpt.load_backbone(path)
    assert "argparse.Namespace" in str(e.value) and "allow_unsafe=True" in str(e.value)
    sd, meta = ckpt.load_backbone(path, allow_unsafe=True)
    assert_same_tensors(sd, no_fc(tv18))
    assert any("'state_dict' entry" in n for n in meta["notes"])


@pytest.mark.parametrize(
    "content, needle",
    [
        (
            b"hello, this is not a checkpoint",
            "not a PyTorch checkpoint: a torch.save file is a zip",
        ),
        (b"", "is empty"),
        ([1, 2, 3], "object of type list"),
        ({"weights": {"w": torch.zeros(2)}, "step": 3}, "top-level keys ['weights', 'step']"),
        ({"encoder.0.weight": torch.zeros(2)}, "a dict of 1 tensors, e.g. ['encoder.0.weight']"),
        ({"format": "imsvd-something", "format_version": 1}, "unknown checkpoint format"),
    ],
)
def test_unrecognised_files_give_clear_errors(tmp_path: Path, content, needle) -> None:
    path = tmp_path / "thing.pth"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(CheckpointError) as e:
        ckpt.load_backbone(path)
    msg = str(e.value)
    assert needle in msg and str(path) in msg
    if not isinstance(content, bytes) and "format" not in content:
        assert "Accepted inputs" in msg and "MoCo" in msg


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        ckpt.load_backbone(tmp_path / "nope.pth")


# --------------------------------------------------------------------------- projector


def test_load_projector(tmp_path: Path, trained, tv18) -> None:
    model = trained[0]
    path = tmp_path / "state.pth"
    save_state(path, model, epoch=2, step=5)
    sd, meta = load_projector(path)
    assert_same_tensors(sd, model.projector.state_dict())
    assert (meta["spec"], meta["in_dim"], meta["out_dim"]) == ("64-32", 512, 32)
    assert meta["matches_projector"] and meta["linear_bias"] == [True, False]
    assert meta["source_format"] == "imsvd-train-state" and meta["epoch"] == 2

    torch.save(_foreign("reference-model", tv18), tmp_path / "model.pth")
    sd, meta = load_projector(tmp_path / "model.pth")
    assert meta["source_format"] == "imsvd-reference-model" and meta["spec"] == "64-32"
    Projector(meta["in_dim"], meta["spec"]).load_state_dict(sd, strict=True)

    ckpt.export_backbone(
        tmp_path / "bb.pth",
        model.backbone.state_dict(),
        arch="resnet18",
        stem="small",
        epoch=2,
        config=TINY_CONFIG,
    )
    with pytest.raises(CheckpointError, match="carries no projector"):
        load_projector(tmp_path / "bb.pth")
    torch.save(no_fc(tv18), tmp_path / "vicreg.pth")
    with pytest.raises(CheckpointError, match="backbone only, no projector"):
        load_projector(tmp_path / "vicreg.pth")

"""Other projects' checkpoint layouts: each reads with its arch, stem and note, the readers table,
and the torchvision-style export that foreign scripts read."""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
from collections import OrderedDict

import pytest
import torch
import torchvision
from helpers import REPO, assert_same_tensors, load_tool, no_fc

import pretrain.checkpoint as ckpt
from pretrain.checkpoint import CheckpointError
from pretrain.models.backbone import build_backbone
from pretrain.models.build import load_projector
from pretrain.models.projector import Projector

# --------------------------------------------------------------------- 4-5. foreign layouts


def _cifar_resnet18(tv: dict) -> "OrderedDict[str, torch.Tensor]":
    """torchvision names -> the reference CIFAR ResNet names (3x3 stem, shortcut.0/1)."""
    out = OrderedDict()
    for k, v in tv.items():
        if k == "conv1.weight":
            v = torch.randn(64, 3, 3, 3)
        k = k.replace("downsample.", "shortcut.").replace("fc.", "linear.")
        out[k] = v
    return out


def _layout(kind: str, tv: dict) -> tuple[object, dict]:
    """(checkpoint object, expected torchvision-named backbone) for each layout."""
    bb = no_fc(tv)
    if kind in ("cifar-model", "cifar-final"):
        cif = _cifar_resnet18(tv)
        expect = OrderedDict(
            (k.replace("shortcut.", "downsample."), v)
            for k, v in cif.items()
            if not k.startswith("linear.")
        )
        if kind == "cifar-final":
            return cif, expect
        model = {f"module.backbone.{k}": v for k, v in cif.items() if not k.startswith("linear")}
        proj = Projector(512, "64-64-32").state_dict()
        model.update({f"module.projector.{k}": v for k, v in proj.items()})
        return {"epoch": 800, "model": model, "optimizer": {"state": {}}}, expect
    if kind == "swav":
        sd = {f"module.{k}": v for k, v in bb.items()}
        sd["module.projection_head.0.weight"] = torch.randn(16, 512)
        sd["module.projection_head.1.running_mean"] = torch.randn(16)
        sd["module.prototypes.weight"] = torch.randn(30, 16)
        return {"epoch": 4, "state_dict": sd}, bb
    if kind == "dino":
        head = {"head.mlp.0.weight": torch.randn(8, 512), "head.last_layer.weight_g": torch.ones(1)}
        teacher = {f"backbone.{k}": v for k, v in bb.items()} | head
        student = {f"module.backbone.{k}": v + 1.0 for k, v in bb.items()}
        student.update({f"module.{k}": v for k, v in head.items()})
        return {"teacher": teacher, "student": student, "epoch": 100, "optimizer": {}}, bb
    if kind == "mocov3":
        sd = {}
        for enc in ("base_encoder", "momentum_encoder"):
            sd.update({f"module.{enc}.{k}": v.clone() for k, v in bb.items()})
            sd[f"module.{enc}.fc.0.weight"] = torch.randn(16, 512)
            sd[f"module.{enc}.fc.1.running_var"] = torch.ones(16)
        sd["module.momentum_encoder.conv1.weight"] += 1.0
        sd["module.predictor.0.weight"] = torch.randn(16, 16)
        return {"epoch": 300, "arch": "resnet18", "state_dict": sd}, bb
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind, label, arch_stem, note",
    [
        ("cifar-model", "imsvd-reference-cifar", ("resnet18", "small"), "shortcut"),
        ("cifar-final", "imsvd-reference-cifar", ("resnet18", "small"), "linear.weight"),
        ("swav", "swav", ("resnet18", "standard"), "prototypes.weight"),
        ("dino", "dino-teacher", ("resnet18", "standard"), "teacher"),
        ("mocov3", "moco-v3", ("resnet18", "standard"), "fc.0.weight"),
    ],
)
def test_foreign_layouts(tmp_path, tv18, kind, label, arch_stem, note) -> None:
    obj, expect = _layout(kind, tv18)
    path = tmp_path / "weights.pth"
    torch.save(obj, path)
    sd, meta = ckpt.load_backbone(path)
    assert_same_tensors(sd, expect)
    assert meta["source_format"] == label
    assert (meta["arch"], meta["stem"]) == arch_stem
    assert any(note in n for n in meta["notes"]), meta["notes"]
    build_backbone(*arch_stem[:1], stem=arch_stem[1]).load_state_dict(sd, strict=True)
    if kind == "cifar-model":
        assert meta["stem_source"] == "layout" and meta["epoch"] == 800
        _, pmeta = load_projector(path)
        assert pmeta["spec"] == "64-64-32" and pmeta["source_format"] == label
    if kind == "dino":
        assert meta["dino_network"] == "teacher"


def test_dino_teacher_choice_is_logged(tmp_path, tv18, caplog) -> None:
    torch.save(_layout("dino", tv18)[0], tmp_path / "dino.pth")
    with caplog.at_level(logging.INFO, logger="imsvd.checkpoint"):
        ckpt.load_backbone(tmp_path / "dino.pth")
    assert "teacher backbone" in caplog.text


def test_checkpoint_key_and_prefix(tmp_path, tv18) -> None:
    obj, expect = _layout("dino", tv18)
    torch.save(obj, tmp_path / "dino.pth")
    student = {k: v + 1.0 for k, v in expect.items()}
    sd, meta = ckpt.load_backbone(
        tmp_path / "dino.pth", checkpoint_key="student", prefix="module.backbone."
    )
    assert_same_tensors(sd, student)
    assert meta["source_format"] == (
        "custom (checkpoint_key='student', prefix='module.backbone.', entry 'student')"
    )
    torch.save({"weights": {"enc.trunk." + k: v for k, v in expect.items()}}, tmp_path / "o.pth")
    with pytest.raises(CheckpointError, match="Accepted inputs"):
        ckpt.load_backbone(tmp_path / "o.pth")
    sd, meta = ckpt.load_backbone(tmp_path / "o.pth", checkpoint_key="weights", prefix="enc.trunk.")
    assert_same_tensors(sd, expect)
    with pytest.raises(CheckpointError, match="checkpoint_key 'nope' not found"):
        ckpt.load_backbone(tmp_path / "o.pth", checkpoint_key="nope")
    with pytest.raises(CheckpointError, match="prefix 'x.'"):
        ckpt.load_backbone(tmp_path / "o.pth", checkpoint_key="weights", prefix="x.")


def test_readers_table_and_accepted_inputs() -> None:
    labels = [r.label for r in ckpt.READERS]
    assert labels[:2] == ["imsvd-backbone", "imsvd-train-state"]
    assert labels[-1] == "torchvision-state-dict" and len(set(labels)) == len(labels)
    # specific layouts before the generic ones that would also match them
    assert labels.index("swav") < labels.index("torchvision-state-dict")
    assert labels.index("imsvd-reference-cifar") < labels.index("imsvd-reference-model")
    text = "\n".join(ckpt.accepted_inputs())
    for word in ("SwAV", "DINO", "MoCo v3", "CIFAR", "--checkpoint-key"):
        assert word in text


def test_add_weights_args() -> None:
    parser = ckpt.add_weights_args(argparse.ArgumentParser())
    argv = ["--allow-unsafe", "--checkpoint-key", "teacher", "--prefix", "b.", "--stem", "small"]
    kw = ckpt.weights_kwargs(parser.parse_args(argv))
    assert kw == {
        "allow_unsafe": True,
        "checkpoint_key": "teacher",
        "prefix": "b.",
        "stem": "small",
    }
    with pytest.raises(SystemExit):
        parser.parse_args(["--stem", "big"])
    short = ckpt.add_weights_args(argparse.ArgumentParser(), layout_options=False)
    assert ckpt.weights_kwargs(short.parse_args([]))["allow_unsafe"] is False
    with pytest.raises(SystemExit):
        short.parse_args(["--prefix", "x"])


# ---------------------------------------------------------------- 6. torchvision-style export


def test_export_tool_torchvision_format(tmp_path, tv18, tools_export) -> None:
    obj, _ = _layout("swav", tv18)
    torch.save(obj, tmp_path / "swav.pth")
    out = tmp_path / "tv.pth"
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "export_backbone.py"), str(tmp_path / "swav.pth"),
         str(out), "--format", "torchvision"],
        capture_output=True, text=True, cwd=str(tmp_path),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"read {tmp_path / 'swav.pth'} as swav")
    bare = torch.load(out, weights_only=True)
    net = torchvision.models.resnet18()
    result = net.load_state_dict(bare, strict=False)  # what the reference eval scripts do
    assert result.missing_keys == ["fc.weight", "fc.bias"] and result.unexpected_keys == []
    assert torch.equal(net.conv1.weight, tv18["conv1.weight"])

    tools_export.export(str(out), str(tmp_path / "bb.pth"), "imsvd")
    _, meta = ckpt.load_backbone(tmp_path / "bb.pth")
    assert meta["source_format"] == "imsvd-backbone" and meta["epoch"] == 0
    bad = subprocess.run(
        [sys.executable, str(REPO / "tools" / "export_backbone.py"), str(tmp_path / "swav.pth"),
         str(out)],
        capture_output=True, text=True, cwd=str(tmp_path),
    )  # fmt: skip
    assert bad.returncode == 2 and "already exists" in bad.stderr
    assert "Accepted inputs" not in bad.stderr  # the input was fine: the list is no help


@pytest.fixture
def tools_export():
    """tools/export_backbone.py as a module (tools/ is not a package)."""
    return load_tool("export_backbone")

"""Torchvision -> Detectron2 weight conversion (no Detectron2 needed)."""

from __future__ import annotations

import argparse
import os
import pickle
import sys

import numpy as np
import pytest
import torch
import torchvision
from helpers import (
    CHECKPOINT_KINDS,
    load_tool,
    randomised,
    resnet18_backbone_sd,
    write_checkpoint_kind,
)

from pretrain.checkpoint import export_backbone
from pretrain.models.backbone import build_backbone
from transfer.detection.d2.weights import (
    D2ConversionError,
    check_arch,
    check_heads_loaded,
    check_trunk_loaded,
    convert_torchvision_to_d2,
    read_d2_pickle,
    read_d2_weights,
    torchvision_key_to_d2,
    write_d2_pickle,
)

convert_main = load_tool("convert_to_d2").main


@pytest.mark.parametrize(
    "tv_key, d2_key",
    [
        ("conv1.weight", "stem.conv1.weight"),
        ("bn1.running_var", "stem.conv1.norm.running_var"),
        ("layer1.0.conv2.weight", "res2.0.conv2.weight"),
        ("layer2.3.bn3.bias", "res3.3.conv3.norm.bias"),
        ("layer3.0.downsample.0.weight", "res4.0.shortcut.weight"),
        ("layer4.0.downsample.1.running_mean", "res5.0.shortcut.norm.running_mean"),
        ("layer4.2.bn1.weight", "res5.2.conv1.norm.weight"),
        ("fc.weight", None),
        ("layer1.0.bn1.num_batches_tracked", None),
        ("module.conv1.weight", None),
        ("layer5.0.conv1.weight", None),
    ],
)
def test_key_renaming_table(tv_key, d2_key):
    assert torchvision_key_to_d2(tv_key) == d2_key


def test_round_trip_resnet50():
    """torchvision -> d2 names -> back: a bijection on the backbone, values untouched."""
    src = torchvision.models.resnet50()
    sd = randomised(src.state_dict())
    blobs, report = convert_torchvision_to_d2(sd)

    backbone_keys = [k for k in sd if not k.startswith("fc.") and "num_batches" not in k]
    assert report.converted == len(blobs) == len(backbone_keys) == 265
    assert sorted(report.dropped) == ["fc", "num_batches_tracked"]
    assert report.dropped["fc"] == ["fc.weight", "fc.bias"]
    assert len(report.dropped["num_batches_tracked"]) == 53
    assert not any("num_batches_tracked" in k or k.startswith("fc") for k in blobs)
    assert [k.split(".")[0] for k in blobs][:2] == ["stem", "stem"]
    assert sum(report.stage_params.values()) == sum(int(sd[k].numel()) for k in backbone_keys)

    inverse = {torchvision_key_to_d2(k): k for k in backbone_keys}
    assert len(inverse) == len(backbone_keys)  # injective
    restored = {inverse[name]: torch.from_numpy(arr) for name, arr in blobs.items()}
    dst = torchvision.models.resnet50()
    result = dst.load_state_dict(restored, strict=False)
    assert result.unexpected_keys == []
    # BatchNorm tolerates an absent num_batches_tracked (recent torch does not list it).
    assert {"fc.weight", "fc.bias"} <= set(result.missing_keys)
    assert all(k.startswith("fc.") or "num_batches" in k for k in result.missing_keys)
    for k in backbone_keys:
        assert blobs[torchvision_key_to_d2(k)].dtype == np.float32
        torch.testing.assert_close(dst.state_dict()[k], sd[k], rtol=0, atol=0)


def test_projector_dropped_and_half_precision_widened():
    sd = {k: v.half() for k, v in torchvision.models.resnet18().state_dict().items()}
    sd["projector.0.weight"] = torch.zeros(3, 3)
    blobs, report = convert_torchvision_to_d2(sd)
    assert report.dropped["projector"] == ["projector.0.weight"]
    assert all(a.dtype == np.float32 for a in blobs.values())


def test_unknown_keys_are_named():
    sd = torchvision.models.resnet18().state_dict()
    sd = {"module." + k: v for k, v in sd.items()}
    with pytest.raises(D2ConversionError, match=r"module\.conv1\.weight"):
        convert_torchvision_to_d2(sd)


def test_incomplete_backbone_is_an_error():
    sd = {k: v for k, v in torchvision.models.resnet18().state_dict().items() if "layer4" not in k}
    with pytest.raises(D2ConversionError, match="res5"):
        convert_torchvision_to_d2(sd)


def test_pickle_format_atomic_and_no_overwrite(tmp_path):
    blobs, _ = convert_torchvision_to_d2(torchvision.models.resnet18().state_dict())
    out = tmp_path / "w.pkl"
    write_d2_pickle(blobs, str(out))
    with open(out, "rb") as f:
        data = pickle.load(f)
    assert set(data) == {"model", "__author__", "matching_heuristics"}
    assert data["matching_heuristics"] is True and data["__author__"] == "IMSVD"
    assert list(data["model"]) == list(blobs)
    assert os.listdir(tmp_path) == ["w.pkl"]  # no temporary file left behind
    with pytest.raises(D2ConversionError, match="already exists"):
        write_d2_pickle(blobs, str(out))
    write_d2_pickle({"stem.conv1.weight": np.zeros(1, np.float32)}, str(out), force=True)
    assert list(read_d2_pickle(str(out))["model"]) == ["stem.conv1.weight"]
    with pytest.raises(D2ConversionError, match="does not exist"):
        write_d2_pickle(blobs, str(tmp_path / "missing" / "w.pkl"))


# ------------------------------------------------------------------------------------------
# The CLI on every checkpoint kind load_backbone accepts (ResNet-18 keeps the files small).
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", CHECKPOINT_KINDS)
def test_convert_cli_each_kind(kind, tmp_path, capsys):
    sd = resnet18_backbone_sd()
    src, out = str(tmp_path / "in.pth"), str(tmp_path / "out.pkl")
    write_checkpoint_kind(kind, src, sd)
    assert convert_main([src, out]) == 0
    printed = capsys.readouterr().out
    expected = {torchvision_key_to_d2(k): v for k, v in sd.items() if "num_batches" not in k}
    assert len(expected) == 100  # ResNet-18: 20 convs + 20 norms x 4 tensors
    assert "converted 100 tensors" in printed and "arch resnet18" in printed

    data = read_d2_pickle(out)
    assert printed.startswith(f"read {src} as {data['source_format']}")
    assert (data["arch"], data["stem"]) == ("resnet18", "standard")  # checked by train_net
    model = data["model"]
    assert set(model) == set(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(model[name], value.numpy())

    # A second run refuses to overwrite, --force replaces the file.
    assert convert_main([src, out]) == 2
    assert "already exists" in capsys.readouterr().err
    assert convert_main([src, out, "--force"]) == 0


def test_convert_cli_bad_inputs(tmp_path, capsys):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"this is not a checkpoint")
    assert convert_main([str(bad), str(tmp_path / "o.pkl")]) == 2
    assert "bad.pth" in capsys.readouterr().err
    assert not (tmp_path / "o.pkl").exists()

    missing = tmp_path / "nothing.pth"
    assert convert_main([str(missing), str(tmp_path / "o.pkl")]) == 2
    assert "nothing.pth" in capsys.readouterr().err

    # A CIFAR-style 3x3 stem has no Detectron2 counterpart.
    small = tmp_path / "small.pth"
    sd = build_backbone("resnet18", stem="small").state_dict()
    export_backbone(str(small), sd, arch="resnet18", stem="small", epoch=1, config=None)
    assert convert_main([str(small), str(tmp_path / "o.pkl")]) == 2
    assert "stem" in capsys.readouterr().err
    assert not (tmp_path / "o.pkl").exists()


def test_convert_cli_errors_list_accepted_inputs_and_allow_unsafe(tmp_path, capsys):
    src, out = str(tmp_path / "in.pth"), str(tmp_path / "o.pkl")
    torch.save({"state_dict": resnet18_backbone_sd(), "args": argparse.Namespace(lr=0.1)}, src)
    assert convert_main([src, out]) == 2
    err = capsys.readouterr().err
    assert "argparse.Namespace" in err and "--allow-unsafe" in err
    assert "Accepted inputs" in err and "SwAV" in err
    assert convert_main([src, out, "--allow-unsafe"]) == 0
    assert "torchvision-state-dict" in capsys.readouterr().out
    torch.save({"weights": {f"net.{k}": v for k, v in resnet18_backbone_sd().items()}}, src)
    assert convert_main([src, out, "--force"]) == 2
    assert "--checkpoint-key" in capsys.readouterr().err
    argv = [src, out, "--force", "--checkpoint-key", "weights", "--prefix", "net."]
    assert convert_main(argv) == 0
    assert "custom (checkpoint_key='weights', prefix='net.'" in capsys.readouterr().out


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def test_read_d2_weights_refuses_code(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pkl"
    with open(evil, "wb") as f:
        pickle.dump({"model": {"stem.conv1.weight": _Evil(marker)}, "__author__": "x"}, f)
    for reader in (read_d2_weights, read_d2_pickle):
        with pytest.raises(D2ConversionError) as e:
            reader(str(evil))
        assert f"{os.system.__module__}.system" in str(e.value)
    with pytest.raises(D2ConversionError, match="convert_to_d2.py"):  # accepted inputs named
        read_d2_weights(str(evil))
    assert not marker.exists()
    # The Caffe2 model-zoo layout (blobs without __author__) reads, momentum buffers dropped.
    zoo = tmp_path / "zoo.pkl"
    blobs = {"conv1_w": np.ones((2, 2), np.float32), "conv1_w_momentum": np.zeros(1)}
    zoo.write_bytes(pickle.dumps({"blobs": blobs}, protocol=2))
    data, label = read_d2_weights(str(zoo))
    assert list(data["model"]) == ["conv1_w"] and data["__author__"] == "Caffe2"
    assert "Caffe2" in label


def test_check_arch_and_trunk():
    check_arch({"model": {}, "arch": "resnet50", "stem": "standard"}, 50, "w.pkl")
    check_arch({"model": {}}, 50, "old.pkl")  # nothing recorded: checked when loading
    with pytest.raises(D2ConversionError, match="resnet18.*DEPTH 50"):
        check_arch({"model": {}, "arch": "resnet18", "stem": "standard"}, 50, "w.pkl")
    heads = [
        "roi_heads.box_predictor.cls_score.weight",
        "roi_heads.res5.norm.weight",
        "backbone.res2.0.conv1.norm.num_batches_tracked",
        "backbone.fpn_lateral2.weight",
    ]
    check_trunk_loaded(heads, [], "w.pkl")
    with pytest.raises(D2ConversionError) as e:
        check_trunk_loaded(heads + ["backbone.res2.0.conv1.weight"], [], "w.pkl")
    assert "backbone keys not loaded (1): backbone.res2.0.conv1.weight" in str(e.value)
    with pytest.raises(D2ConversionError, match=r"roi_heads.res5.0.conv1.weight: \(1,\)"):
        check_trunk_loaded([], [("roi_heads.res5.0.conv1.weight", (1,), (2,))], "w.pkl")


@pytest.mark.parametrize(
    "missing, shapes, needles",
    [
        (
            ["roi_heads.box_predictor.cls_score.weight", "roi_heads.box_predictor.bbox_pred.bias",
             "proposal_generator.rpn_head.conv.weight", "roi_heads.mask_head.predictor.weight"],
            [],
            ["roi_heads.box_predictor (2 tensors)", "proposal_generator.rpn_head (1 tensors)",
             "roi_heads.mask_head (1 tensors)", "w.pkl", "--eval-only"],
        ),
        (
            [],
            [("roi_heads.box_predictor.cls_score.weight", (81, 2048), (3, 2048))],
            ["shapes differ (1)", "(81, 2048) in the file vs (3, 2048)"],
        ),
        (["roi_heads.res5.norm.weight"], [], ["roi_heads.res5 (1 tensors)"]),
    ],
)  # fmt: skip
def test_evaluation_needs_every_tensor_from_the_file(missing, shapes, needles):
    # a converted backbone (no detector heads) is fine to fine-tune, not to evaluate
    check_trunk_loaded(missing, [], "w.pkl")
    with pytest.raises(D2ConversionError) as e:
        check_heads_loaded(missing, shapes, "w.pkl")
    for needle in needles:
        assert needle in str(e.value)
    check_heads_loaded(["backbone.res2.0.conv1.norm.num_batches_tracked"], [], "w.pkl")


# ------------------------------------------------------------------------------------------
# tools/install_detectron2.py: the parts that need no download.
# ------------------------------------------------------------------------------------------


def test_install_numpy_alias_patch():
    inst = load_tool("install_detectron2")
    src = (
        "a = np.zeros(3).astype(np.bool)\nb = np.int64(1) + np.float32(2) + np.int(3)\nc = np.bool_"
    )
    out = inst._numpy2_aliases(src, "x.py")
    assert (
        out
        == "a = np.zeros(3).astype(bool)\nb = np.int64(1) + np.float32(2) + int(3)\nc = np.bool_"
    )
    with pytest.raises(inst.InstallError, match="x.py"):
        inst._numpy2_aliases("nothing here", "x.py")


def test_install_c_import_patch_and_strictness():
    inst = load_tool("install_detectron2")
    out = inst._tolerant_c_import("import torch\nfrom detectron2 import _C\n", "deform_conv.py")
    namespace: dict = {}
    exec(out.replace("import torch\n", ""), namespace)  # no detectron2._C here: must not raise
    with pytest.raises(inst.InstallError, match="deform_conv.py"):
        inst._tolerant_c_import("import torch\n", "deform_conv.py")


def test_install_refuses_bad_sdist_hash(tmp_path, monkeypatch):
    inst = load_tool("install_detectron2")
    fake = tmp_path / "pb1-detectron2-0.6.tar.gz"
    fake.write_bytes(b"not the sdist")
    monkeypatch.setenv("IMSVD_CACHE", str(tmp_path / "cache"))
    with pytest.raises(inst.InstallError, match="SHA-256"):
        inst.main(["--python", sys.executable, "--force", "--rebuild", "--sdist", str(fake)])
    assert not (tmp_path / "cache" / "wheels").exists() or not os.listdir(
        tmp_path / "cache" / "wheels"
    )

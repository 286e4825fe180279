"""Files that are not backbones, named for what they are; the stem a bare state dict does not
record (``stem=``; the evaluations' ``--stem`` in tests/transfer/eval/test_eval_cli.py); the
accepted-inputs list only where it helps."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_weights

import pretrain.checkpoint as ckpt
from pretrain.checkpoint import CheckpointError, CheckpointPathError, with_accepted_inputs
from pretrain.export import export
from pretrain.models.build import model_from_checkpoint


def _tv18() -> dict:
    import torchvision

    return {k: v for k, v in torchvision.models.resnet18().state_dict().items() if "fc." not in k}


def test_text_and_plain_pickles_are_named_for_what_they_are(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("my notes on the run\n")
    with pytest.raises(CheckpointError) as e:
        ckpt.load_backbone(tmp_path / "notes.txt")
    assert "is not a PyTorch checkpoint" in str(e.value) and "b'my notes" in str(e.value)
    d2 = {"model": {"stem.conv1.weight": np.zeros((64, 3, 7, 7), np.float32)}, "__author__": "x"}
    (tmp_path / "r18.pkl").write_bytes(pickle.dumps(d2, protocol=5))
    with pytest.raises(CheckpointError, match="Detectron2 weights pickle .* converted from"):
        ckpt.load_backbone(tmp_path / "r18.pkl")
    (tmp_path / "plain.pkl").write_bytes(pickle.dumps({"a": [1, 2]}))
    with pytest.raises(CheckpointError, match="plain pickle file, not written by torch.save"):
        ckpt.load_backbone(tmp_path / "plain.pkl", allow_unsafe=True)


def test_both_torch_save_formats_still_load(tmp_path: Path) -> None:
    sd = _tv18()
    torch.save(sd, tmp_path / "zip.pth")
    torch.save(sd, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    for name in ("zip.pth", "legacy.pth"):
        got, meta = ckpt.load_backbone(tmp_path / name)
        assert meta["source_format"] == "torchvision-state-dict" and torch.equal(
            got["conv1.weight"], sd["conv1.weight"]
        )
    (tmp_path / "cut.pth").write_bytes((tmp_path / "zip.pth").read_bytes()[:4096])
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        ckpt.load_backbone(tmp_path / "cut.pth")


def test_a_c4_mmdetection_file_is_refused_naming_it(tmp_path: Path) -> None:
    from transfer.detection.mmdet.convert import convert

    torch.save(_tv18(), tmp_path / "tv.pth")
    convert(str(tmp_path / "tv.pth"), str(tmp_path / "c4.pth"))
    with pytest.raises(CheckpointError, match="MMDetection Mask R-CNN C4 weights file"):
        ckpt.load_backbone(tmp_path / "c4.pth")
    convert(str(tmp_path / "tv.pth"), str(tmp_path / "bb.pth"), layout="backbone")
    sd, _ = ckpt.load_backbone(tmp_path / "bb.pth")  # all stages in one backbone: readable
    assert torch.equal(sd["layer4.1.bn2.running_var"], _tv18()["layer4.1.bn2.running_var"])


def test_the_stem_a_bare_state_dict_does_not_record(tmp_path: Path) -> None:
    src = make_weights(tmp_path / "w.pth", stem="small_s2")
    export(str(src), str(tmp_path / "tv.pth"), "torchvision")
    x = torch.randn(2, 3, 28, 28)
    ref = model_from_checkpoint(src)[0].eval()
    assumed, _, meta = model_from_checkpoint(tmp_path / "tv.pth")
    assert meta["stem"] == "small" and ckpt.STEM_ASSUMED in meta["notes"]
    given, _, meta = model_from_checkpoint(tmp_path / "tv.pth", stem="small_s2")
    assert (meta["stem"], meta["stem_source"]) == ("small_s2", "given")
    assert ckpt.STEM_ASSUMED not in meta["notes"]
    with torch.no_grad():
        assert torch.equal(given.eval()(x), ref(x)) and not torch.equal(assumed.eval()(x), ref(x))
    with pytest.raises(CheckpointError, match="records stem 'small_s2'.*contradicts"):
        ckpt.load_backbone(src, stem="small")
    with pytest.raises(
        CheckpointError,
        match=r"3x3 kernel; the given stem 'standard' \(--stem / model.stem\) needs 7x7",
    ):
        ckpt.load_backbone(tmp_path / "tv.pth", stem="standard")
    torch.save(_tv18(), tmp_path / "tv7.pth")
    with pytest.raises(
        CheckpointError,
        match=r"7x7 kernel; the given stem 'small_s2' \(--stem / model.stem\) needs 3x3",
    ):
        ckpt.load_backbone(tmp_path / "tv7.pth", stem="small_s2")
    with pytest.raises(CheckpointError) as e:
        ckpt.load_backbone(src, stem="small")
    assert "Accepted inputs" not in with_accepted_inputs(e.value)  # the file was read
    with pytest.raises(CheckpointError, match="not one of"):
        ckpt.load_backbone(tmp_path / "tv.pth", stem="tiny")


def test_accepted_inputs_only_when_the_content_was_not_understood(tmp_path: Path) -> None:
    with pytest.raises(CheckpointPathError) as missing:
        ckpt.load_backbone(tmp_path / "nope.pth")
    assert with_accepted_inputs(missing.value) == str(missing.value)
    torch.save({"weights": {"enc.conv1.weight": torch.zeros(1)}}, tmp_path / "odd.pth")
    with pytest.raises(CheckpointError) as odd:
        ckpt.load_backbone(tmp_path / "odd.pth")
    assert "Accepted inputs" in with_accepted_inputs(odd.value)
    torch.save(_tv18(), tmp_path / "tv.pth")
    (tmp_path / "out.pth").write_bytes(b"keep me")
    with pytest.raises(CheckpointPathError) as exists:
        export(str(tmp_path / "tv.pth"), str(tmp_path / "out.pth"))
    assert "Accepted inputs" not in with_accepted_inputs(exists.value)
    assert (tmp_path / "out.pth").read_bytes() == b"keep me"

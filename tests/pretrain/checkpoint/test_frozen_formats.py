"""Checkpoints written by earlier versions still load: one frozen file of every format version
(tests/data/checkpoints, written once by its make_frozen.py and committed), read by today's
readers, the model rebuilt and a training state resumed from each."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pytest
import torch
from helpers import REPO

from pretrain.checkpoint import load_backbone
from pretrain.checkpoint.train_state import (
    TRAIN_STATE_VERSION,
    load_training_state,
    restore_training_state,
)
from pretrain.models.build import build_model, model_from_checkpoint
from transfer.detection.d2.weights import read_d2_weights
from transfer.detection.mmdet.weights import FORMAT_VERSION as MMDET_VERSION
from transfer.detection.mmdet.weights import read_mmdet_weights

FROZEN = REPO / "tests" / "data" / "checkpoints"
TRAIN_STATES = {
    "train_state_v1.pth.gz": 1,
    "train_state_v2.pth.gz": 2,
    "train_state_v2_out_norm.pth.gz": 2,
}


def pattern(t: torch.Tensor) -> torch.Tensor:
    """The value the frozen files hold (make_frozen.py's rule, restated)."""
    n = torch.arange(t.numel(), dtype=torch.float64)
    return ((n % 7 + 1) * 0.125).to(t.dtype).view_as(t)


def _open(name: str, tmp_path: Path) -> Path:
    out = tmp_path / name[: -len(".gz")]
    with gzip.open(FROZEN / name, "rb") as f, open(out, "wb") as g:
        shutil.copyfileobj(f, g)
    return out


def _assert_pattern(sd: dict, where: str) -> None:
    floats = {k: v for k, v in sd.items() if torch.is_tensor(v) and v.is_floating_point()}
    assert floats, where
    for k, v in floats.items():
        assert torch.equal(v, pattern(v)), f"{where}: {k}"


def test_every_format_version_has_a_frozen_file():
    # a new version of a writer needs its own frozen file here (make_frozen.py)
    assert set(TRAIN_STATES.values()) == set(range(1, TRAIN_STATE_VERSION + 1))
    assert MMDET_VERSION == 1 and (FROZEN / "mmdet_v1.pth.gz").is_file()
    for name in [*TRAIN_STATES, "backbone_v1.pth.gz", "d2.pkl.gz"]:
        assert (FROZEN / name).is_file(), name


@pytest.mark.parametrize("name", sorted(TRAIN_STATES))
def test_a_frozen_training_state_loads_and_resumes(tmp_path, name):
    path = _open(name, tmp_path)
    state = load_training_state(path)  # version 2: the content hash is checked
    assert state["format_version"] == TRAIN_STATES[name]
    assert (state["epoch"], state["step"], state["step_in_epoch"]) == (1, 3, 1)
    model = build_model(state["config"]["model"])  # the recipe the file carries
    position = restore_training_state(state, model=model)
    assert position == {"epoch": 1, "step": 3, "step_in_epoch": 1}
    _assert_pattern(model.state_dict(), name)
    if state["optimizer"] is not None:  # SGD momentum buffers after one step
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        restore_training_state(state, model=model, optimizer=opt)
        bufs = [s["momentum_buffer"] for s in opt.state.values()]
        assert len(bufs) == len(list(model.parameters()))
        assert all(torch.equal(b, pattern(b)) for b in bufs)
    backbone, projector, meta = model_from_checkpoint(path)
    assert (meta["arch"], meta["stem"]) == ("resnet18", "standard")
    _assert_pattern(backbone.state_dict(), name)
    out_norm = state["config"]["model"]["out_norm"]
    assert projector is not None and projector.out_norm == out_norm
    assert meta["projector"]["out_norm"] == out_norm and meta["projector"]["spec"] == "64-32"
    _assert_pattern(projector.state_dict(), name)


def test_the_frozen_backbone_loads(tmp_path):
    path = _open("backbone_v1.pth.gz", tmp_path)
    sd, meta = load_backbone(path)
    assert meta["source_format"] == "imsvd-backbone" and meta["epoch"] == 2
    _assert_pattern(sd, "backbone")
    backbone, projector, _ = model_from_checkpoint(path)
    assert projector is None
    _assert_pattern(backbone.state_dict(), "backbone")


def test_the_frozen_detector_weights_read(tmp_path):
    tensors, meta = read_mmdet_weights(str(_open("mmdet_v1.pth.gz", tmp_path)))
    assert meta["format_version"] == 1 and meta["stem"] == "standard"
    assert len(tensors) == 120
    _assert_pattern(tensors, "mmdet")
    blobs, _ = read_d2_weights(str(_open("d2.pkl.gz", tmp_path)))
    assert blobs["matching_heuristics"] is True and len(blobs["model"]) == 100
    _assert_pattern({k: torch.from_numpy(v) for k, v in blobs["model"].items()}, "d2")

"""Reading weights that come from elsewhere: no code runs (pickles with code, the reference code's
model.pth) and corrupt training states are detected and skipped."""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import sys
import types
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from helpers import assert_same_tensors, no_fc, save_state, tiny_imsvd_model

import pretrain.checkpoint as ckpt
from pretrain.checkpoint import CheckpointError
from pretrain.models.build import load_projector, model_from_checkpoint
from pretrain.models.projector import Projector


class _Evil:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


# --------------------------------------------------------------------------- 1. no code runs


def test_weights_pickle_with_code_is_refused_before_it_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {"x": _Evil(marker)}, "__author__": "x"}, f)
    with pytest.raises(CheckpointError) as e:
        ckpt.read_weights_pickle(path)
    assert not marker.exists()
    assert f"{os.system.__module__}.system" in str(e.value) and str(path) in str(e.value)


def test_weights_pickle_of_numpy_arrays_reads(tmp_path: Path) -> None:
    import numpy as np

    blobs = OrderedDict(a=np.arange(6, dtype=np.float32).reshape(2, 3), b=np.int64(3))
    for proto in (2, 4, 5):
        path = tmp_path / f"ok{proto}.pkl"
        path.write_bytes(pickle.dumps({"model": blobs, "__author__": "IMSVD", "n": [1.5]}, proto))
        data = ckpt.read_weights_pickle(path)
        assert np.array_equal(data["model"]["a"], blobs["a"]) and data["model"]["b"] == 3


def test_torch_file_with_code_is_refused_by_every_reader(tmp_path: Path, tv18) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": no_fc(tv18), "optimizer": {"x": _Evil(marker)}}, path)
    for reader in (ckpt.load_backbone, load_projector, ckpt.load_training_state):
        with pytest.raises(CheckpointError) as e:
            reader(path)
        assert "system" in str(e.value) and "--allow-unsafe" in str(e.value), reader
    with pytest.raises(CheckpointError):
        model_from_checkpoint(path)
    assert not marker.exists()


# --------------------------------------------------------------- 3. reference model.pth (LARS)


def _filter_fn(marker: Path):
    def exclude_bias_and_norm(p):
        marker.touch()  # must never run while loading
        return p.ndim == 1

    return exclude_bias_and_norm


@pytest.mark.parametrize("main_name", ["__main__", "__mp_main__"])
def test_reference_model_pth_with_main_function(tmp_path, monkeypatch, tv18, main_name) -> None:
    """The LARS filter pickled as ``__main__.exclude_bias_and_norm`` inside the optimizer."""
    marker = tmp_path / "called"
    fn = _filter_fn(marker)
    fn.__module__, fn.__qualname__ = main_name, "exclude_bias_and_norm"
    module = sys.modules.get(main_name) or types.ModuleType(main_name)
    monkeypatch.setitem(sys.modules, main_name, module)
    monkeypatch.setattr(module, "exclude_bias_and_norm", fn, raising=False)
    proj = Projector(512, "64-32").state_dict()
    model = {f"module.backbone.{k}": v for k, v in no_fc(tv18).items()}
    model.update({f"module.projector.{k}": v for k, v in proj.items()})
    group = {"params": [0, 1], "lr": 0.2, "weight_decay_filter": fn, "lars_adaptation_filter": fn}
    opt = {"state": {0: {"mu": torch.ones(3)}}, "param_groups": [group]}
    path = tmp_path / "model.pth"
    torch.save({"epoch": 3, "model": model, "optimizer": opt}, path)
    monkeypatch.undo()  # the function is no longer importable, as in a fresh process
    assert f"{main_name}\nexclude_bias_and_norm".encode() in zipfile.ZipFile(path).read(
        [n for n in zipfile.ZipFile(path).namelist() if n.endswith("data.pkl")][0]
    )
    modules_before = set(sys.modules)

    sd, meta = ckpt.load_backbone(path)
    assert_same_tensors(sd, no_fc(tv18))
    assert meta["source_format"] == "imsvd-reference-model" and meta["epoch"] == 3
    assert any(f"{main_name}.exclude_bias_and_norm" in n for n in meta["notes"]), meta["notes"]
    psd, pmeta = load_projector(path)
    assert pmeta["spec"] == "64-32" and pmeta["matches_projector"]
    _, _, mmeta = model_from_checkpoint(path)
    assert mmeta["projector"]["spec"] == "64-32"
    sd2, _ = ckpt.load_backbone(path, allow_unsafe=True)  # the safe path answers first
    assert_same_tensors(sd2, sd)
    assert not marker.exists()
    assert set(sys.modules) - modules_before == set()  # nothing was imported


def test_placeholders_only_inside_the_optimizer(tmp_path, monkeypatch, tv18) -> None:
    fn = _filter_fn(tmp_path / "called")
    fn.__module__, fn.__qualname__ = "__main__", "exclude_bias_and_norm"
    monkeypatch.setattr(sys.modules["__main__"], "exclude_bias_and_norm", fn, raising=False)
    path = tmp_path / "m.pth"
    torch.save({"state_dict": no_fc(tv18), "loss_fn": fn}, path)
    monkeypatch.undo()
    with pytest.raises(CheckpointError) as e:
        ckpt.load_backbone(path)
    assert "__main__.exclude_bias_and_norm" in str(e.value) and "['loss_fn']" in str(e.value)


def test_namespace_args_need_allow_unsafe(tmp_path, tv18) -> None:
    path = tmp_path / "with_args.pth"
    torch.save({"state_dict": no_fc(tv18), "args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(CheckpointError, match="argparse.Namespace.*--allow-unsafe"):
        ckpt.load_backbone(path)
    _, meta = ckpt.load_backbone(path, allow_unsafe=True)
    assert any("full unpickle" in n for n in meta["notes"])


# ------------------------------------------------- 8. corrupt training states, content hash


def _state(tmp_path: Path, step: int, seed: int = 1) -> Path:
    torch.manual_seed(seed)
    model = tiny_imsvd_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 16, 16)).pow(2).mean().backward()
    opt.step()
    path = tmp_path / ckpt.checkpoint_name(0, step)
    save_state(path, model, optimizer=opt, step=step, step_in_epoch=step)
    return path


def _flip_storage_byte(path: Path) -> None:
    """Flip one byte in the middle of the largest tensor storage of a torch zip file."""
    with zipfile.ZipFile(path) as zf:
        info = max((i for i in zf.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    local = info.header_offset
    name_len = int.from_bytes(raw[local + 26 : local + 28], "little")
    extra_len = int.from_bytes(raw[local + 28 : local + 30], "little")
    pos = local + 30 + name_len + extra_len + info.file_size // 2
    raw[pos] ^= 0x01
    path.write_bytes(bytes(raw))


def test_training_state_hash_detects_a_bit_flip(tmp_path: Path) -> None:
    path = _state(tmp_path, 5)
    raw = torch.load(path, weights_only=True)
    assert raw["format_version"] == 2 and raw["hash_scheme"] == "imsvd-train-sha256-v1"
    assert raw["sha256"] == ckpt.train_state_sha256(raw)
    assert any(k.startswith("optimizer/state/") for k in _flat_keys(raw))
    _flip_storage_byte(path)
    torch.load(path, weights_only=True)  # the container still reads: only the hash can tell
    with pytest.raises(CheckpointError, match="content hash mismatch") as e:
        ckpt.load_training_state(path)
    assert str(path) in str(e.value)
    with pytest.raises(CheckpointError, match="content hash mismatch"):
        ckpt.load_backbone(path)
    ckpt.load_training_state(path, verify_hash=False)


def _flat_keys(state: dict) -> list:
    flat: OrderedDict = OrderedDict()
    from pretrain.checkpoint.common import collect_tensors

    collect_tensors(state["optimizer"], "optimizer", flat)
    return list(flat)


def test_version_1_training_state_still_loads(tmp_path: Path) -> None:
    path = _state(tmp_path, 3)
    raw = torch.load(path, weights_only=True)
    del raw["sha256"], raw["hash_scheme"]
    raw["format_version"] = 1
    torch.save(raw, tmp_path / "v1.pth")
    state = ckpt.load_training_state(tmp_path / "v1.pth")
    assert state["format_version"] == 1 and state["step"] == 3
    raw["format_version"] = 2
    torch.save(raw, tmp_path / "v2_nohash.pth")
    with pytest.raises(CheckpointError, match="sha256"):
        ckpt.load_training_state(tmp_path / "v2_nohash.pth")


def test_load_latest_skips_corrupt_newest(tmp_path: Path, caplog) -> None:
    assert ckpt.load_latest_training_state(tmp_path) == (None, None)
    good = _state(tmp_path, 10)
    flipped = _state(tmp_path, 20)
    truncated = _state(tmp_path, 30)
    _flip_storage_byte(flipped)
    truncated.write_bytes(truncated.read_bytes()[:1000])
    with caplog.at_level(logging.WARNING, logger="imsvd.checkpoint"):
        path, state = ckpt.load_latest_training_state(tmp_path)
    assert path == good and state["step"] == 10
    assert ckpt.latest_checkpoint(tmp_path) == truncated  # the name alone would pick this one
    assert truncated.name in caplog.text and flipped.name in caplog.text
    good.write_bytes(b"garbage")
    with pytest.raises(CheckpointError) as e:
        ckpt.load_latest_training_state(tmp_path)
    assert all(p.name in str(e.value) for p in (good, flipped, truncated))


def test_model_from_checkpoint_reads_once(tmp_path: Path, monkeypatch) -> None:
    path = _state(tmp_path, 7)
    calls = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(a) or real(*a, **k))
    backbone, projector, meta = model_from_checkpoint(path)
    assert len(calls) == 1
    state = ckpt.load_training_state(path)
    assert_same_tensors(
        backbone.state_dict(),
        {k[len("backbone.") :]: v for k, v in state["model"].items() if k.startswith("backbone.")},
    )
    assert isinstance(projector, Projector) and projector.spec == "64-32"
    assert meta["source_format"] == "imsvd-train-state" and meta["stem"] == "small"
    x = torch.randn(2, 3, 16, 16)
    backbone.eval()
    assert backbone(x).shape == (2, 512) and projector.eval()(backbone(x)).shape == (2, 32)

"""Checkpoint files: atomic writes, the training state (round trip, errors), RNG streams, file
management."""

from __future__ import annotations

import copy
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY_CONFIG, assert_same_tensors, save_state, tiny_imsvd_model
from torch import nn

import pretrain.checkpoint as ckpt
from pretrain.checkpoint import CheckpointError

# --------------------------------------------------------------------------- atomic writes


def test_atomic_save_roundtrip_weights_only(tmp_path: Path) -> None:
    obj = {"a": torch.arange(5), "b": [1, 2.5, None, "x"], "c": {"d": True}}
    p = ckpt.atomic_torch_save(obj, tmp_path / "sub" / "x.pth")
    back = torch.load(p, weights_only=True)
    assert torch.equal(back["a"], obj["a"]) and back["b"] == obj["b"] and back["c"] == obj["c"]
    assert [f.name for f in p.parent.iterdir()] == ["x.pth"]


def test_atomic_save_failure_keeps_previous_file(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "state.pth"
    ckpt.atomic_torch_save({"v": torch.tensor([1.0])}, target)
    before = target.read_bytes()

    def crash(obj, f, *a, **k):
        f.write(b"partial garbage")  # a write that dies half way (disk full, killed, ...)
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="No space"):
        ckpt.atomic_torch_save({"v": torch.tensor([2.0])}, target)
    monkeypatch.undo()
    assert target.read_bytes() == before
    assert [f.name for f in tmp_path.iterdir()] == ["state.pth"]  # temp file cleaned up
    assert torch.equal(torch.load(target, weights_only=True)["v"], torch.tensor([1.0]))


@pytest.mark.parametrize(
    "bad, where",
    [
        ({"x": np.zeros(3)}, "['x']"),
        ({"lr": np.float64(0.1)}, "['lr']"),
        ({"groups": [{"params": [0], "filter": len}]}, "['groups'][0]['filter']"),
    ],
)
def test_atomic_save_rejects_objects_weights_only_cannot_load(tmp_path, bad, where) -> None:
    target = tmp_path / "s.pth"
    ckpt.atomic_torch_save({"ok": 1}, target)
    with pytest.raises(CheckpointError) as e:
        ckpt.atomic_torch_save(bad, target)
    assert where in str(e.value) and "weights_only" in str(e.value)
    assert torch.load(target, weights_only=True) == {"ok": 1}


# --------------------------------------------------------------------------- training state


def test_training_state_roundtrip(tmp_path: Path, trained) -> None:
    model, opt, scaler = trained
    path = tmp_path / ckpt.checkpoint_name(3, 120)
    # the wrapper must vanish from the key names (a copy: DataParallel moves it to a GPU)
    wrapped = nn.DataParallel(copy.deepcopy(model))
    save_state(
        path,
        wrapped,
        optimizer=opt,
        scaler=scaler,
        epoch=3,
        step=120,
        step_in_epoch=20,
        extra={"meter": 1.5},
    )
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "imsvd-train-state" and raw["format_version"] == 2
    assert (raw["arch"], raw["stem"]) == ("resnet18", "small")
    assert (raw["epoch"], raw["step"], raw["step_in_epoch"]) == (3, 120, 20)
    assert raw["config"] == TINY_CONFIG and raw["extra"] == {"meter": 1.5}
    assert raw["torch_version"] == torch.__version__ and raw["created"].endswith("Z")
    assert all(k.startswith(("backbone.", "projector.")) for k in raw["model"])
    assert_same_tensors(raw["model"], model.state_dict())
    assert raw["scaler"]["scale"] == scaler.get_scale()

    state = ckpt.load_training_state(path)
    torch.manual_seed(5)
    model2 = tiny_imsvd_model()
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    scaler2 = torch.amp.GradScaler("cpu")
    pos = ckpt.restore_training_state(state, model=model2, optimizer=opt2, scaler=scaler2)
    assert pos == {"epoch": 3, "step": 120, "step_in_epoch": 20}
    assert_same_tensors(model2.state_dict(), model.state_dict())
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for i in s1["state"]:
        assert torch.equal(s1["state"][i]["momentum_buffer"], s2["state"][i]["momentum_buffer"])
    assert scaler2.get_scale() == scaler.get_scale()


def test_restore_names_mismatched_keys(tmp_path: Path, trained) -> None:
    model, opt, scaler = trained
    path = tmp_path / "c.pth"
    save_state(path, model, optimizer=opt, step=1, step_in_epoch=1)
    state = ckpt.load_training_state(path)
    assert state["scaler"] is None
    with pytest.raises(CheckpointError) as e:
        ckpt.restore_training_state(state, model=tiny_imsvd_model(spec="64-16"))
    assert "projector.3.weight: (32, 64) vs expected (16, 64)" in str(e.value)
    deeper = tiny_imsvd_model(spec="64-64-32")
    with pytest.raises(CheckpointError) as e:
        ckpt.restore_training_state(state, model=deeper)
    assert "missing keys" in str(e.value) and "projector.6.weight" in str(e.value)
    other_opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(CheckpointError, match="optimizer state does not match"):
        ckpt.restore_training_state(state, model=tiny_imsvd_model(), optimizer=other_opt)


def test_save_training_state_rejects_non_imsvd_model(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"keys backbone\.\* and projector\.\*"):
        save_state(tmp_path / "x.pth", nn.Linear(2, 2))


def test_load_training_state_errors(tmp_path: Path, trained) -> None:
    model = trained[0]
    path = tmp_path / "c.pth"
    save_state(path, model)
    raw = torch.load(path, weights_only=True)
    raw["format_version"] = 99
    torch.save(raw, tmp_path / "newer.pth")
    with pytest.raises(CheckpointError, match="version 99 was written by a newer"):
        ckpt.load_training_state(tmp_path / "newer.pth")
    raw["format_version"] = 2
    del raw["rng"]
    torch.save(raw, tmp_path / "norng.pth")
    with pytest.raises(CheckpointError, match=r"lacks required field\(s\) \['rng'\]"):
        ckpt.load_training_state(tmp_path / "norng.pth")
    ckpt.export_backbone(
        tmp_path / "bb.pth",
        model.backbone.state_dict(),
        arch="resnet18",
        stem="small",
        epoch=1,
        config=TINY_CONFIG,
    )
    with pytest.raises(CheckpointError, match="exported backbone"):
        ckpt.load_training_state(tmp_path / "bb.pth")


# --------------------------------------------------------------------------- RNG


def _draw() -> tuple:
    return (
        torch.rand(5),
        torch.randn(3),
        np.random.rand(4),
        np.random.randn(3),  # odd count leaves a cached gaussian in numpy's state
        [random.random() for _ in range(3)],
        random.gauss(0, 1),
    )


def _same_draws(a: tuple, b: tuple) -> bool:
    return (
        torch.equal(a[0], b[0])
        and torch.equal(a[1], b[1])
        and np.array_equal(a[2], b[2])
        and np.array_equal(a[3], b[3])
        and a[4] == b[4]
        and a[5] == b[5]
    )


def test_rng_capture_restore_reproduces_streams(tmp_path: Path) -> None:
    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    np.random.randn(1)  # cached gaussian present at capture time
    random.gauss(0, 1)
    state = ckpt.capture_rng_state()
    first = _draw()
    ckpt.atomic_torch_save({"rng": state}, tmp_path / "rng.pth")
    loaded = torch.load(tmp_path / "rng.pth", weights_only=True)["rng"]
    assert not _same_draws(first, _draw())  # the streams really moved on
    ckpt.restore_rng_state(loaded)
    assert _same_draws(first, _draw())


def test_rng_state_for_rank() -> None:
    a, b = {"torch": 1}, {"torch": 2}
    assert ckpt.rng_state_for_rank({"rng": a, "rng_per_rank": [a, b]}, 1, 2) is b
    assert ckpt.rng_state_for_rank({"rng": a}, 0, 1) is a
    assert ckpt.rng_state_for_rank({"rng": a}, 1, 2) is None  # do not clone rank 0's streams
    with pytest.raises(CheckpointError, match="invalid RNG state"):
        ckpt.restore_rng_state({"torch": torch.get_rng_state()})


# --------------------------------------------------------------------------- file management


def test_latest_and_prune(tmp_path: Path) -> None:
    assert ckpt.latest_checkpoint(tmp_path / "missing") is None
    assert ckpt.latest_checkpoint(tmp_path) is None
    assert ckpt.checkpoint_name(3, 1200) == "checkpoint_e0003_s00001200.pth"
    for e, s in [(0, 50), (1, 100), (1, 150), (2, 200)]:
        (tmp_path / ckpt.checkpoint_name(e, s)).write_bytes(b"x")
    (tmp_path / ".checkpoint_e0009_s00009999.pth.abc123.tmp").write_bytes(b"partial")
    (tmp_path / "checkpoint_e0009_s00009999.pth.bak").write_bytes(b"x")
    (tmp_path / "backbone.pth").write_bytes(b"x")
    assert ckpt.latest_checkpoint(tmp_path).name == "checkpoint_e0002_s00000200.pth"
    assert ckpt.prune_checkpoints(tmp_path, 0) == []
    deleted = ckpt.prune_checkpoints(tmp_path, keep_last=2)
    assert sorted(p.name for p in deleted) == [
        "checkpoint_e0000_s00000050.pth",
        "checkpoint_e0001_s00000100.pth",
    ]
    left = sorted(p.name for p in tmp_path.iterdir())
    assert "checkpoint_e0001_s00000150.pth" in left and "backbone.pth" in left
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == [
        "checkpoint_e0001_s00000150.pth",
        "checkpoint_e0002_s00000200.pth",
    ]


# --------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_state_roundtrip(tmp_path: Path) -> None:
    dev = torch.device("cuda")
    torch.manual_seed(2)
    model = tiny_imsvd_model().to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        loss = model(torch.randn(4, 3, 16, 16, device=dev)).float().pow(2).mean()
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    rng = ckpt.capture_rng_state()
    assert len(rng["cuda"]) == torch.cuda.device_count() >= 1
    first = torch.rand(8, device=dev)
    path = tmp_path / ckpt.checkpoint_name(0, 1)
    save_state(path, model, optimizer=opt, scaler=scaler, step=1, step_in_epoch=1, rng=rng)
    state = ckpt.load_training_state(path)  # map_location="cpu"
    assert all(v.device.type == "cpu" for v in state["model"].values())
    assert state["scaler"]["scale"] == scaler.get_scale()
    ckpt.restore_rng_state(state["rng"])
    assert torch.equal(torch.rand(8, device=dev), first)
    model2 = tiny_imsvd_model().to(dev)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1, momentum=0.9)
    ckpt.restore_training_state(state, model=model2, optimizer=opt2, scaler=None)
    assert_same_tensors(model2.state_dict(), model.state_dict())
    digest = ckpt.export_backbone(
        tmp_path / "bb.pth",
        model.backbone.state_dict(),
        arch="resnet18",
        stem="small",
        epoch=0,
        config=TINY_CONFIG,
    )
    cpu_sd = {k: v.cpu() for k, v in model.backbone.state_dict().items()}
    assert digest == ckpt.tensor_sha256(cpu_sd)
    sd, meta = ckpt.load_backbone(tmp_path / "bb.pth", map_location="cuda")
    assert meta["sha256"] == digest and next(iter(sd.values())).is_cuda

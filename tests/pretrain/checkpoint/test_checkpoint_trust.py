"""Reading weights that come from elsewhere: no code runs, every known layout reads, corrupt
training states are detected and skipped, and exports that foreign scripts read correctly."""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import subprocess
import sys
import types
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torchvision
from helpers import REPO, TINY_CONFIG, assert_same_tensors, load_tool, no_fc, tiny_imsvd_model

import pretrain.checkpoint as ckpt
from pretrain.checkpoint import CheckpointError
from pretrain.models.backbone import build_backbone
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
    args = parser.parse_args(["--allow-unsafe", "--checkpoint-key", "teacher", "--prefix", "b."])
    kw = ckpt.weights_kwargs(args)
    assert kw == {"allow_unsafe": True, "checkpoint_key": "teacher", "prefix": "b."}
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
    assert "Accepted inputs" in bad.stderr


@pytest.fixture
def tools_export():
    """tools/export_backbone.py as a module (tools/ is not a package)."""
    return load_tool("export_backbone")


# ------------------------------------------------- 8. corrupt training states, content hash


def _state(tmp_path: Path, step: int, seed: int = 1) -> Path:
    torch.manual_seed(seed)
    model = tiny_imsvd_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 16, 16)).pow(2).mean().backward()
    opt.step()
    path = tmp_path / ckpt.checkpoint_name(0, step)
    ckpt.save_training_state(
        path,
        model=model,
        optimizer=opt,
        scaler=None,
        epoch=0,
        step=step,
        step_in_epoch=step,
        config=TINY_CONFIG,
    )
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

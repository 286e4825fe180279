"""Pretraining engine end to end on CPU: training, hooks, resume, preemption, non-finite loss,
the run folder, config errors, the output norm's layout."""

import ast
import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO

from pretrain import checkpoint as ckpt
from pretrain.checkpoint import train_state as ckpt_train_state
from pretrain.config import load_config
from pretrain.engine import trainer as engine
from pretrain.engine.checkpointer import (
    CheckpointWriteError,
    ConfigChangedError,
    NonFiniteStateError,
    RunFolder,
    RunFolderBusyError,
)
from pretrain.engine.hooks import HookBase
from pretrain.models.build import model_from_checkpoint

SMOKE = REPO / "configs" / "pretrain" / "imsvd_smoke.yaml"


def _cfg(out: Path, *extra: str) -> dict:
    return load_config(SMOKE, [f"checkpoint.output_dir={out}", *extra])


def _final_state(out: Path) -> dict:
    sd, meta = ckpt.load_backbone(out / engine.FINAL_BACKBONE)
    return sd


def test_training_changes_weights_and_logs_metrics(tmp_path):
    cfg = _cfg(tmp_path / "a")
    torch.manual_seed(cfg["train"]["seed"])
    from pretrain.models.build import build_model

    init = build_model(cfg["model"]).backbone.state_dict()
    summary = engine.train(cfg)
    assert summary["status"] == "finished" and summary["step"] == 4
    final = _final_state(tmp_path / "a")
    changed = [
        k for k in final if final[k].dtype.is_floating_point and not torch.equal(final[k], init[k])
    ]
    assert len(changed) > 10
    lines = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4
    import json

    row = json.loads(lines[-1])
    for key in (
        "loss",
        "loss_ti",
        "loss_dia",
        "loss_off",
        "lr",
        "mon/onehot_0.9",
        "mon/marginal_entropy",
    ):
        assert key in row


class _AtStep(HookBase):
    """Calls ``fn(trainer)`` once, after the given step."""

    def __init__(self, step, fn):
        self.at, self.fn, self.done = step, fn, False

    def after_step(self):
        if self.state.step == self.at and not self.done:
            self.done = True
            self.fn(self.trainer)


class _Recorder(HookBase):
    """Records what the loop state says at each callback."""

    def __init__(self):
        self.seen, self.lrs = [], []

    def _note(self, where):
        s = self.state
        views = None if s.views is None else tuple(tuple(v.shape) for v in s.views)
        self.seen.append((where, s.step, s.epoch, s.step_in_epoch, s.status, views))

    def before_train(self):
        self._note("before")

    def after_step(self):
        assert "loss" in self.state.losses and 0 <= self.state.train_seconds()
        self.lrs.append(self.state.lr)  # the warm-up starts at 0
        self._note("step")

    def after_epoch(self):
        self._note("epoch")

    def after_train(self):
        self._note("after")


def test_hooks_see_the_loop_state(tmp_path):
    rec = _Recorder()
    out = engine.train(_cfg(tmp_path / "run"), hooks=[rec])
    s = out["step"]
    steps = [e for e in rec.seen if e[0] == "step"]
    assert [e[1] for e in steps] == list(range(1, s + 1)) and max(rec.lrs) > 0
    assert rec.seen[0][:5] == ("before", 0, 0, 0, "running") and rec.seen[0][5] is None
    assert rec.seen[-1][0] == "after" and rec.seen[-1][4] == "finished"
    assert all(e[4] == "running" for e in rec.seen[:-1])
    n, d = steps[0][5][0]
    assert steps[0][5] == ((n, d), (n, d)) and d > 0


def test_builtin_hooks_see_only_the_loop_state_and_what_they_were_given():
    # the built-in hooks never read the trainer: a hook's view of the loop is LoopState
    # (attach_hooks only stores the weak proxy)
    tree = ast.parse((REPO / "pretrain" / "engine" / "hooks.py").read_text(encoding="utf-8"))
    uses = [
        n.lineno
        for n in ast.walk(tree)
        if isinstance(n, ast.Attribute)
        and n.attr == "trainer"
        and isinstance(n.value, ast.Name)
        and isinstance(n.ctx, ast.Load)
    ]
    assert not uses, f"pretrain/engine/hooks.py reads self.trainer at lines {uses}"


def test_preempt_and_resume_is_identical(tmp_path):
    """SIGTERM after step 2 writes a checkpoint; resuming reproduces the uninterrupted run."""
    ref_out, cut_out = tmp_path / "ref", tmp_path / "cut"
    engine.train(_cfg(ref_out, "checkpoint.every_steps=0"))
    reference = _final_state(ref_out)
    signal_hook = _AtStep(2, lambda tr: os.kill(os.getpid(), signal.SIGTERM))
    first = engine.train(_cfg(cut_out, "checkpoint.every_steps=0"), hooks=[signal_hook])
    assert first["status"] == "preempted" and first["step"] == 3
    assert not (cut_out / engine.FINAL_BACKBONE).exists()
    second = engine.train(_cfg(cut_out, "checkpoint.every_steps=0"))
    assert second["status"] == "finished" and second["step"] == 4
    resumed = _final_state(cut_out)
    for k in reference:
        assert torch.equal(reference[k], resumed[k]), k


def _poison_weight(tr):
    with torch.no_grad():
        tr.model.backbone.conv1.weight.fill_(float("nan"))


def test_non_finite_loss_stops_and_keeps_checkpoint(tmp_path):
    out = tmp_path / "nan"
    # step 1 is saved (checkpoint.every_steps=1), then the weights turn NaN: step 2's loss is NaN
    with pytest.raises(engine.NonFiniteLossError, match="non-finite loss at epoch 0, step 1"):
        engine.train(_cfg(out), hooks=[_AtStep(1, _poison_weight)])
    state = ckpt.load_training_state(ckpt.latest_checkpoint(out))
    assert state["step"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_non_finite_buffer_is_never_saved(tmp_path):
    """An inf BatchNorm running_var does not change the loss, but must not be checkpointed."""
    out = tmp_path / "inf"

    def poison_buffer(tr):
        tr.model.backbone.bn1.running_var.fill_(float("inf"))

    with pytest.raises(NonFiniteStateError, match=r"backbone\.bn1\.running_var.*step 2"):
        engine.train(_cfg(out), hooks=[_AtStep(1, poison_buffer)])
    state = ckpt.load_training_state(ckpt.latest_checkpoint(out))
    assert state["step"] == 1  # the last finite checkpoint is kept
    assert torch.isfinite(state["model"]["backbone.bn1.running_var"]).all()


def test_resume_with_a_changed_recipe_is_refused(tmp_path):
    out = tmp_path / "run"
    engine.train(_cfg(out, "train.max_steps=2"))
    before = (out / "config.yaml").read_text()
    with pytest.raises(ConfigChangedError) as e:
        engine.train(_cfg(out, "train.max_steps=4", "loss.bin_size=16", "data.num_workers=1"))
    msg = str(e.value)
    assert "train.max_steps: 2 -> 4" in msg and "loss.bin_size: 80 -> 16" in msg
    assert "num_workers" not in msg  # does not change the run
    assert "allow_config_change" in msg
    assert (out / "config.yaml").read_text() == before  # untouched by the refused run
    res = engine.train(_cfg(out, "train.max_steps=4", "checkpoint.allow_config_change=true"))
    assert res["status"] == "finished" and res["step"] == 4


def test_output_folder_lock_and_stale_temp_files(tmp_path):
    out = tmp_path / "locked"
    out.mkdir()
    stale = out / ".checkpoint_e0001_s00000002.pth.abc123.tmp"
    stale.write_bytes(b"half")
    with RunFolder(out, is_main=True):
        assert not stale.exists()
        with pytest.raises(RunFolderBusyError, match=str(os.getpid())):
            with RunFolder(out, is_main=True):
                pass
    with RunFolder(out, is_main=True):  # released
        pass


def test_disk_full_is_one_clear_error(tmp_path, monkeypatch):
    out = tmp_path / "full"

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_train_state, "atomic_torch_save", no_space)
    with pytest.raises(CheckpointWriteError, match="no space left on device"):
        engine.train(_cfg(out))
    assert ckpt.latest_checkpoint(out) is None
    res = subprocess.run(
        [sys.executable, "-c", _DISK_FULL_MAIN, str(SMOKE), str(out)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert res.returncode == 2, res.stderr[-2000:]
    assert "no space left on device" in res.stderr and "Traceback" not in res.stderr
    assert "no space left on device" in (out / "log.txt").read_text()


_DISK_FULL_MAIN = """
import errno, sys
import pretrain.checkpoint.train_state as ts
def no_space(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")
ts.atomic_torch_save = no_space
from pretrain.main import main
sys.exit(main(["--config", sys.argv[1], "checkpoint.output_dir=" + sys.argv[2]]))
"""


def test_config_errors_are_clear(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "pretrain.main", "--config", str(SMOKE), "train.batchsize=4"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert res.returncode == 2 and "unknown config key 'train.batchsize'" in res.stderr
    assert "Traceback" not in res.stderr
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "pretrain.main",
            "--config",
            str(SMOKE),
            f"checkpoint.output_dir={tmp_path}",
            "data.kind=imagefolder",
            f"data.root={tmp_path / 'missing'}",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert res.returncode == 2 and "missing" in res.stderr and "Traceback" not in res.stderr
    with pytest.raises(ValueError, match="multiple of bin_size"):
        engine.train(_cfg(tmp_path / "b", "model.projector=128-100"))


def _earlier_layout(sd: dict, norm: int) -> dict:
    """An PretrainModel state dict with the output norm as ``out_norm.*`` (the earlier layout)."""
    head = f"projector.{norm}."
    return {(f"out_norm.{k[len(head):]}" if k.startswith(head) else k): v for k, v in sd.items()}


def test_output_norm_run_saves_resumes_and_reads_back(tmp_path):
    """model.out_norm=bn: the norm is the projector's last layer, with the same keys in training,
    in the checkpoint and when rebuilt; files of the earlier out_norm.* layout read and resume."""
    from pretrain.checkpoint.train_state import train_state_sha256
    from pretrain.models.build import PretrainModel, build_model
    from pretrain.models.projector import Projector

    out, old = tmp_path / "bn", tmp_path / "old"
    cfg = _cfg(out, "model.out_norm=bn")
    stop = _AtStep(1, lambda tr: os.kill(os.getpid(), signal.SIGTERM))
    assert engine.train(cfg, hooks=[stop])["status"] == "preempted"
    first = ckpt.latest_checkpoint(out)
    state = ckpt.load_training_state(first)
    trained = build_model(cfg["model"])
    norm = len(trained.projector) - 1
    assert list(state["model"]) == list(trained.state_dict())
    assert f"projector.{norm}.running_var" in state["model"]
    assert not any(k.startswith("out_norm.") for k in state["model"])
    # the same state written in the earlier layout, in another run folder
    raw = torch.load(first, weights_only=True)
    raw["model"] = _earlier_layout(raw["model"], norm)
    raw["sha256"] = train_state_sha256(raw)
    old.mkdir()
    torch.save(raw, old / first.name)
    assert engine.train(cfg)["step"] == 4  # resumed, and the final states are written
    assert engine.train(_cfg(old, "model.out_norm=bn"))["step"] == 4  # the earlier layout too
    state = ckpt.load_training_state(ckpt.latest_checkpoint(out))
    for k, v in ckpt.load_training_state(ckpt.latest_checkpoint(old))["model"].items():
        torch.testing.assert_close(v, state["model"][k], rtol=0, atol=0)
    trained.load_state_dict(state["model"])
    backbone, projector, meta = model_from_checkpoint(ckpt.latest_checkpoint(out))
    assert isinstance(projector, Projector) and meta["projector"]["out_norm"] == "bn"
    assert list(projector.state_dict()) == list(trained.projector.state_dict())
    x = torch.randn(3, 3, 32, 32)
    read = PretrainModel(backbone, projector).eval()
    torch.testing.assert_close(read(x), trained.eval()(x))  # the logits the loss saw
    # a bare PretrainModel.state_dict() of such a run, in either layout, reads the same way
    for name, sd in (
        ("new", trained.state_dict()),
        ("old", _earlier_layout(trained.state_dict(), norm)),
    ):
        torch.save(sd, tmp_path / f"model_sd_{name}.pth")
        _, projector2, meta2 = model_from_checkpoint(tmp_path / f"model_sd_{name}.pth")
        assert meta2["projector"]["out_norm"] == "bn" and meta2["projector"]["matches_projector"]
        torch.testing.assert_close(PretrainModel(backbone, projector2).eval()(x), read(x))

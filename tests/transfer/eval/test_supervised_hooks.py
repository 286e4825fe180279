"""Hooks of the supervised-head trainer: called as in pretraining, with the loop's LoopState
(counters, learning rate, loss, stop request, status) and a weak proxy of the trainer."""

from __future__ import annotations

import gc
import math
import os
import signal
import weakref

import pytest
import torch
from helpers import REPO

from pretrain.config import load_config
from pretrain.engine.hooks import HookBase
from transfer.eval import linear, runner
from transfer.eval.supervised import SupervisedTrainer

EVAL = REPO / "configs" / "eval"


class _Recorder(HookBase):
    def __init__(self, sigterm_at_step: int | None = None) -> None:
        self.events: list[tuple] = []
        self.sigterm_at_step = sigterm_at_step

    def _record(self, event: str) -> None:
        s = self.state
        loss = float(s.losses["loss"]) if s.losses else math.nan
        self.events.append(
            (event, s.epoch, s.step, s.step_in_epoch, s.lr, loss, s.status, s.stop_requested)
        )

    def before_train(self) -> None:
        self._record("before_train")

    def after_step(self) -> None:
        self._record("after_step")
        if self.state.stop_requested:  # the trainer saved before calling the hooks
            path = self.trainer.ckpt_path
            self.saved_step = torch.load(path, weights_only=True)["step"]
        if self.state.step == self.sigterm_at_step:  # a preemption, as SLURM sends it
            os.kill(os.getpid(), signal.SIGTERM)

    def after_epoch(self) -> None:
        self._record("after_epoch")
        self.head_rows = self.trainer.head.state_dict()["fc.weight"].shape[0]

    def after_train(self) -> None:
        self._record("after_train")
        self.stop = (self.state.stop_requested, self.state.stop_signal)


def _run(tiny_trees, tiny_backbone, out, hook, *extra):
    overrides = [f"model.weights={tiny_backbone}", f"output_dir={out}",
                 f"data.train_root={tiny_trees / 'train'}", f"data.val_root={tiny_trees / 'val'}",
                 *extra]  # fmt: skip
    ctx = runner.setup(linear.EVALUATION, load_config(EVAL / "linear_tiny.yaml", overrides))
    try:
        trainer = SupervisedTrainer(ctx, "frozen", "linear_checkpoint.pth", hooks=[hook])
        return trainer, trainer.fit()
    finally:
        ctx.release()


def test_hooks_see_every_step_and_epoch_through_the_loop_state(tiny_trees, tiny_backbone, tmp_path):
    hook = _Recorder()
    trainer, res = _run(tiny_trees, tiny_backbone, tmp_path / "o", hook)
    per_epoch = trainer.steps_per_epoch  # 24 images, batch 8: 3 steps
    assert per_epoch == 3 and res["top1"] >= 0
    names = [e[0] for e in hook.events]
    assert names == ["before_train"] + (["after_step"] * 3 + ["after_epoch"]) * 2 + ["after_train"]
    first = hook.events[0]  # before any step: no loss yet
    assert first[1:4] == (0, 0, 0) and math.isnan(first[5]) and first[6:] == ("running", False)
    steps = [e for e in hook.events if e[0] == "after_step"]
    assert [(e[1], e[2], e[3]) for e in steps] == [(0, 1, 1), (0, 2, 2), (0, 3, 3),
                                                   (1, 4, 1), (1, 5, 2), (1, 6, 3)]  # fmt: skip
    # the step schedule (milestones [1]): lr 0.1 in epoch 0, then 0.01
    assert [e[4] for e in steps] == pytest.approx([0.1] * 3 + [0.01] * 3, rel=1e-12)
    # each step's loss as the trainer logs it: an epoch's mean is its history row's loss
    for epoch, row in enumerate(res["history"]):
        mean = sum(e[5] for e in steps if e[1] == epoch) / per_epoch
        assert row["loss"] == pytest.approx(mean, rel=1e-6, abs=1e-12)
    assert all(math.isfinite(e[5]) for e in steps) and steps[0][5] > 0.1
    epochs = [e for e in hook.events if e[0] == "after_epoch"]
    assert [(e[1], e[2], e[3]) for e in epochs] == [(1, 3, 0), (2, 6, 0)]  # the next epoch
    assert hook.events[-1][6] == "finished" and hook.stop == (False, None)
    assert hook.head_rows == 3 and isinstance(hook.trainer, weakref.ProxyType)
    assert (hook.state.steps_per_epoch, hook.state.total_steps) == (3, 6)
    assert hook.state.images_per_step == 8 and hook.state.views is None
    # the hook does not keep its trainer alive
    del trainer
    gc.collect()
    try:
        hook.trainer.head
    except ReferenceError:
        pass
    else:
        raise AssertionError("the hook kept the trainer alive")


def test_a_preempted_run_tells_its_hooks(tiny_trees, tiny_backbone, tmp_path):
    hook = _Recorder(sigterm_at_step=2)
    previous = signal.getsignal(signal.SIGTERM)
    _, res = _run(tiny_trees, tiny_backbone, tmp_path / "p", hook)
    assert signal.getsignal(signal.SIGTERM) == previous  # the trainer restored the handler
    # the signal arrives after step 2; the ranks learn of it in step 3's collective (before its
    # forward), finish that step, save and stop: no after_epoch, then after_train "preempted"
    assert res["status"] == "preempted" and res["step"] == 3
    names = [e[0] for e in hook.events]
    assert names == ["before_train", "after_step", "after_step", "after_step", "after_train"]
    assert [e[7] for e in hook.events] == [False, False, False, True, True]
    assert hook.events[-1][6] == "preempted" and hook.stop == (True, signal.SIGTERM)
    assert torch.load(tmp_path / "p" / "linear_checkpoint.pth", weights_only=True)["step"] == 3
    assert hook.saved_step == 3  # the preemption checkpoint was written before the hooks ran
    # the next start resumes there: its hooks begin at the saved position and finish the run
    again = _Recorder()
    _, res = _run(tiny_trees, tiny_backbone, tmp_path / "p", again)
    assert res["history"][-1]["epoch"] == 2 and again.events[-1][6] == "finished"
    assert again.events[0][:4] == ("before_train", 0, 3, 3)
    names = [e[0] for e in again.events]
    assert names == ["before_train", "after_epoch"] + ["after_step"] * 3 + ["after_epoch"] + [
        "after_train"
    ]
    assert [e[2] for e in again.events if e[0] == "after_step"] == [4, 5, 6]

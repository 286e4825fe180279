"""The pretraining loop: DDP, mixed precision, resume, preemption; everything else in hooks.

:class:`Trainer` builds the data, model, optimizer and loss from a resolved config and runs
optimisation steps; metrics, the online kNN probe and checkpointing are hooks
(:mod:`pretrain.engine.hooks`), the checkpoint policy is
:class:`pretrain.engine.checkpointer.Checkpointer`.
"""

from __future__ import annotations

import math
import time
from functools import partial
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from pretrain import dist
from pretrain.config import save_config
from pretrain.data.images import DataError
from pretrain.data.loader import build_pretrain_loader
from pretrain.engine.checkpointer import (
    FINAL_BACKBONE,
    Checkpointer,
    CheckpointWriteError,
    RunFolder,
)
from pretrain.engine.hooks import (
    CheckpointHook,
    HookBase,
    LoopState,
    MetricsHook,
    ProbeHook,
    attach_hooks,
)
from pretrain.engine.optim import build_optimizer, lr_at, scaled_lr, set_lr
from pretrain.engine.preflight import check_config
from pretrain.engine.runtime import PRECISIONS, StopRequest, autocast, grad_scaler
from pretrain.errors import IMSVDError
from pretrain.log import MetricWriter, setup_logging
from pretrain.methods import get_method
from pretrain.models.build import build_model
from pretrain.probe.online import build_probe
from pretrain.progress import progress

__all__ = ["Trainer", "train", "NonFiniteLossError", "FINAL_BACKBONE", "PRECISIONS"]


class NonFiniteLossError(IMSVDError, RuntimeError):
    """The loss became NaN/inf; training stopped without writing a checkpoint."""


def _monitors(method, cfg: Mapping, z1: torch.Tensor, z2: torch.Tensor, step: int) -> dict:
    """The method's monitors of a step's two views (what :class:`MetricsHook` logs)."""
    return method.monitors(z1, z2, cfg, step)


class Trainer:
    """Runs pretraining as described by a resolved config (see configs/pretrain/base.yaml).

    Everything is built here, in the constructor, once the run folder is locked: data, model,
    optimizer, loss, scaler, checkpointer, writer, probe and hooks (:meth:`build_hooks`, which a
    subclass may override); :meth:`fit` resumes and trains, :meth:`close` releases the folder
    (``fit`` does it when it ends). Hooks see the loop as ``trainer.state``
    (:class:`pretrain.engine.hooks.LoopState`); a hook that acts on the training itself also
    sees the trainer, through a weak proxy.

    Args:
        cfg: the resolved config.
        hooks: extra hooks, run after the built-in ones (metrics, probe, checkpoints).
    Raises:
        RunFolderBusyError: another run holds ``checkpoint.output_dir``.
    """

    def __init__(self, cfg: Mapping, hooks: Sequence[HookBase] = ()) -> None:
        self.cfg = cfg
        self.info = dist.init_distributed(cfg["train"]["device"])
        self.out = Path(cfg["checkpoint"]["output_dir"])
        try:
            self.log = setup_logging(self.out, rank=self.info.rank)
        except OSError as e:  # the run folder cannot be created or written
            raise CheckpointWriteError(
                f"config key 'checkpoint.output_dir': cannot write the run folder {self.out}: {e}"
            ) from None
        check_config(cfg, self.info.world_size)
        self.log.info(
            "process %d/%d on %s (backend %s); output %s",
            self.info.rank,
            self.info.world_size,
            self.info.device,
            self.info.backend,
            self.out,
        )
        torch.manual_seed(cfg["train"]["seed"] + self.info.rank)
        self.extra_hooks = list(hooks)
        self.state = LoopState()  # the loop as the hooks see it
        self._folder: RunFolder | None = RunFolder(self.out, self.info.is_main).__enter__()
        try:
            self._build()
            self.hooks = attach_hooks(self.build_hooks() + self.extra_hooks, self.state, self)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the run folder (idempotent)."""
        if self._folder is not None:
            self._folder.__exit__(None, None, None)
            self._folder = None

    # ----------------------------------------------------------------- setup
    def _build(self) -> None:
        """Data, schedule, model (DDP, SyncBN, channels-last, compile), optimizer, loss, scaler,
        checkpointer, writer and the built-in hooks' parts."""
        cfg, info = self.cfg, self.info
        self._build_data()
        model = self._build_model()
        self.optimizer = build_optimizer(model, cfg["optim"], self.peak_lr)
        self.method = get_method(cfg["loss"]["name"])
        self.criterion = self.method.build(cfg["loss"])
        self.scaler = grad_scaler(info.device, cfg["train"]["precision"])
        self.checkpointer = Checkpointer(cfg, model, self.optimizer, self.scaler, info)
        self.writer = MetricWriter.from_config(self.out, cfg, rank=info.rank)
        method = self.method  # the hooks get what they use, not the trainer
        self.metrics_hook = MetricsHook(
            self.writer,
            cfg["log"]["every_steps"],
            monitors=None if method.monitors is None else partial(_monitors, method, cfg),
            skipped_images=self.loader.pop_skipped,
            scaler=self.scaler,
        )
        self.probe_hook: ProbeHook | None = None
        if cfg["eval"]["every_steps"] > 0:  # every rank: the bank is sharded over them
            probe = build_probe(cfg["eval"], cfg["data"])
            every = cfg["eval"]["every_steps"]
            self.probe_hook = ProbeHook(probe, self.writer, every, model.backbone)

    def _build_data(self) -> None:
        """The loader, the loop's counters and the lr schedule's warm-up and peak."""
        cfg, info = self.cfg, self.info
        tr = cfg["train"]
        self.batch_per_rank = tr["batch_size"] // info.world_size
        self.state.images_per_step = tr["batch_size"]
        self.loader = build_pretrain_loader(
            {**cfg["data"], "channels_last": tr["channels_last"]},
            rank=info.rank,
            world_size=info.world_size,
            seed=tr["seed"],
            batch_size_per_rank=self.batch_per_rank,
            device=info.device,
        )
        self.state.steps_per_epoch = len(self.loader)
        if self.state.steps_per_epoch == 0:
            raise DataError(
                f"the dataset gives no full batch of {self.batch_per_rank} images per process "
                f"(config keys data.*, train.batch_size)"
            )
        total = tr["epochs"] * self.state.steps_per_epoch
        if tr["max_steps"] > 0:
            total = min(total, tr["max_steps"])
        self.state.total_steps = total
        self.warmup_steps = int(round(cfg["optim"]["warmup_epochs"] * self.state.steps_per_epoch))
        self.peak_lr = scaled_lr(
            cfg["optim"]["base_lr"], tr["batch_size"], cfg["optim"]["reference_batch"]
        )

    def _build_model(self) -> nn.Module:
        """The model on its device (SyncBN, channels-last), its DDP wrapper and the compiled
        forward; returns the unwrapped model."""
        info, tr = self.info, self.cfg["train"]
        model = build_model(self.cfg["model"])
        if info.distributed and tr["sync_bn"]:
            if info.device.type == "cuda":
                model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            else:  # torch's SyncBatchNorm has no CPU kernel: per-process BN statistics
                self.log.warning("train.sync_bn: SyncBatchNorm needs CUDA; using BatchNorm on CPU")
        model = model.to(info.device)
        if tr["channels_last"]:
            model = model.to(memory_format=torch.channels_last)
        self.model = model  # unwrapped: checkpoints, export and the probe read it
        self.ddp = (
            nn.parallel.DistributedDataParallel(
                model, device_ids=[info.device.index] if info.device.type == "cuda" else None
            )
            if info.distributed
            else model
        )
        self.forward = torch.compile(self.ddp) if tr["compile"] else self.ddp
        return model

    def build_hooks(self) -> list[HookBase]:
        """The built-in hooks in their order: metrics, the online probe (when
        ``eval.every_steps`` > 0), checkpoints. Override to change them; the constructor's
        ``hooks`` run after these."""
        hooks: list[HookBase] = [self.metrics_hook]
        if self.probe_hook is not None:
            hooks.append(self.probe_hook)
        ck = self.cfg["checkpoint"]
        return hooks + [CheckpointHook(self.checkpointer, ck["every_steps"], ck["every_epochs"])]

    # ------------------------------------------------------------------ step
    def run_step(self, batch: Any, stop: StopRequest) -> bool:
        """One optimisation step; returns False when every rank agreed to skip the batch.

        A batch with fewer than 2 readable images on any rank (BatchNorm needs 2) is skipped by
        all ranks together, so their collectives stay matched.

        Raises:
            NonFiniteLossError: the loss is NaN/inf on any rank (nothing is written).
        """
        info, tr = self.info, self.cfg["train"]
        local = int(batch["size"])
        # the step's one size exchange (and host sync) before the forward: the loss's gathers
        # reuse these sizes, and every rank sees whether one of them must skip the batch
        sizes = dist.gather_batch_sizes(local, info.device)
        if min(sizes) < 2:
            self.log.warning(
                "step %d: a process has fewer than 2 readable images in its batch (%s here, "
                "the rest unreadable: see the skipped-image warnings); all processes skip it",
                self.state.step,
                local,
            )
            return False
        x1, x2 = self.loader.prepare(batch, info.device)
        with autocast(info.device, tr["precision"]):
            z1 = self.forward(x1)
            z2 = self.forward(x2)
        with dist.known_batch_sizes(sizes):
            losses = self.criterion(z1.float(), z2.float())
        loss = losses["loss"]
        # one collective per step: [ranks with a non-finite loss, ranks signalled]
        flags = torch.stack(
            [
                (~torch.isfinite(loss.detach())).float(),
                torch.tensor(float(stop.signum is not None), device=loss.device),
            ]
        )
        bad, stop_now = dist.all_reduce_sum(flags).tolist()
        if bad > 0:
            parts = {k: float(v.detach()) for k, v in losses.items()}
            raise NonFiniteLossError(
                f"non-finite loss at epoch {self.state.epoch}, step {self.state.step} ({parts}); "
                f"training stopped and the last good checkpoint in {self.out} is left intact. "
                f"Try a lower optim.base_lr or train.precision=bf16/fp32."
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.state.losses = {k: v.detach() for k, v in losses.items()}
        self.state.views = (z1.detach(), z2.detach())
        if stop_now > 0:
            self.state.stop_requested, self.state.stop_signal = True, stop.signum
        return True

    # ------------------------------------------------------------------ loop
    def set_lr(self) -> None:
        """The schedule's learning rate of the step about to run (warm-up + cosine per step)."""
        self.state.lr = lr_at(
            self.state.step,
            self.state.total_steps,
            self.warmup_steps,
            self.peak_lr,
            self.cfg["optim"]["final_lr_ratio"],
        )
        set_lr(self.optimizer, self.state.lr)

    def fit(self) -> dict:
        """Train until the schedule's last step; returns a summary dict, and releases the run
        folder.

        The summary has keys "status" ("finished" or "preempted"), "step", "epoch",
        "backbone" (path of the exported backbone when finished), "last_metrics".
        """
        try:
            return self._fit()
        finally:
            self.close()

    def _fit(self) -> dict:
        self.state.epoch, self.state.step_in_epoch, self.state.step = self.checkpointer.resume()
        if self.info.is_main:  # after the resume check: a refused resume leaves it untouched
            save_config(self.cfg, self.out / "config.yaml")
        if self.state.step_in_epoch >= self.state.steps_per_epoch:
            self.state.epoch, self.state.step_in_epoch = self.state.epoch + 1, 0
        stop = StopRequest()
        stop.install()
        self.log.info(
            "training %d steps (%d per epoch, %d per process per step, peak lr %.4g, "
            "warm-up %d steps) from step %d",
            self.state.total_steps,
            self.state.steps_per_epoch,
            self.batch_per_rank,
            self.peak_lr,
            self.warmup_steps,
            self.state.step,
        )
        self.ddp.train()
        bar = progress(
            range(self.state.step, self.state.total_steps),
            total=self.state.total_steps,
            desc="pretrain",
            rank=self.info.rank,
            initial=self.state.step,
        )
        bar_iter = iter(bar)
        self.state.started, self.state.paused_seconds = time.perf_counter(), 0.0
        try:
            for h in self.hooks:
                h.before_train()
            self._loop(stop, bar_iter)
            if self.state.status == "running":
                self.state.status = "finished"
            for h in self.hooks:
                h.after_train()
        finally:
            stop.restore()
            self.writer.close()
            if hasattr(bar, "close"):
                bar.close()
        backbone = next(
            (h.backbone_path for h in self.hooks if isinstance(h, CheckpointHook)), None
        )
        return {
            "status": self.state.status,
            "step": self.state.step,
            "epoch": self.state.epoch,
            "backbone": str(backbone) if backbone else None,
            "last_metrics": {
                k: v
                for k, v in self.metrics_hook.last.items()
                if not isinstance(v, float) or math.isfinite(v)
            },
        }

    def _loop(self, stop: StopRequest, bar_iter) -> None:
        while self.state.step < self.state.total_steps:
            self.loader.set_epoch(self.state.epoch, self.state.step_in_epoch)
            stepped = False
            for batch in self.loader:
                self.set_lr()
                done = self.run_step(batch, stop)
                self.state.step_in_epoch += 1
                if not done:
                    continue
                stepped = True
                self.state.step += 1
                next(bar_iter, None)
                for h in self.hooks:
                    h.after_step()
                if self.state.stop_requested or self.state.step >= self.state.total_steps:
                    break
            if self.state.stop_requested:
                self.state.status = "preempted"
                return
            if self.state.step_in_epoch < self.state.steps_per_epoch:
                return  # the last step fell inside this epoch
            if not stepped:
                raise DataError(
                    f"epoch {self.state.epoch} gave no batch with 2 readable images per process: "
                    f"check data.root (see the skipped-image warnings in {self.out / 'log.txt'})"
                )
            self.state.epoch, self.state.step_in_epoch = self.state.epoch + 1, 0
            for h in self.hooks:
                h.after_epoch()


def train(cfg: Mapping, hooks: Sequence[HookBase] = ()) -> dict:
    """Run pretraining for a resolved config; see :meth:`Trainer.fit` for the summary."""
    try:
        return Trainer(cfg, hooks).fit()
    finally:
        dist.cleanup()

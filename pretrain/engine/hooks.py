"""Training hooks: what happens around the optimisation step (metrics, probe, checkpoints).

The loop in :mod:`pretrain.engine.trainer` only runs steps; everything else is a hook (Detectron2's
HookBase idea). What a hook sees of the loop is one :class:`LoopState`, ``hook.state``: the step
counters, the schedule's lengths, the last step's learning rate, loss terms and embeddings, the
stop signal and the run's status; the loop alone writes it (a hook may add to
``paused_seconds`` the time it spent outside training). Everything else a built-in hook needs
(the metric writer, the checkpointer, the backbone to probe) it is given when it is built. A hook
that must act on the training itself (tests poison a weight) may also use ``hook.trainer``, a
weak proxy of the trainer that runs it (a hook never keeps it alive).

Hooks run in list order: metrics, then the probe, then checkpoints (so a checkpoint written at a
step already holds that step's metrics in metrics.jsonl).
"""

from __future__ import annotations

import dataclasses
import time
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from pretrain import dist
from pretrain.log import AverageMeter, MetricWriter, get_logger

if TYPE_CHECKING:  # the trainer imports this module
    from pretrain.engine.trainer import Trainer

__all__ = ["LoopState", "HookBase", "attach_hooks", "MetricsHook", "ProbeHook", "CheckpointHook"]

STATUSES = ("running", "finished", "preempted")


@dataclasses.dataclass
class LoopState:
    """A training loop as its hooks see it: pretraining's, and the supervised-head trainer's
    (:mod:`transfer.eval.supervised`: ``views`` stays None, ``total_steps`` is ``train.epochs``
    x steps_per_epoch, ``losses`` holds "loss", the global batch's mean cross-entropy).

    Attributes:
        steps_per_epoch: full batches of an epoch (per process, the same on every rank).
        total_steps: optimisation steps of the schedule (``train.epochs`` x steps_per_epoch, or
            ``train.max_steps`` when smaller).
        images_per_step: the global batch (``train.batch_size``).
        epoch: the current epoch (0-based; after an epoch's last batch already the next one).
        step: optimisation steps done (skipped batches do not count).
        step_in_epoch: batches of the current epoch consumed (skipped ones included).
        lr: the learning rate of the last step.
        losses: the last step's loss terms (detached scalar tensors; "loss" is the one optimised).
        views: the last step's two N x D projector outputs (detached), or None before a step.
        stop_requested: every rank agreed to stop after this step (a process got SIGTERM /
            SIGUSR1).
        stop_signal: the signal this process got, or None (another process got it).
        status: "running", then "finished" (the schedule's last step is done) or "preempted".
        started: ``time.perf_counter()`` when this process's training (re)started.
        paused_seconds: time since then spent outside training (the online probe, the validation
            passes).
    """

    steps_per_epoch: int = 0
    total_steps: int = 0
    images_per_step: int = 0
    epoch: int = 0
    step: int = 0
    step_in_epoch: int = 0
    lr: float = 0.0
    losses: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    views: tuple[torch.Tensor, torch.Tensor] | None = None
    stop_requested: bool = False
    stop_signal: int | None = None
    status: str = "running"
    started: float = dataclasses.field(default_factory=time.perf_counter)
    paused_seconds: float = 0.0

    def train_seconds(self) -> float:
        """Wall time of this process's training so far, probes excluded (resets on resume)."""
        return time.perf_counter() - self.started - self.paused_seconds

    @property
    def fractional_epoch(self) -> float:
        """``epoch`` plus the part of it done (the x axis of the metrics by epoch)."""
        return self.epoch + self.step_in_epoch / max(self.steps_per_epoch, 1)


class HookBase:
    """Base class: override any of the four callbacks; read the loop from ``self.state``."""

    state: LoopState
    trainer: "Trainer"

    def before_train(self) -> None:
        """After the model is built and resumed, before the first step."""

    def after_step(self) -> None:
        """After each optimisation step (``state.step`` already counts it)."""

    def after_epoch(self) -> None:
        """After an epoch's last batch (``state.epoch`` is already the next epoch)."""

    def after_train(self) -> None:
        """After the loop ends (``state.status`` "finished" or "preempted"), before the summary."""


def attach_hooks(hooks, state: LoopState, trainer: Any) -> list[HookBase]:
    """The hooks as a list, each given the loop's ``state`` and a weak proxy of ``trainer`` (a
    hook never keeps its trainer alive). Used by the pretraining loop and the supervised-head
    trainer (:mod:`transfer.eval.supervised`)."""
    hooks = list(hooks)
    for h in hooks:
        h.state, h.trainer = state, weakref.proxy(trainer)
    return hooks


class MetricsHook(HookBase):
    """Average the loss terms over ``log.every_steps`` steps; write metrics.jsonl / TensorBoard
    and one console line, with the method's monitors of the last batch when it has any.

    Args:
        writer: where the metrics go.
        every: steps between two rows (and the schedule's last step).
        monitors: ``(z1, z2, step) -> {name: float}`` for the last step's views, or None.
        skipped_images: returns (and resets) the count of unreadable images replaced since the
            last call.
        scaler: the GradScaler (its scale is logged when it is enabled).
    """

    def __init__(
        self,
        writer: MetricWriter,
        every: int,
        *,
        monitors: Callable[..., dict] | None = None,
        skipped_images: Callable[[], int] = lambda: 0,
        scaler: torch.amp.GradScaler | None = None,
    ) -> None:
        self.writer, self.every = writer, max(1, int(every))
        self.monitors, self.skipped_images, self.scaler = monitors, skipped_images, scaler
        self.meters: dict[str, AverageMeter] = {}
        self.last: dict[str, Any] = {}
        self._t, self._images = time.perf_counter(), 0

    def before_train(self) -> None:
        self._t, self._images = time.perf_counter(), 0

    def after_step(self) -> None:
        s = self.state
        for k, v in s.losses.items():
            self.meters.setdefault(k, AverageMeter()).update(float(v.detach()))
        self._images += s.images_per_step
        if s.step % self.every and s.step != s.total_steps:
            return
        now = time.perf_counter()
        last: dict[str, Any] = {k: m.avg for k, m in self.meters.items()}
        last.update(
            lr=s.lr,
            epoch=s.fractional_epoch,
            images_per_s=self._images / max(now - self._t, 1e-9),
            skipped_images=self.skipped_images(),
            train_seconds=s.train_seconds(),
        )
        if self.scaler is not None and self.scaler.is_enabled():
            last["loss_scale"] = self.scaler.get_scale()
        if self.monitors is not None and s.views is not None:
            last.update(self.monitors(*s.views, s.step))
        self.writer.write(s.step, last)
        terms = " ".join(f"{k[5:]} {v:.4f}" for k, v in last.items() if k.startswith("loss_"))
        get_logger().info(
            "ep %d step %d/%d loss %.4f (%s) lr %.4g %.1f img/s",
            s.epoch,
            s.step,
            s.total_steps,
            last["loss"],
            terms,
            s.lr,
            last["images_per_s"],
        )
        self.last = last
        self.meters = {}
        self._t, self._images = now, 0


class ProbeHook(HookBase):
    """Online kNN probe every ``eval.every_steps`` steps, at step 0 of a fresh run and at the
    end; every rank runs it on its shard of the bank (:class:`pretrain.probe.online.KNNProbe`),
    the main process writes and logs the result. Its time is added to ``state.paused_seconds``.

    Args:
        probe: ``probe(backbone) -> {"knn/top1_k..": %, "knn/seconds": s, ...}``.
        writer: where the results go.
        every: steps between two probes.
        backbone: the module probed (the unwrapped model's backbone).
    """

    def __init__(self, probe, writer: MetricWriter, every: int, backbone: torch.nn.Module) -> None:
        self.probe, self.writer, self.every = probe, writer, int(every)
        self.backbone = backbone
        self.last: dict[str, float] = {}

    def _run(self) -> None:
        s = self.state
        res = self.probe(self.backbone)
        s.paused_seconds += res["knn/seconds"]
        res["train_seconds"] = s.train_seconds()
        self.writer.write(s.step, res)
        accs = " ".join(f"{k[4:]} {v:.2f}%" for k, v in res.items() if k.startswith("knn/top"))
        get_logger().info("step %d kNN probe: %s (%.1f s)", s.step, accs, res["knn/seconds"])
        self.last = res
        dist.barrier()

    def before_train(self) -> None:
        if self.state.step == 0:
            self._run()  # the starting point of the learning curve

    def after_step(self) -> None:
        s = self.state
        if s.step % self.every == 0 or s.step == s.total_steps:
            self._run()


class CheckpointHook(HookBase):
    """Periodic saves (``every_steps`` mid-epoch, ``every_epochs`` at epoch ends), a save when
    the run stops on a signal, and at the end the last state and the final backbone export.

    Args:
        checkpointer: :class:`pretrain.engine.checkpointer.Checkpointer`.
        every_steps, every_epochs: ``checkpoint.every_steps`` / ``checkpoint.every_epochs``
            (0: never on that count).

    Attributes:
        backbone_path: the exported backbone once the run finished, else None.
    """

    def __init__(self, checkpointer, every_steps: int, every_epochs: int) -> None:
        self.ckpt, self.every_steps, self.every_epochs = checkpointer, every_steps, every_epochs
        self.backbone_path: Path | None = None

    def after_step(self) -> None:
        s, every = self.state, self.every_steps
        if s.stop_requested:
            self.ckpt.save(s.epoch, s.step_in_epoch, s.step)
            get_logger().warning(
                "signal %s received: checkpoint written at step %d; exiting cleanly",
                s.stop_signal,
                s.step,
            )
        elif every > 0 and s.step % every == 0 and s.step_in_epoch < s.steps_per_epoch:
            self.ckpt.save(s.epoch, s.step_in_epoch, s.step)

    def after_epoch(self) -> None:
        s, every = self.state, self.every_epochs
        if (every > 0 and s.epoch % every == 0) or s.step >= s.total_steps:
            self.ckpt.save(s.epoch, 0, s.step)

    def after_train(self) -> None:
        s = self.state
        if s.status == "finished":
            # the last step may end mid-epoch (max_steps): keep its exact position
            self.ckpt.save(s.epoch, s.step_in_epoch, s.step)
            self.backbone_path = self.ckpt.export_final(s.epoch)

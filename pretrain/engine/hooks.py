"""Training hooks: what happens around the optimisation step (metrics, probe, checkpoints).

The loop in :mod:`pretrain.engine.trainer` only runs steps; everything else is a hook (Detectron2's
HookBase idea). A hook sees the trainer (a weak proxy: a hook never keeps it alive) and may
read ``trainer.step`` (steps done), ``trainer.epoch``, ``trainer.step_in_epoch`` (batches of the
current epoch consumed), ``trainer.losses`` (the last step's loss terms), ``trainer.lr`` and
``trainer.views`` (the last step's embeddings), and may set ``trainer.status``.

Hooks run in list order: metrics, then the probe, then checkpoints (so a checkpoint written at a
step already holds that step's metrics in metrics.jsonl).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from pretrain import dist
from pretrain.log import AverageMeter, MetricWriter

if TYPE_CHECKING:  # the trainer imports this module
    from pretrain.engine.trainer import Trainer

__all__ = ["HookBase", "MetricsHook", "ProbeHook", "CheckpointHook"]


class HookBase:
    """Base class: override any of the four callbacks."""

    trainer: "Trainer"

    def before_train(self) -> None:
        """After the model is built and resumed, before the first step."""

    def after_step(self) -> None:
        """After each optimisation step (``trainer.step`` already counts it)."""

    def after_epoch(self) -> None:
        """After an epoch's last batch (``trainer.epoch`` is already the next epoch)."""

    def after_train(self) -> None:
        """After the loop ends (finished, preempted or stopped by max_steps), before export."""


class MetricsHook(HookBase):
    """Average the loss terms over ``log.every_steps`` steps; write metrics.jsonl / TensorBoard
    and one console line. IMSVD runs also log the code monitors of the last batch."""

    def __init__(self, writer: MetricWriter, every: int) -> None:
        self.writer, self.every = writer, max(1, int(every))
        self.meters: dict[str, AverageMeter] = {}
        self.last: dict[str, Any] = {}
        self._t, self._images = time.perf_counter(), 0

    def before_train(self) -> None:
        self._t, self._images = time.perf_counter(), 0

    def after_step(self) -> None:
        tr = self.trainer
        for k, v in tr.losses.items():
            self.meters.setdefault(k, AverageMeter()).update(float(v.detach()))
        self._images += tr.images_per_step
        if tr.step % self.every and tr.step != tr.total_steps:
            return
        now = time.perf_counter()
        last: dict[str, Any] = {k: m.avg for k, m in self.meters.items()}
        last.update(
            lr=tr.lr,
            epoch=tr.epoch + tr.step_in_epoch / tr.steps_per_epoch,
            images_per_s=self._images / max(now - self._t, 1e-9),
            skipped_images=tr.loader.pop_skipped(),
            train_seconds=tr.train_seconds(),
        )
        if tr.scaler.is_enabled():
            last["loss_scale"] = tr.scaler.get_scale()
        if tr.method.monitors is not None and tr.views is not None:
            last.update(tr.method.monitors(*tr.views, tr.cfg, tr.step))
        self.writer.write(tr.step, last)
        terms = " ".join(f"{k[5:]} {v:.4f}" for k, v in last.items() if k.startswith("loss_"))
        tr.log.info(
            "ep %d step %d/%d loss %.4f (%s) lr %.4g %.1f img/s",
            tr.epoch,
            tr.step,
            tr.total_steps,
            last["loss"],
            terms,
            tr.lr,
            last["images_per_s"],
        )
        self.last = last
        self.meters = {}
        self._t, self._images = now, 0


class ProbeHook(HookBase):
    """Online kNN probe every ``eval.every_steps`` steps, at step 0 of a fresh run and at the
    end; every rank runs it on its shard of the bank (:class:`pretrain.probe.online.KNNProbe`), the
    main process writes and logs the result."""

    def __init__(self, probe, writer: MetricWriter, every: int) -> None:
        self.probe, self.writer, self.every = probe, writer, int(every)
        self.seconds = 0.0
        self.last: dict[str, float] = {}

    def _run(self) -> None:
        tr = self.trainer
        if self.probe is not None:
            res = self.probe(tr.model.backbone)
            self.seconds += res["knn/seconds"]
            res["train_seconds"] = tr.train_seconds()
            self.writer.write(tr.step, res)
            accs = " ".join(f"{k[4:]} {v:.2f}%" for k, v in res.items() if k.startswith("knn/top"))
            tr.log.info("step %d kNN probe: %s (%.1f s)", tr.step, accs, res["knn/seconds"])
            self.last = res
        dist.barrier()

    def before_train(self) -> None:
        if self.trainer.step == 0:
            self._run()  # the starting point of the learning curve

    def after_step(self) -> None:
        tr = self.trainer
        if tr.step % self.every == 0 or tr.step == tr.total_steps:
            self._run()


class CheckpointHook(HookBase):
    """Periodic saves (``checkpoint.every_steps`` mid-epoch, ``every_epochs`` at epoch ends), a
    save when the run stops early (preemption, max_steps) and the final backbone export."""

    def __init__(self, checkpointer) -> None:
        self.ckpt = checkpointer

    def after_step(self) -> None:
        tr = self.trainer
        every = tr.cfg["checkpoint"]["every_steps"]
        if tr.stop_requested:
            self.ckpt.save(tr.epoch, tr.step_in_epoch, tr.step)
            tr.status = "preempted"
            tr.log.warning(
                "signal %s received: checkpoint written at step %d; exiting cleanly",
                tr.stop_signal,
                tr.step,
            )
        elif every > 0 and tr.step % every == 0 and tr.step_in_epoch < tr.steps_per_epoch:
            self.ckpt.save(tr.epoch, tr.step_in_epoch, tr.step)

    def after_epoch(self) -> None:
        tr = self.trainer
        every = tr.cfg["checkpoint"]["every_epochs"]
        if (every > 0 and tr.epoch % every == 0) or tr.step >= tr.total_steps:
            self.ckpt.save(tr.epoch, 0, tr.step)

    def after_train(self) -> None:
        tr = self.trainer
        if tr.status == "finished":
            # the last step may end mid-epoch (max_steps): keep its exact position
            self.ckpt.save(tr.epoch, tr.step_in_epoch, tr.step)
            tr.backbone_path = self.ckpt.export_final(tr.epoch)

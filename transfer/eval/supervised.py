"""One trainer for every supervised head on a pretrained backbone: the linear probe (frozen
backbone, :mod:`transfer.eval.linear`) and fine-tuning (:mod:`transfer.eval.finetune`).

SGD with momentum, a parameter group for the head (``train.lr`` / ``train.weight_decay``) and,
fine-tuning, one for the backbone (``backbone.lr`` / ``backbone.weight_decay``), both on the
per-epoch schedule; cross-entropy averaged over the GLOBAL batch (the reference IMSVD
``linear_eval.py --weights freeze|finetune``, VICReg's and Barlow Twins' ``evaluate.py``; the
protocol in docs/PROTOCOLS.md). Frozen: the backbone in eval mode without gradients, cached
validation features, its content hash checked after training. Finetune: the backbone in train
mode, global-batch BatchNorm with several processes (:mod:`pretrain.models.syncbn`), the fine-tuned
backbone exported to OUTPUT_DIR/backbone_finetuned.pth. Any process count trains like one
(global batches, seeded per-sample augmentation, global BatchNorm); ``train.precision``
fp32 | bf16 | fp16; checkpoints (:mod:`transfer.eval.head_state`) at epoch ends, every
``train.checkpoint_every_steps`` steps and on SIGTERM / SIGUSR1, resumed at the exact step.
Results: top-1 / top-5 (percent) of the last epoch (``reported: last``), ``best`` and
``evaluated`` epochs.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pretrain.checkpoint import tensor_sha256
from pretrain.config import ConfigError
from pretrain.dist import all_reduce_sum
from pretrain.engine.hooks import LoopState, attach_hooks
from pretrain.engine.runtime import StopRequest, autocast, grad_scaler
from pretrain.errors import IMSVDError
from pretrain.log import MetricWriter
from pretrain.progress import progress
from transfer.eval import features, head_state
from transfer.eval.classifier import (
    backbone_features,
    build_datasets,
    build_model,
    build_train_loader,
    format_epoch,
    head_accuracy,
    head_classes,
    lr_factor,
    sgd_groups,
)
from transfer.eval.subsets import apply_subset

logger = logging.getLogger("imsvd.supervised")

MODES = ("frozen", "finetune")
FINETUNED_BACKBONE = "backbone_finetuned.pth"


class SupervisedError(IMSVDError, ValueError):
    """The supervised training cannot go on (NaN/inf, frozen weights changed)."""


class SupervisedTrainer:
    """Trains a head (frozen backbone) or head and backbone (finetune) in a set-up context.

    Args:
        ctx: :class:`transfer.eval.runner.EvalContext` (config, process group, output folder).
        mode: "frozen" or "finetune".
        checkpoint_name: file name of the checkpoint inside the output folder.
        hooks: :class:`pretrain.engine.hooks.HookBase` objects, called as in pretraining: after
            the resume, after each step and each epoch (and their checkpoints), at the end;
            ``hook.state`` is a :class:`pretrain.engine.hooks.LoopState`.
    Raises:
        ConfigError: train.batch_size not divisible by the process count, or head.num_classes
            below the data's class count.
    """

    def __init__(self, ctx, mode: str, checkpoint_name: str, hooks=()) -> None:
        if mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got {mode!r}")
        cfg, info = ctx.cfg, ctx.info
        self.ctx, self.cfg, self.info, self.mode = ctx, cfg, info, mode
        self.t = cfg["train"]
        if int(self.t["batch_size"]) % info.world_size:
            raise ConfigError(
                f"train.batch_size={self.t['batch_size']} is not divisible by "
                f"{info.world_size} processes"
            )
        self.backbone, _, self.meta = ctx.load_model()
        self.hash_before = tensor_sha256(self.backbone.state_dict())
        self.train_ds, self.val_ds = build_datasets(cfg)
        self.num_classes = head_classes(cfg, self.train_ds)
        self.subset = apply_subset(self.train_ds, cfg["data"])
        self.layer = cfg["features"]["layer"]
        self._build_model()
        self._build_loader()
        self.ckpt_path = ctx.out / checkpoint_name
        self.writer = MetricWriter(str(ctx.out), rank=info.rank, tensorboard=False)
        self.identity = head_state.run_identity(mode, self.meta["sha256"], self.train_ds, cfg)
        self.epochs = int(self.t["epochs"])
        self.epoch = self.step = self.step_in_epoch = 0
        self.history: list[dict] = []
        self.sums = {"loss": 0.0, "steps": 0, "dropped": 0}
        self.unreadable = {"train": 0, "val": 0}
        self.val_feats = None
        self.val_seen: int | None = None  # epoch of the last validation pass of this process
        self.stop_requested, self.stop_signal, self.lr = False, None, 0.0
        self.last_loss: float | None = None  # the last step's global mean loss
        self.state = LoopState(  # the loop as the hooks see it
            self.steps_per_epoch, self.epochs * self.steps_per_epoch, int(self.t["batch_size"])
        )
        self.hooks = attach_hooks(hooks, self.state, self)

    def _build_model(self) -> None:
        info, finetune = self.info, self.mode == "finetune"
        self.model, self.forward = build_model(
            self.backbone, self.num_classes, self.cfg, info, finetune
        )
        self.backbone, self.head = self.model.backbone, self.model.head
        groups = sgd_groups(self.model, self.cfg, finetune)
        self.base_lrs = [g["lr"] for g in groups]
        self.optimizer = torch.optim.SGD(
            groups,
            lr=float(self.t["lr"]),
            momentum=float(self.t["momentum"]),
            nesterov=bool(self.t["nesterov"]),
        )
        self.scaler = grad_scaler(info.device, self.t["precision"])
        # channels_last images: the convolutions run in that format (the weights stay as they are)
        channels_last = bool(self.t["channels_last"])
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def _build_loader(self) -> None:
        self.sampler, self.loader = build_train_loader(self.train_ds, self.cfg, self.info)
        self.steps_per_epoch = self.sampler.steps_per_epoch
        d = self.cfg["data"]
        crop = d["train_crop"] if d["train_aug"] == "random_resized_crop" else d["crop"]
        self.empty_images = torch.zeros((0, 3, int(crop), int(crop)))

    def resume(self) -> None:
        """Continue from the output folder's checkpoint when it belongs to this run.

        Raises:
            HeadStateError: the checkpoint differs (the message lists what) or is unreadable.
        """
        state = head_state.load_state(self.ckpt_path) if self.t["resume"] else None
        if state is None:
            return
        diffs = head_state.resume_mismatch(state, self.identity)
        if diffs:
            raise head_state.HeadStateError(
                f"{self.ckpt_path} does not belong to this run, so it cannot be resumed; it "
                f"differs in: {'; '.join(diffs)}. Use another --output-dir, or "
                "train.resume=false to train a new head there"
            )
        self.head.load_state_dict(state["head"])
        if state["backbone"] is not None:
            self.backbone.load_state_dict(state["backbone"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state["scaler"] and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step_in_epoch = int(state["epoch"]), int(state["step_in_epoch"])
        step = state["step"]
        self.step = int(step) if step is not None else self.epoch * self.steps_per_epoch
        self.history = list(state["history"])
        self.sums = dict(state["epoch_sums"] or self.sums)
        if not self.info.is_main:  # the saved count is the sum over processes: rank 0 holds it
            self.sums["dropped"] = 0
        logger.info("resumed from %s at epoch %d, step %d", self.ckpt_path, self.epoch, self.step)

    def save(self) -> None:
        """Write the checkpoint (rank 0) at the current position; every rank calls this.

        Raises:
            HeadStateError: on every rank when rank 0 could not write it.
        """
        finetune, dev = self.mode == "finetune", self.info.device
        dropped = int(all_reduce_sum(torch.tensor([self.sums["dropped"]], device=dev)))
        state = {
            **self.identity,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "step": self.step,
            "head": self.head.state_dict(),
            "backbone": self.backbone.state_dict() if finetune else None,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "epoch_sums": {**self.sums, "dropped": dropped},
            "history": self.history,
            "subset": self.subset,
        }
        head_state.on_main_process(
            lambda: head_state.save_state(self.ckpt_path, state), self.info, str(self.ckpt_path)
        )

    def _set_lr(self) -> float:
        factor = lr_factor(self.epoch, self.t)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor
        self.lr = self.base_lrs[0] * factor
        return self.lr

    def run_step(self, images, labels, stop: StopRequest) -> bool:
        """One optimizer step on this process's share of a global batch.

        Returns:
            False when the global batch has too few readable images (every rank skips it).
        Raises:
            SupervisedError: a NaN / inf feature or loss on any rank (nothing is saved).
        """
        dev, finetune = self.info.device, self.mode == "finetune"
        images = self.empty_images if images is None else images
        labels = torch.as_tensor(labels if len(images) else [], dtype=torch.long).to(dev)
        x = images.to(dev, non_blocking=True).contiguous(memory_format=self.memory_format)
        # one collective before the forward: the global batch size and preemption signals
        signum = stop.signum  # read once: the flag sent and the signal kept agree
        flags = all_reduce_sum(torch.tensor([float(len(x)), float(signum is not None)], device=dev))
        n, self.stop_requested, self.stop_signal = int(flags[0]), bool(flags[1] > 0), signum
        needs_two = finetune or bool(self.cfg["head"]["batchnorm"])
        if n < (2 if needs_two else 1):
            return False
        with autocast(dev, self.t["precision"]):
            if finetune:
                logits = self.forward(x)
                bad_feats = torch.zeros((), device=dev)
            else:
                with torch.no_grad():
                    feats = features.forward_features(self.backbone, x, self.layer).float()
                bad_feats = (~torch.isfinite(feats)).any().float()
                logits = self.forward(feats)
        ce_sum = F.cross_entropy(logits.float(), labels, reduction="sum")
        # the global sum of the loss and the NaN flags in one collective (before the backward)
        total = all_reduce_sum(
            torch.stack([ce_sum.detach(), bad_feats, (~torch.isfinite(ce_sum.detach())).float()])
        )
        if float(total[1]) > 0 or float(total[2]) > 0:
            what = "training features" if float(total[1]) > 0 else "loss"
            raise SupervisedError(
                f"epoch {self.epoch}, step {self.step}: the {what} of weights "
                f"{self.cfg['model']['weights']} hold NaN/inf; training stopped (the last "
                f"checkpoint {self.ckpt_path} is left as it was). Try a lower learning rate or "
                "train.precision=fp32"
            )
        # the mean over the GLOBAL batch once DDP averages the gradients over the processes
        loss = ce_sum * self.info.world_size / n
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.last_loss = float(total[0]) / n
        return True

    def evaluate(self) -> dict:
        """Top-1 / top-5 (percent) of the current head (and backbone) on the validation set.

        Each rank scores its own rows of the validation features (``gather="shard"``: none are
        gathered) and one all-reduce sums the hits; every rank returns the same figures.
        """
        if self.mode == "frozen":
            if self.val_feats is None:
                self.val_feats = self.ctx.features(
                    "val", self.backbone, self.val_ds, self.meta["sha256"], gather="shard"
                )
            feats, labels = self.val_feats
        else:
            feats, labels = backbone_features(
                self.backbone, self.val_ds, self.cfg, self.info.device
            )
        accuracy, rows = head_accuracy(self.head, feats, labels, self.info.device)
        self.unreadable["val"] = len(self.val_ds) - rows
        self.val_seen = self.epoch
        return accuracy

    def _epoch(self, stop: StopRequest) -> bool:
        """The rest of the current epoch; False when stopped by a signal (state saved)."""
        every, log_every = int(self.t["checkpoint_every_steps"]), int(self.t["log_every"])
        lr = self._set_lr()
        self.sampler.set_epoch(self.epoch, self.step_in_epoch)
        desc = f"epoch {self.epoch}"
        for images, labels, n_bad in progress(
            self.loader, total=len(self.loader), desc=desc, rank=self.info.rank
        ):
            self.sums["dropped"] += n_bad
            stepped = self.run_step(images, labels, stop)
            self.step_in_epoch += 1
            if stepped:
                self.step += 1
                self.sums["loss"] += self.last_loss
                self.sums["steps"] += 1
                if self.step % log_every == 0:
                    self.writer.write(
                        self.step, {"loss": self.last_loss, "lr": lr, "epoch": self.epoch}
                    )
            mid_epoch = self.step_in_epoch < self.steps_per_epoch
            if self.stop_requested or (stepped and every and self.step % every == 0 and mid_epoch):
                self.save()  # before the hooks, as pretraining's CheckpointHook runs first
            if stepped:
                self._run_hooks("after_step")
            if self.stop_requested:
                return False
        return True

    def _end_epoch(self) -> None:
        lr = self.base_lrs[0] * lr_factor(self.epoch, self.t)
        dropped = int(all_reduce_sum(torch.tensor([self.sums["dropped"]], device=self.info.device)))
        self.unreadable["train"] = max(self.unreadable["train"], dropped)
        record = {
            "epoch": self.epoch + 1,
            "lr": lr,
            "loss": self.sums["loss"] / max(self.sums["steps"], 1),
        }
        every = int(self.t["eval_every"])
        if (every and (self.epoch + 1) % every == 0) or self.epoch + 1 == self.epochs:
            t0 = time.perf_counter()
            record.update(self.evaluate())
            self.state.paused_seconds += time.perf_counter() - t0  # not training time
        self.history.append(record)
        self.writer.write(self.step, record)
        logger.info("%s", format_epoch(record, self.epochs, dropped))
        self.epoch, self.step_in_epoch = self.epoch + 1, 0
        self.sums = {"loss": 0.0, "steps": 0, "dropped": 0}
        self.save()
        self._run_hooks("after_epoch")

    def _run_hooks(self, event: str, status: str = "running") -> None:
        s = self.state
        s.epoch, s.step, s.step_in_epoch, s.lr = self.epoch, self.step, self.step_in_epoch, self.lr
        s.losses = {} if self.last_loss is None else {"loss": torch.tensor(self.last_loss)}
        s.stop_requested, s.stop_signal, s.status = self.stop_requested, self.stop_signal, status
        for h in self.hooks:
            getattr(h, event)()

    def fit(self) -> dict:
        """Resume if possible, train to train.epochs, and return the results (every rank).

        Raises:
            HeadStateError: a checkpoint of another run. SupervisedError: NaN / inf, or (frozen)
                the backbone's weights changed.
        """
        self.resume()
        self.ctx.write_config()  # the folder's config changes only once the resume is accepted
        if self.mode == "finetune":
            self.model.train()
        self.head.train()
        stop = StopRequest()
        stop.install()
        try:
            self.state.started = time.perf_counter()
            self._run_hooks("before_train")
            while self.epoch < self.epochs:
                if not self._epoch(stop):
                    logger.info("stopped by signal %s at step %d (saved)", stop.signum, self.step)
                    self._run_hooks("after_train", "preempted")
                    return {"status": "preempted", "epoch": self.epoch, "step": self.step}
                self._end_epoch()
            self._run_hooks("after_train", "finished")
        finally:
            stop.restore()
            self.writer.close()
        return self.results()

    def results(self) -> dict:
        """The results of a finished run (see the module docstring for the fields)."""
        last = self.history[-1] if self.history else {}
        if last.get("epoch") != self.epochs or "top1" not in last or self.val_seen is None:
            last = {**last, **self.evaluate()}
        out = {"mode": self.mode, "top1": last["top1"], "top5": last["top5"], "reported": "last"}
        evaluated = [
            {k: r[k] for k in ("epoch", "top1", "top5")} for r in self.history if "top1" in r
        ]
        best = max(evaluated, key=lambda r: (r["top1"], r["epoch"]))
        out.update(
            last={k: last[k] for k in ("epoch", "top1", "top5")},
            best=best,
            evaluated=evaluated,
            epochs=self.epochs,
            num_classes=self.num_classes,
        )
        if self.mode == "frozen":
            if tensor_sha256(self.backbone.state_dict()) != self.hash_before:
                raise SupervisedError("the frozen backbone weights changed during training")
            out["frozen_weights_unchanged"] = True
        else:
            out["finetuned_backbone"] = str(self.export())
        out.update(
            num_train=len(self.train_ds) - self.unreadable["train"],
            num_val=len(self.val_ds) - self.unreadable["val"],
            unreadable_images=dict(self.unreadable),
            subset=self.subset,
            weights=str(self.cfg["model"]["weights"]),
            weights_sha256=self.meta["sha256"],
            history=self.history,
        )
        return out

    def export(self) -> Path:
        """Write the fine-tuned backbone (rank 0) in the toolkit's backbone format."""
        path = self.ctx.out / FINETUNED_BACKBONE
        sd, info = self.backbone.state_dict(), self.info
        head_state.export_finetuned(path, sd, self.meta, self.epochs, self.cfg, info)
        if info.is_main:
            logger.info("fine-tuned backbone written to %s", path)
        return path

"""The IMSVD pretraining loop: DDP, mixed precision, resume, checkpoints, preemption, metrics."""

from __future__ import annotations

import contextlib
import math
import signal
import time
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from pretrain import checkpoint as ckpt
from pretrain import dist
from pretrain.config import save_config
from pretrain.data import build_pretrain_loader
from pretrain.log import AverageMeter, MetricWriter, progress, setup_logging
from pretrain.loss import build_loss
from pretrain.model import build_model
from pretrain.monitors import code_monitors
from pretrain.optim import build_optimizer, lr_at, scaled_lr, set_lr
from pretrain.probe import build_probe

PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
FINAL_BACKBONE = "backbone_final.pth"


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; training stopped without writing a checkpoint."""


class _StopRequest:
    """Remembers SIGTERM / SIGUSR1 (preemption) so the loop can checkpoint and exit cleanly."""

    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for name in self.SIGNALS:
            sig = getattr(signal, name, None)
            if sig is None:
                continue
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. embedded use): no preemption handling
                pass

    def _handle(self, signum, frame) -> None:  # noqa: ARG002 - signal API
        self.signum = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @property
    def local(self) -> bool:
        """True when this process received a signal."""
        return self.signum is not None


def _autocast(device: torch.device, precision: str):
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _check_cfg(cfg: Mapping, world_size: int) -> None:
    if cfg["train"]["precision"] not in PRECISIONS:
        raise ValueError(
            f"config key 'train.precision': '{cfg['train']['precision']}' is not one of "
            f"{', '.join(PRECISIONS)}"
        )
    bs = cfg["train"]["batch_size"]
    if bs <= 0 or bs % world_size != 0:
        raise ValueError(
            f"config key 'train.batch_size': global batch {bs} must be a positive multiple of "
            f"the number of processes ({world_size})"
        )
    d = int(str(cfg["model"]["projector"]).split("-")[-1])
    if d % cfg["loss"]["bin_size"] != 0:
        raise ValueError(
            f"config keys 'model.projector' / 'loss.bin_size': output width {d} is not a multiple "
            f"of bin_size {cfg['loss']['bin_size']}"
        )


class Trainer:
    """Runs IMSVD pretraining as described by a resolved config (see configs/pretrain/base.yaml)."""

    def __init__(self, cfg: Mapping) -> None:
        self.cfg = cfg
        self.info = dist.init_distributed(cfg["train"]["device"])
        self.out = Path(cfg["checkpoint"]["output_dir"])
        self.log = setup_logging(self.out, rank=self.info.rank)
        _check_cfg(cfg, self.info.world_size)
        if self.info.is_main:
            save_config(cfg, self.out / "config.yaml")
        self.log.info(
            "process %d/%d on %s (backend %s); output %s",
            self.info.rank,
            self.info.world_size,
            self.info.device,
            self.info.backend,
            self.out,
        )
        torch.manual_seed(cfg["train"]["seed"] + self.info.rank)
        self._saved_step: int | None = None

    # ----------------------------------------------------------------- setup
    def _build(self) -> None:
        cfg, info = self.cfg, self.info
        tr = cfg["train"]
        self.batch_per_rank = tr["batch_size"] // info.world_size
        self.loader = build_pretrain_loader(
            {**cfg["data"], "channels_last": tr["channels_last"]},
            rank=info.rank,
            world_size=info.world_size,
            seed=tr["seed"],
            batch_size_per_rank=self.batch_per_rank,
            device=info.device,
        )
        self.steps_per_epoch = len(self.loader)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the dataset gives no full batch of {self.batch_per_rank} images per process "
                f"(config keys data.*, train.batch_size)"
            )
        total = tr["epochs"] * self.steps_per_epoch
        if tr["max_steps"] > 0:
            total = min(total, tr["max_steps"])
        self.total_steps = total
        self.warmup_steps = int(round(cfg["optim"]["warmup_epochs"] * self.steps_per_epoch))
        self.peak_lr = scaled_lr(
            cfg["optim"]["base_lr"], tr["batch_size"], cfg["optim"]["reference_batch"]
        )

        model = build_model(cfg["model"])
        if info.distributed and tr["sync_bn"]:
            if info.device.type == "cuda":
                model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            else:  # torch's SyncBatchNorm has no CPU kernel: per-process BN statistics
                self.log.warning("train.sync_bn: SyncBatchNorm needs CUDA; using BatchNorm on CPU")
        model = model.to(info.device)
        if tr["channels_last"]:
            model = model.to(memory_format=torch.channels_last)
        self.model = model  # unwrapped: checkpoints and export read it
        self.ddp = (
            nn.parallel.DistributedDataParallel(
                model, device_ids=[info.device.index] if info.device.type == "cuda" else None
            )
            if info.distributed
            else model
        )
        self.forward = torch.compile(self.ddp) if tr["compile"] else self.ddp
        self.optimizer = build_optimizer(model, cfg["optim"], self.peak_lr)
        self.criterion = build_loss(cfg["loss"])
        # the online kNN probe runs on the main process only (eval-mode BN needs no collective)
        self.probe = None
        if cfg["eval"]["every_steps"] > 0 and info.is_main:
            self.probe = build_probe(cfg["eval"], cfg["data"])
        use_scaler = tr["precision"] == "fp16"
        self.scaler = torch.amp.GradScaler(info.device.type, enabled=use_scaler)

    def _resume(self) -> tuple[int, int, int]:
        """Load the newest checkpoint of the output folder, if any: (epoch, step_in_epoch, step)."""
        if not self.cfg["checkpoint"]["resume"]:
            return 0, 0, 0
        path = ckpt.latest_checkpoint(self.out)
        if path is None:
            return 0, 0, 0
        state = ckpt.load_training_state(path)
        ckpt.restore_training_state(
            state, model=self.model, optimizer=self.optimizer, scaler=self.scaler
        )
        rng = ckpt.rng_state_for_rank(state, self.info.rank, self.info.world_size)
        if rng is not None:
            ckpt.restore_rng_state(rng)
        else:  # per-rank streams were not saved for this world size: fresh, rank-distinct seeds
            torch.manual_seed(self.cfg["train"]["seed"] + self.info.rank + int(state["step"]))
        self.log.info("resumed from %s (epoch %d, step %d)", path, state["epoch"], state["step"])
        return int(state["epoch"]), int(state["step_in_epoch"]), int(state["step"])

    def _save(self, epoch: int, step_in_epoch: int, step: int) -> None:
        if step == self._saved_step:  # already written at this step (e.g. every_steps + end)
            return
        self._saved_step = step
        rng = None  # one process: save_training_state captures this process's streams
        if self.info.distributed:  # every rank's streams, so each resumes its own
            rng = [None] * self.info.world_size
            torch.distributed.all_gather_object(rng, ckpt.capture_rng_state())
        if self.info.is_main:
            path = self.out / ckpt.checkpoint_name(epoch, step)
            ckpt.save_training_state(
                path,
                model=self.model,
                optimizer=self.optimizer,
                scaler=self.scaler if self.scaler.is_enabled() else None,
                epoch=epoch,
                step=step,
                step_in_epoch=step_in_epoch,
                config=dict(self.cfg),
                rng=rng,
            )
            ckpt.prune_checkpoints(self.out, self.cfg["checkpoint"]["keep_last"])
            self.log.info("saved %s", path)
        dist.barrier()

    # ----------------------------------------------------------------- probe
    def _train_seconds(self) -> float:
        """Wall time of this process's training so far, probes excluded (resets on resume)."""
        return time.perf_counter() - self._t_start - self._probe_seconds

    def _probe_due(self, step: int) -> bool:
        every = self.cfg["eval"]["every_steps"]
        return every > 0 and (step % every == 0 or step == self.total_steps)

    def _run_probe(self, step: int, writer: MetricWriter) -> None:
        """Online kNN probe on the main process (logged to metrics.jsonl / TensorBoard)."""
        if self.probe is not None:
            res = self.probe(self.model.backbone)
            self._probe_seconds += res["knn/seconds"]
            res["train_seconds"] = self._train_seconds()
            writer.write(step, res)
            accs = " ".join(f"{k[4:]} {v:.2f}%" for k, v in res.items() if k.startswith("knn/top1"))
            self.log.info("step %d kNN probe: %s (%.1f s)", step, accs, res["knn/seconds"])
        dist.barrier()

    # ------------------------------------------------------------------ loop
    def fit(self) -> dict:
        """Train until the configured epochs / max_steps; returns a summary dict.

        The summary has keys "status" ("finished" or "preempted"), "step", "epoch",
        "backbone" (path of the exported backbone when finished), "last_metrics".
        """
        self._build()
        cfg, info = self.cfg, self.info
        tr, every = cfg["train"], cfg["log"]["every_steps"]
        epoch, start_iter, step = self._resume()
        if start_iter >= self.steps_per_epoch:
            epoch, start_iter = epoch + 1, 0
        writer = MetricWriter(self.out, rank=info.rank, tensorboard=cfg["log"]["tensorboard"])
        stop = _StopRequest()
        stop.install()
        self.log.info(
            "training %d steps (%d per epoch, %d per process per step, peak lr %.4g, "
            "warm-up %d steps) from step %d",
            self.total_steps,
            self.steps_per_epoch,
            self.batch_per_rank,
            self.peak_lr,
            self.warmup_steps,
            step,
        )
        meters: dict[str, AverageMeter] = {}
        last: dict[str, float] = {}
        status = "finished"
        t_log = time.perf_counter()
        imgs_since = 0
        self.ddp.train()
        bar = progress(
            range(step, self.total_steps),
            total=self.total_steps,
            desc="pretrain",
            rank=info.rank,
            initial=step,
        )
        bar_iter = iter(bar)
        self._t_start, self._probe_seconds = time.perf_counter(), 0.0
        if step == 0 and self._probe_due(0):
            self._run_probe(0, writer)  # the starting point of the learning curve
        try:
            while step < self.total_steps and epoch < tr["epochs"]:
                self.loader.set_epoch(epoch, start_iter)
                i = start_iter
                for batch in self.loader:
                    if step >= self.total_steps:
                        break
                    lr = lr_at(
                        step,
                        self.total_steps,
                        self.warmup_steps,
                        self.peak_lr,
                        cfg["optim"]["final_lr_ratio"],
                    )
                    set_lr(self.optimizer, lr)
                    x1, x2 = self.loader.prepare(batch, info.device)
                    with _autocast(info.device, tr["precision"]):
                        z1 = self.forward(x1)
                        z2 = self.forward(x2)
                    losses = self.criterion(z1.float(), z2.float())
                    loss = losses["loss"]
                    # one collective per step: [ranks with a non-finite loss, ranks signalled]
                    flags = torch.stack(
                        [
                            (~torch.isfinite(loss.detach())).float(),
                            torch.tensor(float(stop.local), device=loss.device),
                        ]
                    )
                    bad, stop_now = dist.all_reduce_sum(flags).tolist()
                    if bad > 0:
                        parts = {k: float(v.detach()) for k, v in losses.items()}
                        raise NonFiniteLossError(
                            f"non-finite loss at epoch {epoch}, step {step} ({parts}); training "
                            f"stopped and the last good checkpoint in {self.out} is left intact. "
                            f"Try a lower optim.base_lr or train.precision=bf16/fp32."
                        )
                    self.optimizer.zero_grad(set_to_none=True)
                    self.scaler.scale(loss).backward()
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                    step += 1
                    i += 1
                    imgs_since += x1.shape[0] * info.world_size
                    next(bar_iter, None)
                    for k, v in losses.items():
                        meters.setdefault(k, AverageMeter()).update(float(v.detach()))
                    if step % every == 0 or step == self.total_steps:
                        now = time.perf_counter()
                        last = {k: m.avg for k, m in meters.items()}
                        last.update(
                            lr=lr,
                            epoch=epoch + i / self.steps_per_epoch,
                            images_per_s=imgs_since / max(now - t_log, 1e-9),
                            skipped_images=self.loader.pop_skipped(),
                            train_seconds=self._train_seconds(),
                        )
                        if self.scaler.is_enabled():
                            last["loss_scale"] = self.scaler.get_scale()
                        if tr["monitors"] and cfg["loss"]["name"] == "imsvd":
                            last.update(
                                code_monitors(
                                    z1.detach(),
                                    z2.detach(),
                                    cfg["loss"]["bin_size"],
                                    cfg["loss"]["temperature"],
                                    step=step,
                                )
                            )
                        writer.write(step, last)
                        terms = " ".join(
                            f"{k[5:]} {v:.4f}" for k, v in last.items() if k.startswith("loss_")
                        )
                        self.log.info(
                            "ep %d step %d/%d loss %.4f (%s) lr %.4g %.1f img/s",
                            epoch,
                            step,
                            self.total_steps,
                            last["loss"],
                            terms,
                            lr,
                            last["images_per_s"],
                        )
                        meters = {}
                        t_log, imgs_since = now, 0
                    if self._probe_due(step):
                        self._run_probe(step, writer)
                    every_steps = cfg["checkpoint"]["every_steps"]
                    if stop_now > 0:
                        self._save(epoch, i, step)
                        status = "preempted"
                        self.log.warning(
                            "signal %s received: checkpoint written at step %d; exiting cleanly",
                            stop.signum,
                            step,
                        )
                        break
                    if every_steps > 0 and step % every_steps == 0 and i < self.steps_per_epoch:
                        self._save(epoch, i, step)
                if status == "preempted":
                    break
                if i >= self.steps_per_epoch:
                    epoch, start_iter = epoch + 1, 0
                    if epoch % cfg["checkpoint"]["every_epochs"] == 0 or epoch == tr["epochs"]:
                        self._save(epoch, 0, step)
                else:  # stopped by max_steps inside the epoch
                    self._save(epoch, i, step)
                    break
        finally:
            stop.restore()
            writer.close()
            if hasattr(bar, "close"):
                bar.close()

        backbone_path = None
        if status == "finished":
            backbone_path = self.out / FINAL_BACKBONE
            if info.is_main:
                ckpt.export_backbone(
                    backbone_path,
                    self.model.backbone.state_dict(),
                    arch=cfg["model"]["arch"],
                    stem=cfg["model"]["stem"],
                    epoch=epoch,
                    config=dict(self.cfg),
                )
                self.log.info("exported backbone to %s", backbone_path)
            dist.barrier()
        return {
            "status": status,
            "step": step,
            "epoch": epoch,
            "backbone": str(backbone_path) if backbone_path else None,
            "last_metrics": {
                k: v for k, v in last.items() if not isinstance(v, float) or math.isfinite(v)
            },
        }


def train(cfg: Mapping) -> dict:
    """Run pretraining for a resolved config; see :meth:`Trainer.fit` for the summary."""
    trainer = Trainer(cfg)
    try:
        return trainer.fit()
    finally:
        dist.cleanup()

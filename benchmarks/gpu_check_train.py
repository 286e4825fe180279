"""The ``train`` part of :mod:`gpu_check` (see its docstring): this project's trainer against a
loop with the reference code's structure."""

from __future__ import annotations

import gc
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_check_common, also when imported
from gpu_check_common import (  # noqa: E402  (benchmarks/)
    DTYPES,
    LOSS_RTOL,
    RECIPE,
    ROOT,
    Budget,
    Sizes,
    _error,
    _sync,
    cudnn_flags,
    exact_fp32,
    init_world_of_one,
)

sys.path.insert(0, str(ROOT))
from pretrain.config import find_config, load_config  # noqa: E402
from pretrain.engine.optim import LARS, lr_at, param_groups, set_lr  # noqa: E402
from pretrain.engine.runtime import StopRequest  # noqa: E402
from pretrain.engine.trainer import Trainer  # noqa: E402
from pretrain.log import LOGGER_NAME  # noqa: E402
from pretrain.methods import build_loss  # noqa: E402
from pretrain.models.build import build_model  # noqa: E402
from pretrain.models.syncbn import convert_sync_batchnorm  # noqa: E402


# ------------------------------------------------------------------- part 1: training step
class TwoViewLoss(nn.Module):
    """The reference code's training module: both views through backbone + projector and the
    loss in one forward, so that DDP wraps the loss as well.

    forward(x1, x2): two (N, 3, S, S) batches -> the scalar loss (fp32).
    """

    def __init__(self, net: nn.Module, criterion: nn.Module) -> None:
        super().__init__()
        self.net, self.criterion = net, criterion

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        z1 = self.net(x1)
        z2 = self.net(x2)
        return self.criterion(z1.float(), z2.float())["loss"]


class ReferenceLoop:
    """A training loop with the reference code's structure, on this project's model, loss, LARS.

    SyncBatchNorm (``nn.SyncBatchNorm.convert_sync_batchnorm``; on the CPU, which torch's
    SyncBatchNorm has no kernel for, :class:`pretrain.models.syncbn.GlobalBatchNorm`), DDP around
    :class:`TwoViewLoss` (a process group must exist), LARS over
    :func:`pretrain.engine.optim.param_groups` (1-D parameters: no weight decay, no adaptation),
    the learning rate set every step, then ``zero_grad``, the forward under autocast (fp16 with a
    GradScaler; ``precision="fp32"``: no autocast, scaler disabled) and the scaled backward /
    step / update; ``cudnn.benchmark`` on during its steps.

    Args:
        cfg: a resolved pretraining config (model, loss, optim sections are read).
        state_dict: initial weights of :func:`pretrain.models.build.build_model`'s model.
        device: where it trains.
        precision: "fp16" (the reference's) or "fp32".
        schedule: (total_steps, warmup_steps, peak_lr) of :func:`pretrain.engine.optim.lr_at`.
        cudnn_benchmark: ``torch.backends.cudnn.benchmark`` during its steps (the reference's
            True; the fp32 check turns it off so that both loops take the same algorithms).
    """

    def __init__(self, cfg, state_dict, device, precision, schedule, cudnn_benchmark=True) -> None:
        net = build_model(cfg["model"])
        net.load_state_dict(state_dict)
        if device.type == "cuda":
            net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
            self.norm = "torch.nn.SyncBatchNorm"
        else:
            net = convert_sync_batchnorm(net, device)
            self.norm = "pretrain.models.syncbn.GlobalBatchNorm (no CPU SyncBatchNorm)"
        module = TwoViewLoss(net, build_loss(cfg["loss"])).to(device)
        ids = [device.index] if device.type == "cuda" else None
        self.model = nn.parallel.DistributedDataParallel(module, device_ids=ids)
        o = cfg["optim"]
        self.optimizer = LARS(
            param_groups(self.model),
            lr=0.0,
            momentum=o["momentum"],
            weight_decay=o["weight_decay"],
            eta=o["eta"],
        )
        self.device, self.precision = device, precision
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        self.schedule = (*schedule, o["final_lr_ratio"])
        self.step_index = 0
        self.cudnn_benchmark = bool(cudnn_benchmark)

    def step(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        """One optimisation step on the (N, 3, S, S) views; the loss before the update."""
        total, warmup, peak, final = self.schedule
        set_lr(self.optimizer, lr_at(self.step_index, total, warmup, peak, final))
        with cudnn_flags(benchmark=self.cudnn_benchmark):
            self.optimizer.zero_grad()
            dtype = DTYPES[self.precision]
            with torch.autocast(self.device.type, dtype=dtype, enabled=self.precision != "fp32"):
                loss = self.model(x1, x2)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.step_index += 1
        return loss.detach()


def trainer_config(
    sizes: Sizes, device: torch.device, precision: str, channels_last: bool, out_dir: str
) -> dict:
    """The resolved recipe :data:`RECIPE` at ``sizes`` on synthetic data, for one process."""
    return load_config(
        find_config(RECIPE, "pretrain"),
        [
            f"model.arch={sizes.arch}",
            f"model.stem={sizes.stem}",
            f"model.projector={sizes.projector}",
            f"loss.bin_size={sizes.bin_size}",
            f"train.batch_size={sizes.batch}",
            f"train.precision={precision}",
            f"train.channels_last={str(channels_last).lower()}",
            f"train.device={device.type}",
            "data.kind=synthetic",
            "data.pipeline=pil",
            f"data.image_size={sizes.image_size}",
            f"data.synthetic_length={sizes.batch}",
            "data.synthetic_size=32",
            "data.num_workers=0",
            "optim.warmup_epochs=0.0",
            "eval.every_steps=0",
            "log.tensorboard=false",
            "checkpoint.resume=false",
            f"checkpoint.output_dir={out_dir}",
        ],
    )


class TrainerStep:
    """This project's :class:`~pretrain.engine.trainer.Trainer` driven one step at a time, as its
    loop does (``set_lr``, ``run_step``, step count), without the loader and the hooks.

    Args:
        cfg: a resolved config (:func:`trainer_config`).
        state_dict: initial weights loaded into the trainer's model (None: its own init).
    """

    def __init__(self, cfg: dict, state_dict: dict | None = None) -> None:
        self.trainer = Trainer(cfg)
        if state_dict is not None:
            self.trainer.model.load_state_dict(state_dict)
        self.trainer.ddp.train()
        self.stop = StopRequest()  # not installed: no signal handlers are replaced
        self.fmt = torch.channels_last if cfg["train"]["channels_last"] else torch.contiguous_format

    def batch(self, x1: torch.Tensor, x2: torch.Tensor) -> dict:
        """The batch dict of the pil pipeline for views already on the device."""
        return {
            "size": x1.shape[0],
            "view1": x1.contiguous(memory_format=self.fmt),
            "view2": x2.contiguous(memory_format=self.fmt),
        }

    def step(self, batch: dict) -> torch.Tensor:
        """One step of the trainer; the loss before the update."""
        t = self.trainer
        t.set_lr()
        if not t.run_step(batch, self.stop):
            raise RuntimeError("the trainer skipped the batch")
        t.state.step += 1
        return t.state.losses["loss"].detach()

    def close(self) -> None:
        self.trainer.writer.close()
        self.trainer.close()


def _schedule(step: TrainerStep) -> tuple[int, int, float]:
    t = step.trainer
    return t.state.total_steps, t.warmup_steps, t.peak_lr


def _release_logger() -> None:
    """Close the project logger's handlers (the trainers' run folders are temporary)."""
    logger = logging.getLogger(LOGGER_NAME)
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()


def time_steps(
    steps: dict[str, Callable[[], Any]], sizes: Sizes, device: torch.device, deadline: float
) -> dict:
    """Warm-up, then ``sizes.rounds`` rounds of ``sizes.steps`` steps of each variant in turn.

    Returns:
        {name: {"status", "images_per_s" (median round), "rounds" (images/s each)}} or the
        variant's error entry; a round that would pass ``deadline`` (perf_counter s) is not run.
    """
    out: dict[str, dict] = {}
    live = {}
    for name, fn in steps.items():
        try:
            for _ in range(sizes.warmup):
                fn()
            _sync(device)
            live[name], out[name] = fn, {"status": "ok", "rounds": []}
        except Exception as exc:  # noqa: BLE001 - recorded, the other variants go on
            out[name] = _error(exc)
    last = 0.0
    for r in range(sizes.rounds):
        if r > 0 and time.perf_counter() + last > deadline:
            for res in out.values():
                res.setdefault("stopped", f"part time guard: {r} of {sizes.rounds} rounds run")
            break
        t_round = time.perf_counter()
        for name, fn in list(live.items()):
            try:
                _sync(device)
                t0 = time.perf_counter()
                for _ in range(sizes.steps):
                    fn()
                _sync(device)
                out[name]["rounds"].append(sizes.batch * sizes.steps / (time.perf_counter() - t0))
            except Exception as exc:  # noqa: BLE001
                out[name] = _error(exc)
                del live[name]
        last = time.perf_counter() - t_round
    for res in out.values():
        if res["status"] == "ok":
            res["images_per_s"] = statistics.median(res["rounds"]) if res["rounds"] else None
    return out


def fp32_first_step(sizes: Sizes, device: torch.device, views, run_dir: str) -> tuple[dict, dict]:
    """Both loops' fp32 loss on the first step, from the same weights and batch.

    Returns:
        (the check's entry, the common initial state dict on the CPU).
    """
    with exact_fp32():
        ts = TrainerStep(trainer_config(sizes, device, "fp32", False, f"{run_dir}/fp32"))
        try:
            init = {k: v.detach().cpu().clone() for k, v in ts.trainer.model.state_dict().items()}
            ref = ReferenceLoop(ts.trainer.cfg, init, device, "fp32", _schedule(ts), False)
            ref_loss = float(ref.step(*views))
            trainer_loss = float(ts.step(ts.batch(*views)))
        finally:
            ts.close()
    rel = abs(ref_loss - trainer_loss) / max(abs(ref_loss), 1e-30)
    entry = {
        "reference": ref_loss,
        "trainer": trainer_loss,
        "rel_diff": rel,
        "rtol": LOSS_RTOL,
        "match": rel <= LOSS_RTOL,
    }
    return entry, init


def _sizes_entry(sizes: Sizes) -> dict:
    """The train part's sizes as recorded in the report."""
    return {
        "arch": sizes.arch,
        "stem": sizes.stem,
        "image_size": sizes.image_size,
        "batch": sizes.batch,
        "projector": sizes.projector,
        "bin_size": sizes.bin_size,
        "warmup_steps": sizes.warmup,
        "steps_per_round": sizes.steps,
        "rounds": sizes.rounds,
    }


def _describe_variants(timed: dict, ref: ReferenceLoop) -> None:
    """Add each timed variant's precision, memory format, DDP, norm and cuDNN flag (in place)."""
    timed["reference_fp16"].update(
        precision="fp16",
        channels_last=False,
        ddp=True,
        norm=ref.norm,
        cudnn_benchmark=ref.cudnn_benchmark,
    )
    timed["trainer_fp16"].update(
        precision="fp16",
        channels_last=False,
        ddp=False,
        cudnn_benchmark=torch.backends.cudnn.benchmark,
    )
    timed["trainer_bf16_channels_last"].update(
        precision="bf16",
        channels_last=True,
        ddp=False,
        cudnn_benchmark=torch.backends.cudnn.benchmark,
    )


def _ratios(timed: dict) -> dict:
    """images/s of each trainer variant over the reference-structure loop's (None: not timed)."""
    base = timed["reference_fp16"].get("images_per_s")
    out = {}
    for name in ("trainer_fp16", "trainer_bf16_channels_last"):
        rate = timed[name].get("images_per_s")
        out[f"ratio_{name}_over_reference_fp16"] = rate / base if rate and base else None
    return out


def train_part(sizes: Sizes, device: torch.device, budget: Budget) -> dict:
    """Part 1: images/s of the reference-structure loop and of the trainer (module docstring)."""
    t_part = time.perf_counter()
    deadline = t_part + min(sizes.train_s, budget.left())
    g = torch.Generator().manual_seed(1234)
    shape = (sizes.batch, 3, sizes.image_size, sizes.image_size)
    views = tuple(torch.randn(shape, generator=g).to(device) for _ in range(2))
    res: dict[str, Any] = {"status": "ok", "sizes": _sizes_entry(sizes), "recipe": RECIPE}
    steppers: list[TrainerStep] = []
    try:
        res["backend"] = init_world_of_one(device)
        with tempfile.TemporaryDirectory(prefix="gpu_check_runs_") as run_dir:
            try:
                res["fp32_first_step_loss"], init = fp32_first_step(sizes, device, views, run_dir)
            except Exception as exc:  # noqa: BLE001
                res["fp32_first_step_loss"] = _error(exc)
                init = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            fp16 = TrainerStep(
                trainer_config(sizes, device, "fp16", False, f"{run_dir}/fp16"), init
            )
            steppers.append(fp16)
            bf16 = TrainerStep(trainer_config(sizes, device, "bf16", True, f"{run_dir}/bf16"), init)
            steppers.append(bf16)
            ref = ReferenceLoop(
                fp16.trainer.cfg,
                init or fp16.trainer.model.state_dict(),
                device,
                "fp16",
                _schedule(fp16),
            )
            b16, bbf = fp16.batch(*views), bf16.batch(*views)
            timed = time_steps(
                {
                    "reference_fp16": lambda: ref.step(*views),
                    "trainer_fp16": lambda: fp16.step(b16),
                    "trainer_bf16_channels_last": lambda: bf16.step(bbf),
                },
                sizes,
                device,
                deadline,
            )
            for s in steppers:
                s.close()
            steppers.clear()
    finally:
        for s in steppers:
            s.close()
        _release_logger()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    _describe_variants(timed, ref)
    res["variants"] = timed
    res.update(_ratios(timed))
    res["seconds"] = time.perf_counter() - t_part
    return res

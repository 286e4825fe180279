#!/usr/bin/env python3
"""One GPU check in under 10 minutes: training images/s, the sharded kNN at ImageNet scale and
the three methods on Fashion-MNIST; figures written as JSON and a markdown table.

Meant for one run on a machine with one CUDA GPU. The parts run one after the other inside the
total budget ``--budget-s`` (default 540 s). Each part has its own wall-time guard: a part that
would not fit in what is left is skipped with the reason recorded, and a part that fails is
recorded as an error entry (the next part still runs), so one run gives as many figures as it
can. Output: ``OUT/gpu_check.json`` and ``OUT/gpu_check.md``, both printed at the end.

1. ``train``: images/s (two-view samples per second; one sample = two 3 x S x S views) of
   (a) a loop with the reference code's structure (github.com/niuchuangnn/IMSVD, ``imsvd.py``:
   SyncBatchNorm, DDP around a module that returns the loss of both views, fp16 autocast +
   GradScaler, LARS with biases and norm parameters excluded from weight decay and adaptation,
   ``cudnn.benchmark = True``), built from this project's model, loss and LARS
   (:class:`ReferenceLoop`); (b) this project's trainer, fp16 (``train.precision=fp16``,
   contiguous memory, as the recipe says for the reference); (c) the trainer with bf16 and
   channels_last. Same batch (64 per step), same synthetic inputs already on the device, same
   initial weights and learning-rate schedule; ResNet-50, 224 px, projector 8192-8160, B = 80.
   Warm-up steps, then rounds of timed steps interleaved over the three; the median round.
   The trainer's timed step is ``Trainer.set_lr()`` + ``Trainer.run_step(batch)`` of a
   :class:`pretrain.engine.Trainer` built from the resolved recipe ``imsvd_r50_100ep`` (with
   ``data.kind=synthetic``, ``data.pipeline=pil``): it includes the batch-size exchange, the
   loader's ``prepare`` (for tensors already on the device in the trainer's memory format a
   no-op), both forwards under the recipe's autocast, the loss, the per-step non-finite / stop
   all-reduce with its host read, and the GradScaler backward / step / update. It does not
   include data loading or augmentation (the loader is built, never iterated, so the fast
   pipeline's device colour stage does not run), nor the hooks (metrics and code monitors at
   log steps, probe, checkpoints). With one process the trainer trains the bare model (no DDP
   wrapper, no SyncBatchNorm), as it does on one GPU, while the reference-structure loop wraps
   DDP and SyncBatchNorm around a world of 1 (at world size 1 SyncBatchNorm computes plain
   batch statistics; DDP still all-reduces the gradients). Before timing, both loops run one
   fp32 step from the same weights on the same batch (cuDNN deterministic, TF32 off) and the
   two losses before the update are recorded: they must agree within 1e-5 relative, which is
   what makes the comparison one of the same computation.
2. ``knn``: :func:`pretrain.knn.knn_classify` (one process, bank on the GPU, its default query
   chunk and bank block) on a synthetic 1,281,167 x 2048 float32 bank (1,000 class centres plus
   noise, generated on the device block by block from fixed seeds) with 10,000 queries, k = 20
   and 200: seconds, ``torch.cuda.max_memory_allocated`` (bytes; bank, labels and queries
   included) next to the bank's bytes, with the check peak <= bank bytes + 2 GiB; and the
   predictions of the first 1,000 queries against a plain float64 computation (cosine to every
   row, the k largest, vote sum exp(sim / T) per class).
3. ``methods``: ``benchmarks/gpu_methods.py`` (IMSVD, VICReg, Barlow Twins on Fashion-MNIST) as
   a subprocess for ``--methods-epochs`` epochs (default 8: about 4 minutes by that script's
   own estimate of 30 epochs of the three in about 10 minutes), killed when the budget runs
   out; its ``results.json`` is included. Needs ``--data-dir`` with the four Fashion-MNIST idx
   .gz files; without it the part is recorded as "skipped: no data dir".

``--dry`` runs everything on the CPU at toy sizes in well under a minute (ResNet-18 with the
small_s2 stem, 32 px, batch 8, projector 64-80, B = 10, one warm-up and 2 timed steps; a
4096 x 64 bank with 256 queries, every prediction checked against the plain computation; and
``gpu_methods.py --dry-run --batch-size 32`` when the data dir exists), so the whole script is
exercised without a GPU. (The stride-1 small stem would cost ~15 s per fp16 step on a CPU.)

    python benchmarks/gpu_check.py [--out benchmarks/results/gpu_check] [--data-dir DIR]
        [--methods-epochs 8] [--budget-s 540]
    python benchmarks/gpu_check.py --dry --out /tmp/gpu_check

Exit status: 0 when every part ran or was skipped and every check passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pretrain.config import find_config, load_config  # noqa: E402
from pretrain.engine import Trainer  # noqa: E402
from pretrain.fashion_mnist import is_complete  # noqa: E402
from pretrain.knn import knn_classify  # noqa: E402
from pretrain.log import LOGGER_NAME  # noqa: E402
from pretrain.methods import build_loss  # noqa: E402
from pretrain.model import build_model  # noqa: E402
from pretrain.optim import LARS, lr_at, param_groups, set_lr  # noqa: E402
from pretrain.runtime import StopRequest  # noqa: E402
from pretrain.syncbn import convert_sync_batchnorm  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "gpu_check"
RECIPE = "imsvd_r50_100ep"
LOSS_RTOL = 1e-5
KNN_KS = (20, 200)
KNN_TEMPERATURE = 0.07
KNN_NOISE = 2.0  # per-coordinate noise std around unit-variance class centres
GIB = 1024**3
KNN_EXTRA_LIMIT = 2 * GIB  # the per-rank formula's allowance beyond the bank
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Sizes:
    """The sizes of one mode (GPU or ``--dry``) and the wall-time guards of its parts (s)."""

    arch: str
    stem: str
    image_size: int
    batch: int
    projector: str
    bin_size: int
    warmup: int
    steps: int
    rounds: int
    knn_rows: int
    knn_dim: int
    knn_queries: int
    knn_classes: int
    knn_check_queries: int
    train_s: float
    knn_s: float
    knn_kwargs: dict = field(default_factory=dict)  # knn_classify's chunk_size / bank_block


GPU_SIZES = Sizes(
    "resnet50", "standard", 224, 64, "8192-8160", 80, warmup=10, steps=20, rounds=5,
    knn_rows=1_281_167, knn_dim=2048, knn_queries=10_000, knn_classes=1000,
    knn_check_queries=1000, train_s=180.0, knn_s=90.0,
)  # fmt: skip
# small blocks so that the dry kNN merges several bank blocks and query chunks
DRY_SIZES = Sizes(
    "resnet18", "small_s2", 32, 8, "64-80", 10, warmup=1, steps=2, rounds=1,
    knn_rows=4096, knn_dim=64, knn_queries=256, knn_classes=100, knn_check_queries=256,
    train_s=45.0, knn_s=10.0, knn_kwargs={"chunk_size": 64, "bank_block": 1024},
)  # fmt: skip


def methods_need_s(epochs: int, dry: bool) -> float:
    """Estimated seconds of ``gpu_methods.py`` (three methods): the budget guard's need."""
    return 60.0 if dry else 30.0 + 3 * (20.0 + 6.0 * epochs)


class Budget:
    """Wall time left of the total budget (seconds, from construction)."""

    def __init__(self, total_s: float) -> None:
        self.total_s, self.t0 = float(total_s), time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.total_s - self.elapsed()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _error(exc: BaseException) -> dict:
    """A part's (or a variant's) error entry: the exception and the end of its traceback."""
    tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
    return {"status": "error", "error": f"{type(exc).__name__}: {exc}", "traceback": tb[-3:]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_world_of_one(device: torch.device) -> str:
    """A process group of this one process (nccl on CUDA, gloo on the CPU) for DDP; the backend."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(_free_port())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.distributed.init_process_group(backend, init_method="env://", rank=0, world_size=1)
    return backend


@contextlib.contextmanager
def cudnn_flags(**flags: bool):
    """Set ``torch.backends.cudnn`` flags (benchmark, deterministic, allow_tf32) in a block."""
    old = {k: getattr(torch.backends.cudnn, k) for k in flags}
    for k, v in flags.items():
        setattr(torch.backends.cudnn, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(torch.backends.cudnn, k, v)


@contextlib.contextmanager
def exact_fp32():
    """cuDNN deterministic, TF32 off for convolutions and matrix products (for the fp32 check)."""
    matmul = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with cudnn_flags(benchmark=False, deterministic=True, allow_tf32=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul


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
    SyncBatchNorm has no kernel for, :class:`pretrain.syncbn.GlobalBatchNorm`), DDP around
    :class:`TwoViewLoss` (a process group must exist), LARS over :func:`pretrain.optim.param_groups`
    (1-D parameters: no weight decay, no adaptation), the learning rate set every step, then
    ``zero_grad``, the forward under autocast (fp16 with a GradScaler; ``precision="fp32"``: no
    autocast, scaler disabled) and the scaled backward / step / update; ``cudnn.benchmark`` on
    during its steps.

    Args:
        cfg: a resolved pretraining config (model, loss, optim sections are read).
        state_dict: initial weights of :func:`pretrain.model.build_model`'s model.
        device: where it trains.
        precision: "fp16" (the reference's) or "fp32".
        schedule: (total_steps, warmup_steps, peak_lr) of :func:`pretrain.optim.lr_at`.
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
            self.norm = "pretrain.syncbn.GlobalBatchNorm (no CPU SyncBatchNorm)"
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
    """This project's :class:`~pretrain.engine.Trainer` driven one step at a time, as its loop
    does (``set_lr``, ``run_step``, step count), without the loader and the hooks.

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
        t.step += 1
        return t.losses["loss"].detach()

    def close(self) -> None:
        self.trainer.writer.close()
        self.trainer.close()


def _schedule(step: TrainerStep) -> tuple[int, int, float]:
    t = step.trainer
    return t.total_steps, t.warmup_steps, t.peak_lr


def _release_logger() -> None:
    """Close the project logger's handlers (the trainers' run folders are temporary)."""
    import logging

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


def train_part(sizes: Sizes, device: torch.device, budget: Budget) -> dict:
    """Part 1: images/s of the reference-structure loop and of the trainer (module docstring)."""
    t_part = time.perf_counter()
    deadline = t_part + min(sizes.train_s, budget.left())
    g = torch.Generator().manual_seed(1234)
    shape = (sizes.batch, 3, sizes.image_size, sizes.image_size)
    views = tuple(torch.randn(shape, generator=g).to(device) for _ in range(2))
    res: dict[str, Any] = {
        "status": "ok",
        "sizes": {
            "arch": sizes.arch,
            "stem": sizes.stem,
            "image_size": sizes.image_size,
            "batch": sizes.batch,
            "projector": sizes.projector,
            "bin_size": sizes.bin_size,
            "warmup_steps": sizes.warmup,
            "steps_per_round": sizes.steps,
            "rounds": sizes.rounds,
        },
        "recipe": RECIPE,
    }
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
    res["variants"] = timed
    base = timed["reference_fp16"].get("images_per_s")
    for name in ("trainer_fp16", "trainer_bf16_channels_last"):
        rate = timed[name].get("images_per_s")
        res[f"ratio_{name}_over_reference_fp16"] = rate / base if rate and base else None
    res["seconds"] = time.perf_counter() - t_part
    return res


# ------------------------------------------------------------------------- part 2: kNN
def class_rows(centres: torch.Tensor, n: int, generator: torch.Generator, block: int = 65536):
    """``n`` rows around random ones of ``centres`` (C, D): ((n, D) float32, (n,) int64 labels),
    made in place block by block (noise std :data:`KNN_NOISE`) on the centres' device."""
    labels = torch.randint(0, centres.shape[0], (n,), generator=generator, device=centres.device)
    rows = torch.empty(n, centres.shape[1], device=centres.device)
    for lo in range(0, n, block):
        part = rows[lo : lo + block]
        part.normal_(0.0, KNN_NOISE, generator=generator).add_(centres[labels[lo : lo + block]])
    return rows, labels


def plain_knn(bank, labels, queries, ks, temperature, num_classes, chunk: int = 128) -> dict:
    """Predictions of the plain weighted kNN in float64: cosine similarity of each query to
    every bank row, the k largest, class votes sum exp(sim / T); ``chunk`` queries at a time.

    Args:
        bank: (N, D) features; labels: (N,) int64; queries: (M, D); ks: neighbour counts.

    Returns:
        {k: (M,) int64 numpy predictions}.
    """
    preds: dict[int, list] = {k: [] for k in ks}
    for lo in range(0, queries.shape[0], chunk):
        q = F.normalize(queries[lo : lo + chunk].double(), dim=1)
        sim = torch.cat([q @ F.normalize(b.double(), dim=1).T for b in bank.split(65536)], dim=1)
        top, idx = sim.topk(min(max(ks), bank.shape[0]), dim=1)
        weight = torch.exp(top / temperature)
        for k in ks:
            votes = weight.new_zeros(q.shape[0], num_classes)
            votes.scatter_add_(1, labels[idx[:, :k]], weight[:, :k])
            preds[k].append(votes.argmax(1).cpu())
    return {k: torch.cat(v).numpy() for k, v in preds.items()}


def knn_part(sizes: Sizes, device: torch.device) -> dict:
    """Part 2: seconds and peak device memory of the kNN on a synthetic bank (module docstring)."""
    t_part = time.perf_counter()
    gc.collect()  # what the previous part left would count in the peak
    if device.type == "cuda":
        torch.cuda.empty_cache()
    g = torch.Generator(device=device).manual_seed(0)
    centres = torch.randn(sizes.knn_classes, sizes.knn_dim, generator=g, device=device)
    bank, labels = class_rows(centres, sizes.knn_rows, g)
    queries, qlabels = class_rows(centres, sizes.knn_queries, g)
    del centres
    _sync(device)
    res: dict[str, Any] = {
        "status": "ok",
        "device": str(device),
        "bank_rows": sizes.knn_rows,
        "dim": sizes.knn_dim,
        "queries": sizes.knn_queries,
        "classes": sizes.knn_classes,
        "ks": list(KNN_KS),
        "temperature": KNN_TEMPERATURE,
        "knn_classify_kwargs": dict(sizes.knn_kwargs),
        "generate_seconds": time.perf_counter() - t_part,
        "bank_bytes": bank.numel() * bank.element_size(),
    }
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        res["allocated_before_bytes"] = torch.cuda.memory_allocated(device)
    t0 = time.perf_counter()
    preds = knn_classify(
        bank,
        labels,
        queries,
        ks=KNN_KS,
        temperature=KNN_TEMPERATURE,
        num_classes=sizes.knn_classes,
        device=device,
        **sizes.knn_kwargs,
    )
    _sync(device)
    res["seconds"] = time.perf_counter() - t0
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        res.update(
            peak_bytes=peak,
            peak_minus_bank_bytes=peak - res["bank_bytes"],
            limit_bytes=res["bank_bytes"] + KNN_EXTRA_LIMIT,
            peak_within_limit=peak <= res["bank_bytes"] + KNN_EXTRA_LIMIT,
        )
    else:
        res.update(
            peak_bytes=None,
            peak_within_limit=None,
            peak_note="CPU: torch.cuda.max_memory_allocated does not apply",
        )
    y = qlabels.cpu().numpy()
    res["top1"] = {str(k): float((p == y).mean() * 100) for k, p in preds.items()}
    n = sizes.knn_check_queries
    try:  # after the measurement: its failure leaves the figures above
        ref = plain_knn(bank, labels, queries[:n], KNN_KS, KNN_TEMPERATURE, sizes.knn_classes)
        differing = {str(k): int((preds[k][:n] != ref[k]).sum()) for k in KNN_KS}
        res["reference_check"] = {
            "queries": n,
            "differing": differing,
            "equal": not any(differing.values()),
        }
    except Exception as exc:  # noqa: BLE001
        res["reference_check"] = {"queries": n, "equal": None, **_error(exc)}
    del bank, labels, queries, qlabels, preds
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    res["part_seconds"] = time.perf_counter() - t_part
    return res


# --------------------------------------------------------------------- part 3: the methods
def methods_part(data_dir: str | None, out: Path, epochs: int, dry: bool, timeout_s: float) -> dict:
    """Part 3: ``gpu_methods.py`` as a subprocess (its process group is killed at ``timeout_s``).

    Returns:
        {"status", "seconds", "exit", "results" (its results.json)} or a skipped / error entry.
    """
    if not data_dir:
        return {"status": "skipped", "reason": "skipped: no data dir (--data-dir not given)"}
    if not is_complete(Path(data_dir)):
        return {
            "status": "skipped",
            "reason": f"skipped: no data dir ({data_dir} lacks the Fashion-MNIST idx .gz files)",
        }
    run = out / "gpu_methods"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "gpu_methods.py"),
        "--data-dir",
        str(data_dir),
        "--out",
        str(run),
        "--epochs",
        str(epochs),
    ]
    if dry:
        cmd += ["--dry-run", "--batch-size", "32"]
    run.mkdir(parents=True, exist_ok=True)
    log = run / "gpu_methods.log"
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            rc = proc.wait(timeout=max(timeout_s, 1.0))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            return {
                "status": "error",
                "epochs": epochs,
                "log": str(log),
                "seconds": time.perf_counter() - t0,
                "error": f"killed after {timeout_s:.0f} s (the budget left)",
            }
    res: dict[str, Any] = {
        "status": "ok" if rc == 0 else "error",
        "epochs": epochs,
        "dry_run": dry,
        "exit": rc,
        "seconds": time.perf_counter() - t0,
        "log": str(log),
        "command": " ".join(cmd[1:]),
    }
    results = run / "results.json"
    if results.is_file():
        res["results"] = json.loads(results.read_text())
    if rc != 0:
        res["error"] = f"gpu_methods.py exited with {rc}; the end of its log: " + "".join(
            log.read_text(errors="replace").splitlines(keepends=True)[-15:]
        )
    return res


# ------------------------------------------------------------------------------- report
def _fmt(x: Any, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def markdown(report: dict) -> str:
    """The figures of ``report`` as a short markdown table."""
    rows = []
    parts = report["parts"]
    tr = parts.get("train", {})
    if tr.get("status") == "ok":
        s = tr["sizes"]
        what = f"{s['arch']}, {s['image_size']} px, batch {s['batch']}, projector {s['projector']}"
        for name, label in (
            ("reference_fp16", "reference-structure loop, fp16"),
            ("trainer_fp16", "trainer, fp16"),
            ("trainer_bf16_channels_last", "trainer, bf16 + channels_last"),
        ):
            v = tr["variants"][name]
            if v["status"] != "ok":
                rows.append(("train", f"{label} ({what})", v["error"]))
                continue
            ratio = tr.get(f"ratio_{name}_over_reference_fp16")
            extra = f" ({ratio:.2f}x the reference)" if ratio else ""
            rows.append(
                ("train", f"{label} ({what})", f"{_fmt(v['images_per_s'])} images/s{extra}")
            )
        chk = tr["fp32_first_step_loss"]
        if chk.get("status") == "error":
            rows.append(("train", "fp32 first-step loss", chk["error"]))
        else:
            rows.append(
                (
                    "train",
                    "fp32 first-step loss, reference / trainer",
                    f"{chk['reference']:.6f} / {chk['trainer']:.6f} (rel. diff "
                    f"{chk['rel_diff']:.1e}, {'match' if chk['match'] else 'DIFFER'})",
                )
            )
    kn = parts.get("knn", {})
    if kn.get("status") == "ok":
        what = f"{kn['bank_rows']:,} x {kn['dim']} bank, {kn['queries']:,} queries, k=20/200"
        mem = ""
        if kn["peak_bytes"] is not None:
            within = "within" if kn["peak_within_limit"] else "OVER"
            mem = (
                f", peak {kn['peak_bytes'] / GIB:.2f} GiB (bank {kn['bank_bytes'] / GIB:.2f} "
                f"GiB, {within} bank + 2 GiB)"
            )
        rows.append(("knn", what, f"{kn['seconds']:.2f} s{mem}"))
        chk = kn["reference_check"]
        rows.append(
            (
                "knn",
                f"predictions vs plain float64 ({chk['queries']} queries)",
                chk.get("error") or ("equal" if chk["equal"] else f"differing {chk['differing']}"),
            )
        )
    me = parts.get("methods", {})
    if me.get("status") == "ok":
        length = "--dry-run (3 steps)" if me["dry_run"] else f"{me['epochs']} epochs"
        for name, r in me.get("results", {}).items():
            knn = ", ".join(f"{k} {v:.2f}" for k, v in r.get("test_knn", {}).items())
            rows.append(
                (
                    "methods",
                    f"{name}, {length}",
                    f"exit {r['exit']}, {r['seconds']} s{', ' + knn if knn else ''}",
                )
            )
    for name, p in parts.items():
        if p.get("status") in ("skipped", "error") and not (name == "train" and "variants" in p):
            rows.append((name, p["status"], p.get("reason") or p.get("error", "")))
    lines = [
        f"GPU check ({report['mode']}, {report['device_name']}, torch {report['torch']}, "
        f"{report['total_seconds']:.0f} s)",
        "",
        "| part | figure | value |",
        "|---|---|---|",
    ]
    lines += [f"| {a} | {b} | {str(c).replace('|', '/').splitlines()[0]} |" for a, b, c in rows]
    return "\n".join(lines) + "\n"


def checks(parts: dict) -> dict:
    """The pass / fail checks of the run (None: not measured)."""
    tr, kn = parts.get("train", {}), parts.get("knn", {})
    return {
        "fp32_first_step_loss_match": tr.get("fp32_first_step_loss", {}).get("match"),
        "knn_predictions_equal_reference": kn.get("reference_check", {}).get("equal"),
        "knn_peak_within_bank_plus_2GiB": kn.get("peak_within_limit"),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(DEFAULT_OUT), help="folder of gpu_check.json / .md")
    p.add_argument("--dry", action="store_true", help="CPU, toy sizes (< 60 s)")
    p.add_argument("--budget-s", type=float, default=540.0, help="total wall-time budget (s)")
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST idx .gz folder (part 3)")
    p.add_argument("--methods-epochs", type=int, default=8, help="gpu_methods.py --epochs")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    budget = Budget(args.budget_s)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sizes = DRY_SIZES if args.dry else GPU_SIZES
    device = torch.device("cpu") if args.dry else torch.device("cuda", 0)
    report: dict[str, Any] = {
        "script": "benchmarks/gpu_check.py",
        "mode": "dry" if args.dry else "gpu",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "budget_s": args.budget_s,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "device_name": platform.processor() or platform.machine(),
        "parts": {},
    }
    parts = report["parts"]
    no_cuda = not args.dry and not torch.cuda.is_available()
    if no_cuda:
        report["error"] = "no CUDA device (run with --dry for the CPU check)"
    else:
        if device.type == "cuda":
            report["device_name"] = torch.cuda.get_device_name(device)
    plan = [
        ("train", sizes.train_s, lambda: train_part(sizes, device, budget)),
        ("knn", sizes.knn_s, lambda: knn_part(sizes, device)),
        (
            "methods",
            methods_need_s(args.methods_epochs, args.dry),
            lambda: methods_part(
                args.data_dir, out, args.methods_epochs, args.dry, budget.left() - 5.0
            ),
        ),
    ]
    for name, need, run in plan:
        if no_cuda:
            parts[name] = {"status": "error", "error": report["error"]}
            continue
        left = budget.left()
        if left < need and not (name == "train" and left > 0):
            parts[name] = {
                "status": "skipped",
                "reason": f"budget: {left:.0f} s left of {args.budget_s:.0f} s, the "
                f"part needs about {need:.0f} s",
            }
            continue
        print(f"[gpu_check] {name} ({left:.0f} s of the budget left)", flush=True)
        t0 = time.perf_counter()
        try:
            parts[name] = run()
        except Exception as exc:  # noqa: BLE001 - recorded; the next part runs
            parts[name] = _error(exc)
        parts[name].setdefault("seconds", time.perf_counter() - t0)
        took = time.perf_counter() - t0
        print(f"[gpu_check] {name}: {parts[name]['status']} in {took:.1f} s", flush=True)
    report["checks"] = checks(parts)
    report["total_seconds"] = budget.elapsed()
    text = json.dumps(report, indent=1, default=str)
    (out / "gpu_check.json").write_text(text + "\n")
    table = markdown(report)
    (out / "gpu_check.md").write_text(table)
    print(text)
    print(table)
    failed = any(p.get("status") == "error" for p in parts.values()) or any(
        c is False for c in report["checks"].values()
    )
    return 1 if failed or no_cuda else 0


if __name__ == "__main__":
    sys.exit(main())

"""The sizes, the time budget and the shared helpers of :mod:`gpu_check` (see its docstring)
and its parts (:mod:`gpu_check_train`, :mod:`gpu_check_knn`)."""

from __future__ import annotations

import contextlib
import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rendezvous import free_port  # benchmarks/ (gpu_check.py puts it on sys.path)

ROOT = Path(__file__).resolve().parent.parent

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


def init_world_of_one(device: torch.device) -> str:
    """A process group of this one process (nccl on CUDA, gloo on the CPU) for DDP; the backend."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(free_port())
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

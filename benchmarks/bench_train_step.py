#!/usr/bin/env python3
"""Training-step throughput (images/s) of IMSVD: fp32 reference vs channels_last + autocast.

Every variant runs the same full step (two views through backbone + projector, the IMSVD loss,
backward, LARS step) on synthetic inputs already on the device, so only the step is timed.
The reference is fp32, contiguous memory, eager; the variants add channels_last, bf16 / fp16
autocast (fp16 with a GradScaler, as the recipe) and optionally torch.compile.

    python benchmarks/bench_train_step.py                       # CPU: ResNet-18, 64 px, batch 32
    python benchmarks/bench_train_step.py --device cuda --arch resnet50 --size 224 --batch 128
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pretrain.engine.optim import LARS, param_groups  # noqa: E402
from pretrain.losses.imsvd import IMSVDLoss  # noqa: E402
from pretrain.models.build import build_model  # noqa: E402

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def run_variant(args, precision: str, channels_last: bool, compile_: bool) -> float:
    """Median images/s over ``args.rounds`` rounds of ``args.steps`` steps."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model(
        {
            "arch": args.arch,
            "stem": args.stem,
            "projector": args.projector,
            "zero_init_residual": True,
        }
    ).to(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    fwd = torch.compile(model) if compile_ else model
    crit = IMSVDLoss(bin_size=args.bin_size)
    opt = LARS(param_groups(model), lr=0.1)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    x1 = torch.randn(args.batch, 3, args.size, args.size, device=device).contiguous(
        memory_format=fmt
    )
    x2 = torch.randn_like(x1)
    dtype = DTYPES[precision]

    def step():
        ctx = (
            torch.autocast(device.type, dtype=dtype)
            if dtype is not None
            else contextlib.nullcontext()
        )
        with ctx:
            z1, z2 = fwd(x1), fwd(x2)
        loss = crit(z1.float(), z2.float())["loss"]
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    sync()
    rates = []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync()
        rates.append(args.batch * args.steps / (time.perf_counter() - t0))
    return statistics.median(rates)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--stem", default="small_s2")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--projector", default="2048-2000")
    p.add_argument("--bin-size", type=int, default=80)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--compile", action="store_true", help="also time torch.compile variants")
    p.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0: default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = [("fp32", False, False), ("fp32", True, False), ("bf16", True, False)]
    if args.device.startswith("cuda"):
        variants.append(("fp16", True, False))
    if args.compile:
        variants += [(prec, True, True) for prec in ("bf16",)]
    print(
        f"device {args.device}, {args.arch} ({args.stem}) {args.size}px, batch {args.batch} x 2 "
        f"views, projector {args.projector}, torch {torch.__version__}"
    )
    ref = None
    print(f"{'variant':34s} {'images/s':>10s} {'ratio':>7s}")
    for prec, cl, comp in variants:
        name = f"{prec}{' channels_last' if cl else ''}{' compile' if comp else ''}"
        rate = run_variant(args, prec, cl, comp)
        ref = ref or rate
        print(f"{name:34s} {rate:10.1f} {rate / ref:6.2f}x", flush=True)


if __name__ == "__main__":
    main()

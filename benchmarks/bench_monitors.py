"""Benchmark: cost of the online code monitors relative to the IMSVD loss.

The engine calls
``pretrain.losses.monitors.code_monitors(z1, z2, bin_size, temperature, step=step)`` at every log
step. This script times, in one run and on the same inputs (N x D projector
outputs, default N=256, D=8160, B=80): the reference figure = one forward+backward of
``IMSVDLoss`` (what every training step pays), the new figure = one ``code_monitors`` call, and
their ratio. Median of ``--repeats`` timed calls after one warm-up.

Usage:
    .venv/bin/python benchmarks/bench_monitors.py
    .venv/bin/python benchmarks/bench_monitors.py --device cuda --repeats 50
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from pretrain.losses.imsvd import IMSVDLoss  # noqa: E402
from pretrain.losses.monitors import code_monitors  # noqa: E402


def _time(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--dim", type=int, default=8160)
    p.add_argument("--bin-size", type=int, default=80)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    z1 = (3 * torch.randn(args.batch, args.dim, generator=g)).to(device).requires_grad_(True)
    z2 = (3 * torch.randn(args.batch, args.dim, generator=g)).to(device).requires_grad_(True)
    loss_fn = IMSVDLoss(bin_size=args.bin_size)

    def loss_step() -> None:
        z1.grad = z2.grad = None
        loss_fn(z1, z2)["loss"].backward()

    step = [0]

    def monitor() -> None:
        step[0] += 1
        code_monitors(z1.detach(), z2.detach(), args.bin_size, step=step[0])

    t_loss = _time(loss_step, device, args.repeats)
    t_mon = _time(monitor, device, args.repeats)
    print(
        f"device={device} threads={torch.get_num_threads()} N={args.batch} D={args.dim} "
        f"B={args.bin_size} (median of {args.repeats})"
    )
    print(f"reference  IMSVDLoss forward+backward : {t_loss * 1e3:9.2f} ms")
    print(f"new        code_monitors              : {t_mon * 1e3:9.2f} ms")
    print(f"ratio      monitors / loss            : {t_mon / t_loss:9.4f}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Training step on 2 gloo processes: gathers that exchange sizes vs the step's known sizes.

Each rank runs the demo recipe's step (configs/pretrain/imsvd_demo.yaml: ResNet-18 small_s2 stem,
28 px, projector 1024-1040 with the output norm, B = 10, batch 256 = 128 per rank, SGD, DDP) on
synthetic views. ``exchange`` is the loss as a caller outside the engine sees it: every
``all_gather_with_grad`` first all-gathers the ranks' sizes and reads them back to the host (4
gathers and 2 host reads in the IMSVD loss's forward). ``known`` is the engine's step: one
``gather_batch_sizes`` before the forward, the loss inside ``known_batch_sizes`` (2 gathers, no
host read). Modes alternate round by round; the median ms/step of each and their ratio come from
the same run, with the all_gather calls per step counted.

    python benchmarks/bench_step_sizes.py            # --rounds 5 --steps 3 --warmup 2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rendezvous import act_as_launcher, free_port  # noqa: E402  (benchmarks/)

from pretrain import dist as pdist  # noqa: E402
from pretrain.config import find_config, load_config  # noqa: E402
from pretrain.engine.optim import build_optimizer  # noqa: E402
from pretrain.methods import build_loss  # noqa: E402
from pretrain.models.build import build_model  # noqa: E402

MODES = ("exchange", "known")


def _views(local: int, size: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's two (local, 3, size, size) channels-last views, seeded by the rank."""
    g = torch.Generator().manual_seed(rank)
    return tuple(
        torch.randn(local, 3, size, size, generator=g).contiguous(memory_format=torch.channels_last)
        for _ in range(2)
    )


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    act_as_launcher(rank, world, port)
    torch.set_num_threads(1)
    pdist.init_distributed("cpu")
    cfg = load_config(find_config("imsvd_demo", "pretrain"))
    torch.manual_seed(0)
    model = build_model(cfg["model"]).to(memory_format=torch.channels_last)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    crit = build_loss(cfg["loss"])
    opt = build_optimizer(model, cfg["optim"], 0.1)
    local = cfg["train"]["batch_size"] // world
    x1, x2 = _views(local, cfg["data"]["image_size"], rank)
    gathers = [0]
    real_gather = torch.distributed.all_gather

    def counted(*a, **k):
        gathers[0] += 1
        return real_gather(*a, **k)

    torch.distributed.all_gather = counted

    def step(mode: str) -> None:
        z1, z2 = ddp(x1), ddp(x2)
        if mode == "known":
            sizes = pdist.gather_batch_sizes(local, x1.device)
            scope = pdist.known_batch_sizes(sizes)
        else:
            scope = contextlib.nullcontext()
        with scope:
            loss = crit(z1.float(), z2.float())["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for mode in MODES:
        for _ in range(args.warmup):
            step(mode)
    times = {m: [] for m in MODES}
    per_step = {}
    for _ in range(args.rounds):
        for mode in MODES:
            pdist.barrier()
            gathers[0] = 0
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step(mode)
            times[mode].append((time.perf_counter() - t0) / args.steps * 1000)
            per_step[mode] = gathers[0] / args.steps
    if rank == 0:
        Path(out).write_text(json.dumps({"times": times, "gathers": per_step}))
    pdist.barrier()
    pdist.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        mp.spawn(_worker, args=(2, port, args, out), nprocs=2, join=True)
        res = json.loads(Path(out).read_text())
    med = {m: statistics.median(res["times"][m]) for m in MODES}
    print("demo recipe step, 2 gloo processes x 1 thread, batch 128 per rank, 28 px")
    print(f"{'mode':<10} {'ms/step (median)':>17} {'all_gather / step':>18}")
    for m in MODES:
        print(f"{m:<10} {med[m]:>17.1f} {res['gathers'][m]:>18.0f}")
    print(f"ratio exchange / known: {med['exchange'] / med['known']:.3f}")


if __name__ == "__main__":
    main()

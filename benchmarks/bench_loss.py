"""Benchmark: lean / rank-sharded IMSVD loss vs the straightforward reference.

Measured in one run (see benchmarks/README.md, section "Loss"):

1. one process, N x D projector outputs (default N=256, D=16320 and 8160, B=80): time of one
   forward+backward of the loss and its peak memory, reference vs lean. Every variant runs in a
   fresh subprocess so that allocator state and the memory high-water mark of one variant cannot
   leak into another. Peak memory on CPU = the process's peak RSS (getrusage ru_maxrss) during the
   first forward+backward minus its RSS just before it (inputs already allocated); on CUDA =
   torch.cuda.max_memory_allocated minus the allocation before the call.
2. several gloo ranks (default 2, each with N / ranks samples and cores / ranks threads): the
   per-rank time of the loss (forward+backward, the slowest rank) with the joint sweep sharded
   across ranks vs every rank sweeping all rows.

Usage:
    .venv/bin/python benchmarks/bench_loss.py                 # CPU, all parts
    .venv/bin/python benchmarks/bench_loss.py --device cuda   # GPU (dist part needs >= 2 GPUs)
    .venv/bin/python benchmarks/bench_loss.py --dims 8160 --skip-dist --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Dict, List

import torch
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from rendezvous import act_as_launcher, free_port  # noqa: E402  (benchmarks/)

from pretrain import dist as pdist  # noqa: E402
from pretrain.losses.imsvd import IMSVDLoss  # noqa: E402


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _inputs(n: int, d: int, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    z1 = 3.0 * torch.randn(n, d, generator=g)
    z2 = z1 + torch.randn(n, d, generator=g)
    return z1.to(device).requires_grad_(), z2.to(device).requires_grad_()


def _step(crit: IMSVDLoss, z1: torch.Tensor, z2: torch.Tensor) -> float:
    z1.grad = z2.grad = None
    out = crit(z1, z2)
    out["loss"].backward()
    return float(out["loss"].detach())


def single_worker(args: argparse.Namespace) -> Dict[str, float]:
    """Run inside a fresh process: memory of the first call, then timed repeats."""
    device = torch.device(args.device)
    z1, z2 = _inputs(args.n, args.dim, device)
    crit = IMSVDLoss(bin_size=args.bin_size, impl=args.impl)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        before = _rss_bytes()
    t0 = time.perf_counter()
    loss = _step(crit, z1, z2)
    _sync(device)
    first = time.perf_counter() - t0
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    times = []
    for _ in range(args.repeats):
        _sync(device)
        t0 = time.perf_counter()
        _step(crit, z1, z2)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return {"loss": loss, "first_s": first, "times": times, "peak_mib": peak / 2**20}


def _run_single(args: argparse.Namespace, impl: str, dim: int) -> Dict:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        "single",
        "--impl",
        impl,
        "--dim",
        str(dim),
        "--n",
        str(args.n),
        "--bin-size",
        str(args.bin_size),
        "--repeats",
        str(args.repeats),
        "--device",
        args.device,
    ]
    res = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def _summary(runs: List[Dict]) -> Dict[str, float]:
    times = [t for r in runs for t in r["times"]]
    return {
        "loss": runs[0]["loss"],
        "median_s": statistics.median(times),
        "first_s": statistics.median(r["first_s"] for r in runs),
        "peak_mib": max(r["peak_mib"] for r in runs),
    }


def _dist_worker(rank: int, world: int, port: int, args: argparse.Namespace, queue) -> None:
    act_as_launcher(rank, world, port)
    torch.set_num_threads(max(1, args.threads // world))
    info = pdist.init_distributed(args.device)
    local_n = args.n // world
    z1, z2 = _inputs(args.n, args.dist_dim, info.device)
    z1 = z1.detach()[rank * local_n : (rank + 1) * local_n].clone().requires_grad_()
    z2 = z2.detach()[rank * local_n : (rank + 1) * local_n].clone().requires_grad_()
    crits = {
        "lean_unsharded": IMSVDLoss(bin_size=args.bin_size, impl="lean", shard=False),
        "lean_sharded": IMSVDLoss(bin_size=args.bin_size, impl="lean", shard=True),
        "reference": IMSVDLoss(bin_size=args.bin_size, impl="reference"),
    }
    times: Dict[str, List[float]] = {name: [] for name in crits}
    for crit in crits.values():
        _step(crit, z1, z2)  # warm-up
    # Interleave the variants so that load from other work on the machine hits them alike.
    for _ in range(args.repeats * args.rounds):
        for name, crit in crits.items():
            pdist.barrier()
            _sync(info.device)
            t0 = time.perf_counter()
            _step(crit, z1, z2)
            _sync(info.device)
            times[name].append(time.perf_counter() - t0)
    result = {name: statistics.median(t) for name, t in times.items()}
    queue.put((rank, result))
    pdist.barrier()
    pdist.cleanup()


def run_dist(args: argparse.Namespace) -> Dict[str, float]:
    port = free_port()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_dist_worker, args=(r, args.ranks, port, args, queue))
        for r in range(args.ranks)
    ]
    for p in procs:
        p.start()
    results = [queue.get() for _ in procs]
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise RuntimeError(f"benchmark rank exited with code {p.exitcode}")
    # Per-rank time of a step = the slowest rank (the others wait for it at the next collective).
    return {k: max(r[k] for _, r in results) for k in results[0][1]}


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def parse_args(argv: List[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--n", type=int, default=256, help="global batch size")
    p.add_argument("--dims", type=int, nargs="+", default=[16320, 8160])
    p.add_argument("--bin-size", type=int, default=80)
    p.add_argument("--repeats", type=int, default=3, help="timed calls per process")
    p.add_argument("--rounds", type=int, default=2, help="fresh processes per variant")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--dist-dim", type=int, default=8160)
    p.add_argument(
        "--threads",
        type=int,
        default=torch.get_num_threads(),
        help="CPU threads shared by the ranks of the dist part",
    )
    p.add_argument("--skip-single", action="store_true")
    p.add_argument("--skip-dist", action="store_true")
    p.add_argument("--worker", choices=["single"], help=argparse.SUPPRESS)
    p.add_argument("--impl", help=argparse.SUPPRESS)
    p.add_argument("--dim", type=int, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def single_part(args: argparse.Namespace) -> None:
    """One process: the reference and the lean loss per dimension, printed as a table."""
    print(
        "\n[one process] forward+backward of the loss; median time of the repeats, "
        "peak memory of the first call (max over rounds)"
    )
    print(f"{'D':>6} {'metric':>12} {'reference':>11} {'lean':>11} {'ratio':>7}")
    for dim in args.dims:
        # Alternate fresh processes (ref, lean, ref, lean, ...) so that load from other work
        # on the machine hits both variants alike; pool the timed repeats of all rounds.
        runs: Dict[str, List[Dict]] = {"reference": [], "lean": []}
        for _ in range(args.rounds):
            for impl in runs:
                runs[impl].append(_run_single(args, impl, dim))
        ref, lean = _summary(runs["reference"]), _summary(runs["lean"])
        rel = abs(lean["loss"] - ref["loss"]) / abs(ref["loss"])
        for key, label in (
            ("median_s", "time [s]"),
            ("first_s", "1st call [s]"),
            ("peak_mib", "peak [MiB]"),
        ):
            print(
                f"{dim:>6} {label:>12} {ref[key]:>11.3f} {lean[key]:>11.3f} "
                f"{lean[key] / ref[key]:>7.3f}"
            )
        print(f"{dim:>6} {'loss rel.diff':>12} {rel:.2e}")


def dist_part(args: argparse.Namespace) -> None:
    """``--ranks`` processes: the sharded lean loss against the unsharded and the reference."""
    dev = torch.device(args.device)
    if dev.type == "cuda" and torch.cuda.device_count() < args.ranks:
        print(f"\n[{args.ranks} ranks] skipped: needs {args.ranks} GPUs")
    else:
        res = run_dist(args)
        print(
            f"\n[{args.ranks} ranks, gloo/nccl] D={args.dist_dim}, {args.n // args.ranks} "
            f"samples and {max(1, args.threads // args.ranks)} thread(s) per rank; "
            f"per-rank time of forward+backward (slowest rank, median)"
        )
        print(f"  reference (all rows, materialised P): {res['reference']:.3f} s")
        print(f"  lean, unsharded (reference figure):   {res['lean_unsharded']:.3f} s")
        print(f"  lean, sharded (new figure):           {res['lean_sharded']:.3f} s")
        print(
            f"  ratio sharded / unsharded:            "
            f"{res['lean_sharded'] / res['lean_unsharded']:.3f}"
        )
        print(
            f"  ratio sharded / reference:            "
            f"{res['lean_sharded'] / res['reference']:.3f}"
        )


def main(argv: List[str] | None = None) -> None:
    args = parse_args(argv)

    if args.worker == "single":
        print(json.dumps(single_worker(args)))
        return

    print(
        f"device={args.device} N={args.n} B={args.bin_size} repeats={args.repeats} "
        f"rounds={args.rounds} torch threads={torch.get_num_threads()} load avg at start: {_load()}"
    )
    if not args.skip_single:
        single_part(args)
    if not args.skip_dist:
        dist_part(args)
    print(f"\nload avg at end: {_load()}")


if __name__ == "__main__":
    main()

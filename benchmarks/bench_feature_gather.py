#!/usr/bin/env python3
"""Where extracted features end up: per-rank peak memory and time of the three gathers.

Each of W gloo processes holds its contiguous shard of a synthetic N x D float32 feature array
(as :func:`transfer.eval.features.extract_features` has it after the forward passes) and then:

- ``all`` (what every evaluation did before the gathers were chosen per protocol): one
  ``all_gather_tensor`` of the whole array, copied to the host on every rank;
- ``main`` (the VOC07 SVMs): :func:`pretrain.dist.gather_rows_to_main`, the shards sent to rank
  0 in chunks of ``GATHER_CHUNK_BYTES`` per rank;
- ``shard`` (the kNN bank, the linear probe's validation pass): nothing moves.

Every variant runs in fresh processes, so the peak resident memory (``ru_maxrss``) is its own.
The expected per-rank peaks, with ``c0`` the process with torch loaded (fitted on the 1-process
run): ``shard`` c0 + 4ND/W; ``main`` rank 0 c0 + 4ND/W + 4ND (the whole array), the others
c0 + 4ND/W + one chunk; ``all`` at least c0 + 4ND (2 + 1/W) on EVERY rank (its shard, the
gathered parts, their concatenation). Rank 0 of ``main`` checks that it received every row.

    python benchmarks/bench_feature_gather.py                      # 128k and 512k x 2048
    python benchmarks/bench_feature_gather.py --sizes 16384 --dim 256
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_knn_scale import spawn_ranks  # noqa: E402  (benchmarks/)
from rendezvous import act_as_launcher  # noqa: E402  (benchmarks/)

from pretrain import dist as pdist  # noqa: E402

VARIANTS = ("all", "main", "shard")
GIB = 1024**3


def _shard(n: int, dim: int, rank: int, world: int) -> torch.Tensor:
    """Rows [start, stop) of the synthetic array: row i holds the value i in every column."""
    start, stop = pdist.shard_range(n, rank, world)
    return torch.arange(start, stop, dtype=torch.float32)[:, None].expand(-1, dim).contiguous()


def _worker(rank, world, port, cfg, out):
    act_as_launcher(rank, world, port)
    torch.set_num_threads(1)
    if world > 1:
        pdist.init_distributed("cpu")
    feats = _shard(cfg["n"], cfg["dim"], rank, world)
    t0 = time.perf_counter()
    ok = True
    if world > 1 and cfg["variant"] == "all":
        whole = pdist.all_gather_tensor(feats).cpu().numpy()
        ok = whole.shape == (cfg["n"], cfg["dim"]) and float(whole[-1, 0]) == cfg["n"] - 1
    elif world > 1 and cfg["variant"] == "main":
        sizes = pdist.gather_batch_sizes(feats.shape[0], torch.device("cpu"))
        whole = pdist.gather_rows_to_main(feats, sizes)
        if whole is not None:
            col = whole[:, 0]
            ok = bool(torch.equal(col, torch.arange(cfg["n"], dtype=torch.float32)))
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    Path(out, f"rank{rank}.json").write_text(json.dumps({"peak": peak, "s": seconds, "ok": ok}))
    if world > 1:
        pdist.barrier()
        pdist.cleanup()


def run(cfg: dict) -> list:
    """One variant on cfg["world"] fresh processes; the ranks' results."""
    return spawn_ranks(_worker, cfg)


def expected(variant: str, c0: float, n: int, dim: int, world: int, rank: int) -> float:
    """The per-rank peak (bytes) of the module docstring's model (``all``: its lower bound)."""
    whole, shard = 4.0 * n * dim, 4.0 * n * dim / world
    if variant == "shard" or world == 1:
        return c0 + shard
    if variant == "main":
        chunk = min(pdist.GATHER_CHUNK_BYTES, shard) * (world + 1 if rank == 0 else 1)
        return c0 + shard + (whole if rank == 0 else 0.0) + chunk
    return c0 + 2 * whole + shard


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[131072, 524288])
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument(
        "--max-total-gb",
        type=float,
        default=18.0,
        help="skip a run whose estimated resident memory in all exceeds this",
    )
    args = parser.parse_args()
    base = run(dict(n=args.sizes[0], dim=args.dim, world=1, variant="shard"))[0]
    c0 = base["peak"] - 4.0 * args.sizes[0] * args.dim
    print(
        f"features N x D={args.dim} float32 on W={args.world} gloo processes; per-rank peak "
        f"RSS (GiB) [expected], seconds; c0 = {c0 / GIB:.2f} GiB (1 process, N={args.sizes[0]})"
    )
    print("| N | variant | rank 0 peak | rank 1.. peak (max) | seconds | rows ok |")
    print("|---|---|---|---|---|---|")
    for n in args.sizes:
        for variant in VARIANTS:
            total = sum(expected(variant, c0, n, args.dim, args.world, r)
                        for r in range(args.world)) / GIB  # fmt: skip
            if total > args.max_total_gb:
                print(f"| {n} | {variant} | not run (needs ~{total:.0f} GiB) | | | |")
                continue
            res = run(dict(n=n, dim=args.dim, world=args.world, variant=variant))
            e = [expected(variant, c0, n, args.dim, args.world, r) / GIB for r in range(2)]
            rest = max(r["peak"] for r in res[1:]) / GIB
            print(f"| {n} | {variant} | {res[0]['peak'] / GIB:.2f} [{e[0]:.2f}] | "
                  f"{rest:.2f} [{e[1]:.2f}] | {max(r['s'] for r in res):.2f} | "
                  f"{all(r['ok'] for r in res)} |")  # fmt: skip
    n = 1_281_167
    for world in (8, 32):
        sh = expected("shard", c0, n, 2048, world, 1) / GIB
        m0 = expected("main", c0, n, 2048, world, 0) / GIB
        al = expected("all", c0, n, 2048, world, 1) / GIB
        print(f"ImageNet N={n}, D=2048, W={world}: shard {sh:.2f} GiB per rank; main {m0:.2f} "
              f"on rank 0, {expected('main', c0, n, 2048, world, 1) / GIB:.2f} on the others; "
              f"all >= {al:.1f} on every rank")  # fmt: skip


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""kNN at scale: per-rank peak memory and time, the gathered bank vs the sharded bank.

Synthetic banks of N x D float32 features (default N = 128k and 512k, D = 2048, 1,000 classes)
are voted on by Q queries (k = 20 and 200, T = 0.07) on W = 1 and 2 gloo processes, each
variant in fresh processes so that the peak resident memory (``ru_maxrss``) is its own:

- ``gathered`` (the evaluations' path before the sharded kNN): every rank generates its shard,
  all-gathers the whole N x D bank (``all_gather_tensor``, as ``extract_features`` does) and
  votes over it with the one-hot kNN (a (chunk, N) similarity block and a (chunk, k, C) one-hot);
- ``sharded`` (:func:`pretrain.probe.knn.knn_classify` with ``sharded=True``, the online probe's
  and ``imsvd-knn``'s path): every rank keeps its shard, finds its top-k candidates per query
  chunk over bank blocks, one gather merges them, the merged top-k are scatter-added;
- ``sharded_bf16`` (``--bf16``): the same with the shard normalised and stored in bf16
  (:func:`pretrain.probe.knn.bank_tensor`, ``knn.bank_precision=bf16``); its predictions are
  compared with ``sharded``'s and its top-1 printed (its peak includes the float32 shard it was made
  from: the saving is the bank's memory while voting, on CUDA the device copy).

Both variants' predictions are compared (the count of queries whose prediction differs is
printed: 0 expected, float32 rounding of near-ties aside). The peak of ``sharded`` follows
``P(N, W) = c0 + 4 N D / W`` bytes: the shard, plus ``c0`` for what does not grow with N (the
process with torch loaded, the queries, one normalised bank block with its similarity block and
int64 sort keys). ``c0`` is fitted on the first run, the formula is checked on the others,
then extrapolated to ImageNet (N = 1,281,167, D = 2048, W = 8 and 32). The gathered path
holds at least ``4 N D (2 + 1 / W)`` bytes per rank (its shard, the gathered parts, their
concatenation).

    python benchmarks/bench_knn_scale.py                       # 128k and 512k (needs ~20 GB)
    python benchmarks/bench_knn_scale.py --sizes 32768 65536   # a quick check
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rendezvous import act_as_launcher, free_port  # noqa: E402  (benchmarks/)

from pretrain import dist as pdist  # noqa: E402
from pretrain.probe.knn import bank_tensor, knn_classify  # noqa: E402

KS = (20, 200)
GIB = 1024**3


def gathered_knn(bank, labels, queries, ks, temperature, n_cls, chunk):
    """The one-hot vote over the whole bank on every rank (the implementation before the
    sharded kNN, kept here as the reference)."""
    bank = F.normalize(torch.as_tensor(bank, dtype=torch.float32), dim=1)
    labels = torch.as_tensor(labels, dtype=torch.long)
    queries = torch.as_tensor(queries, dtype=torch.float32)
    kmax = min(max(ks), bank.shape[0])
    preds = {k: [] for k in ks}
    for start in range(0, queries.shape[0], chunk):
        q = F.normalize(queries[start : start + chunk], dim=1)
        sim, idx = (q @ bank.T).topk(kmax, dim=1)
        weight = ((sim.double() - sim[:, :1].double()) / temperature).exp().float()
        onehot = F.one_hot(labels[idx], n_cls).to(weight.dtype)
        for k in preds:
            votes = (onehot[:, :k] * weight[:, :k, None]).sum(1)
            preds[k].append(votes.argmax(1))
    return {k: torch.cat(v).numpy() for k, v in preds.items()}


def make_shard(n: int, dim: int, rank: int, world: int, classes: int):
    """This rank's contiguous rows of the synthetic bank: class centres plus noise, generated
    block by block from (seed, block) so every world size sees the same bank."""
    start, stop = pdist.shard_range(n, rank, world)
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(0))
    block = 8192
    feats = torch.empty(stop - start, dim)
    labels = torch.empty(stop - start, dtype=torch.long)
    for b0 in range(start // block * block, stop, block):
        g = torch.Generator().manual_seed(1 + b0 // block)
        lab = torch.randint(0, classes, (block,), generator=g)
        rows = centres[lab] + 2.0 * torch.randn(block, dim, generator=g)
        lo, hi = max(b0, start), min(b0 + block, stop)
        feats[lo - start : hi - start] = rows[lo - b0 : hi - b0]
        labels[lo - start : hi - start] = lab[lo - b0 : hi - b0]
    return feats, labels, centres


def _worker(rank, world, port, cfg, out):
    act_as_launcher(rank, world, port)
    torch.set_num_threads(max(1, cfg["threads"] // world))
    if world > 1:
        pdist.init_distributed("cpu")
    feats, labels, centres = make_shard(cfg["n"], cfg["dim"], rank, world, cfg["classes"])
    g = torch.Generator().manual_seed(99)
    qlab = torch.randint(0, cfg["classes"], (cfg["queries"],), generator=g)
    queries = centres[qlab] + 2.0 * torch.randn(cfg["queries"], cfg["dim"], generator=g)
    t0 = time.perf_counter()
    if cfg["variant"] == "gathered":
        if world > 1:
            feats = pdist.all_gather_tensor(feats)
            labels = pdist.all_gather_tensor(labels)
        preds = gathered_knn(feats, labels, queries, KS, 0.07, cfg["classes"], cfg["chunk"])
    else:
        if cfg["variant"] == "sharded_bf16":  # the normalised shard in bf16, float32 freed
            feats = bank_tensor(feats, "bf16")
        preds = knn_classify(feats, labels, queries, ks=KS, num_classes=cfg["classes"],
                             chunk_size=cfg["chunk"], sharded=world > 1)  # fmt: skip
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    acc = {k: float((torch.as_tensor(p) == qlab).float().mean()) * 100 for k, p in preds.items()}
    Path(out, f"rank{rank}.json").write_text(json.dumps({
        "peak": peak, "seconds": seconds, "acc": acc,
        "preds": {k: np.asarray(p).tolist() for k, p in preds.items()},
    }))  # fmt: skip
    if world > 1:
        pdist.barrier()
        pdist.cleanup()


def spawn_ranks(worker, cfg: dict) -> list:
    """``worker(rank, world, port, cfg, out)`` on cfg["world"] fresh processes (their peak
    memory their own); the ranks' results, read from ``out/rank<r>.json``."""
    port = free_port()
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(worker, args=(cfg["world"], port, cfg, out), nprocs=cfg["world"], join=True)
        return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(cfg["world"])]


def run(cfg: dict) -> list:
    """One variant on cfg["world"] fresh processes; the ranks' results."""
    return spawn_ranks(_worker, cfg)


def model_bytes(c0: float, n: int, world: int, dim: int) -> float:
    """The sharded kNN's per-rank peak (bytes) by the formula in the module docstring."""
    return c0 + 4 * n * dim / world


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[131072, 524288])
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--queries", type=int, default=512)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bf16", action="store_true", help="also the bf16 bank (sharded_bf16)")
    parser.add_argument(
        "--max-gathered-gb",
        type=float,
        default=18.0,
        help="skip a gathered run whose estimated total resident memory exceeds this",
    )
    return parser.parse_args()


def _differing(a: dict, b: dict) -> dict:
    """Per k, how many of two runs' predictions differ."""
    return {k: int(np.sum(np.array(a[k]) != np.array(b[k]))) for k in a}


def measure(args: argparse.Namespace, n: int, world: int) -> dict:
    """The variants (gathered, sharded, sharded_bf16) at bank size ``n`` over ``world`` ranks:
    {variant: per-rank results, or None when not run}; prints the bf16 bank's line."""
    res = {}
    for variant in ("gathered", "sharded", "sharded_bf16"):
        if variant == "sharded_bf16" and not args.bf16:
            res[variant] = None
            continue
        est = world * 4 * n * args.dim * (2 + 1 / world) / GIB
        if variant == "gathered" and est > args.max_gathered_gb:
            res[variant] = None  # would not fit this machine's memory
            continue
        res[variant] = run(dict(vars(args), n=n, world=world, variant=variant))
    if res["sharded_bf16"] is not None:
        a, b = res["sharded_bf16"][0], res["sharded"][0]
        n_diff = _differing(a["preds"], b["preds"])
        print(
            f"N={n} W={world} bf16 bank: top-1 k=20 {a['acc']['20']:.2f} vs fp32 "
            f"{b['acc']['20']:.2f}, k=200 {a['acc']['200']:.2f} vs {b['acc']['200']:.2f}; "
            f"predictions differing {n_diff['20']}/{n_diff['200']}; "
            f"{max(r['seconds'] for r in res['sharded_bf16']):.1f} s"
        )
    return res


def print_table(args: argparse.Namespace, rows: list, c0: float) -> None:
    """The markdown table of the measured rows and the ImageNet-scale estimates."""
    print(
        f"kNN, D={args.dim}, {args.queries} queries, {args.classes} classes, k={list(KS)}, "
        f"chunk {args.chunk}, {args.threads} threads in all; per-rank peak RSS (GiB)"
    )
    print(
        "| N | W | gathered peak | gathered s | sharded peak | sharded s | formula (error) "
        "| predictions differing (k=20/200) | top-1 k=20 |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for n, world, gathered, sharded, peak, differ in rows:
        gp = f"{max(r['peak'] for r in gathered) / GIB:.2f}" if gathered else "not run (RAM)"
        gs = f"{max(r['seconds'] for r in gathered):.1f}" if gathered else "-"
        ss = max(r["seconds"] for r in sharded)
        predicted = model_bytes(c0, n, world, args.dim)
        err = 100 * (predicted - peak) / peak
        dif = f"{differ['20']}/{differ['200']}" if differ else "-"
        print(
            f"| {n} | {world} | {gp} | {gs} | {peak / GIB:.2f} | {ss:.1f} | "
            f"{predicted / GIB:.2f} ({err:+.1f}%) | {dif} | {sharded[0]['acc']['20']:.2f} |"
        )
    print(f"fitted c0 = {c0 / GIB:.2f} GiB (process, torch, queries, one bank block)")
    n = 1_281_167
    for world in (8, 32):
        new = model_bytes(c0, n, world, 2048) / GIB
        old = 4 * n * 2048 * (2 + 1 / world) / GIB
        print(
            f"ImageNet N={n}, D=2048, W={world}: sharded {new:.2f} GiB per rank "
            f"(shard {4 * n * 2048 / world / GIB:.2f}); gathered >= {old:.1f} GiB per rank"
        )


def main() -> None:
    args = parse_args()
    rows, c0 = [], None
    for n in args.sizes:
        for world in (1, 2):
            res = measure(args, n, world)
            sharded = res["sharded"]
            peak = max(r["peak"] for r in sharded)
            if c0 is None:
                c0 = peak - model_bytes(0.0, n, world, args.dim)
            differ = None
            if res["gathered"] is not None:
                differ = _differing(res["gathered"][0]["preds"], sharded[0]["preds"])
            rows.append((n, world, res["gathered"], sharded, peak, differ))
    print_table(args, rows, c0)


if __name__ == "__main__":
    main()

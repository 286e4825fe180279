#!/usr/bin/env python3
"""Small-scale study runner: pretraining variants on Fashion-MNIST, compared by the kNN probe.

Each variant is a list of dotted overrides of a base recipe (default: the demo recipe). Runs go
one after another (two cores: parallel torch jobs thrash), each in its own output folder under
``--out``; a finished run (its ``backbone_final.pth`` exists) is not run again, an interrupted one
resumes. The probe is the online kNN probe on a seeded split of the TRAIN folder (the recipe's
``eval.bank_size`` / ``eval.query_size``: 5,000 / 1,000 in the demo recipe), so choices never
look at the test split. Afterwards the table of the last probe of
each run (kNN top-1 k=20, training seconds, steps) is printed and written to ``--out``/study.json.

    python benchmarks/study.py --variants b10 b10_bn --steps 300
    python benchmarks/study.py --list
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# name -> overrides of the base recipe (the demo recipe: B = 10, zero-init residual, SGD 0.3,
# out_norm bn, TI weight 3). Every IMSVD variant starts from the paper's head and loss weights
# (no output norm, TI weight 1) and names what it changes; beyond the paper: out_norm, TI weight,
# B < 32 at this batch size.
PAPER_HEAD = ["loss.bin_size=10", "model.out_norm=none", "loss.ti_coeff=1.0"]
# the baselines: their papers' LARS settings, projector 1024-1024, no output norm
BASELINE = [
    "model.out_norm=none",
    "optim.name=lars",
    "optim.base_lr=0.2",
    'model.projector="1024-1024"',
]
VARIANTS: dict[str, list[str]] = {
    "demo": [],
    "demo_b80": [*PAPER_HEAD, "loss.bin_size=80"],
    "b10": PAPER_HEAD,
    "b10_bn": [*PAPER_HEAD, "model.out_norm=bn"],
    "b10_bn_ti3": [*PAPER_HEAD, "model.out_norm=bn", "loss.ti_coeff=3.0"],
    "b10_ti3": [*PAPER_HEAD, "loss.ti_coeff=3.0"],
    "b10_lars": [*PAPER_HEAD, "optim.name=lars", "optim.base_lr=0.6"],
    "b10_lr06": [*PAPER_HEAD, "optim.base_lr=0.6"],
    "b10_lr015": [*PAPER_HEAD, "optim.base_lr=0.15"],
    "b10_t05": [*PAPER_HEAD, "loss.temperature=0.5"],
    "b10_32px": [*PAPER_HEAD, "data.image_size=32"],
    "b10_nozero": [*PAPER_HEAD, "model.zero_init_residual=false"],
    "b16": [*PAPER_HEAD, "loss.bin_size=16", 'model.projector="1024-1024"'],
    "b5": [*PAPER_HEAD, "loss.bin_size=5"],
    "b10_warm": [*PAPER_HEAD, "optim.warmup_epochs=0.5"],
    "b10_d2080": [*PAPER_HEAD, 'model.projector="1024-2080"'],
    "b10_bs128": [*PAPER_HEAD, "train.batch_size=128"],
    # changes of the demo recipe itself
    "demo_t05": ["loss.temperature=0.5"],
    "demo_t025": ["loss.temperature=0.25"],
    "demo_crop08": ["data.crop_scale=[0.08,1.0]"],
    "demo_crop05": ["data.crop_scale=[0.5,1.0]"],
    "demo_bs128": ["train.batch_size=128"],
    "vicreg": ["loss.name=vicreg", *BASELINE],
    "barlowtwins": ["loss.name=barlowtwins", *BASELINE],
}


def run_variant(name: str, overrides: list[str], args: argparse.Namespace) -> dict:
    out = Path(args.out) / name
    cmd = [
        sys.executable,
        "-m",
        "pretrain.main",
        "--config",
        args.config,
        f"data.root={args.data_root}",
        f"train.max_steps={args.steps}",
        f"train.epochs={args.epochs}",
        f"eval.every_steps={args.probe_every}",
        f"checkpoint.output_dir={out}",
        "checkpoint.every_steps=0",
        *overrides,
        *args.extra,
    ]
    if not (out / "backbone_final.pth").exists():
        print(f"[study] {name}: {' '.join(overrides) or '(base recipe)'}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call(cmd, cwd=ROOT)
        print(f"[study] {name}: exit {rc} after {time.perf_counter() - t0:.0f} s", flush=True)
        if rc != 0:
            return {"name": name, "status": f"exit {rc}"}
    return summarise(name, out / "metrics.jsonl", overrides)


def summarise(name: str, metrics: Path, overrides: list[str]) -> dict:
    """Last probe and its curve from a run's metrics.jsonl."""
    curve, last_loss = [], {}
    for line in metrics.read_text().splitlines():
        row = json.loads(line)
        if "knn/top1_k20" in row:
            curve.append((row["step"], round(row["knn/top1_k20"], 2), row.get("train_seconds")))
        elif "loss" in row:
            last_loss = {k: v for k, v in row.items() if k.startswith("loss") or k == "mon/argmax"}
    final = curve[-1] if curve else (None, None, None)
    return {
        "name": name,
        "overrides": overrides,
        "steps": final[0],
        "knn_top1_k20": final[1],
        "best_knn_top1_k20": max((c[1] for c in curve), default=None),
        "train_seconds": final[2],
        "curve": curve,
        "last_losses": last_loss,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", nargs="*", default=["demo_b80", "b10"])
    p.add_argument("--config", default="configs/pretrain/imsvd_demo.yaml")
    p.add_argument("--data-root", default=str(ROOT / ".cache/fashion_mnist/train"))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--probe-every", type=int, default=100)
    p.add_argument("--out", default=str(ROOT / "outputs/study"))
    p.add_argument("--list", action="store_true", help="print the variants and exit")
    p.add_argument("extra", nargs="*", help="overrides applied to every variant")
    args = p.parse_args(argv)
    if args.list:
        for k, v in VARIANTS.items():
            print(f"{k:14s} {' '.join(v)}")
        return 0
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; see --list")
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    rows = [run_variant(v, VARIANTS[v], args) for v in args.variants]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    previous = {}
    if (out / "study.json").exists():
        previous = {r["name"]: r for r in json.loads((out / "study.json").read_text())}
    previous.update({r["name"]: r for r in rows})
    (out / "study.json").write_text(json.dumps(list(previous.values()), indent=1))
    print(f"\n{'variant':14s} {'steps':>6s} {'kNN k=20':>9s} {'best':>6s} {'train s':>8s}")
    for r in previous.values():
        print(
            f"{r['name']:14s} {r.get('steps') or '-':>6} {r.get('knn_top1_k20') or '-':>9} "
            f"{r.get('best_knn_top1_k20') or '-':>6} {round(r.get('train_seconds') or 0):>8}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""GPU check: IMSVD, VICReg and Barlow Twins on Fashion-MNIST for tens of epochs each.

Meant for one short run on a GPU machine (about 10 minutes in all on a recent GPU): each
method pretrains the demo network (ResNet-18, small_s2 stem, 32 px) with the fast data pipeline
and bf16 autocast for ``--epochs`` epochs, with the online kNN probe (bank 10k / queries 2k of
a seeded split of the TRAIN folder) every ``--probe-every`` steps; then the final backbones are
evaluated once on the demo's test protocol (bank = first 10,000 train images, queries = first
2,000 test images) and the learning curves are drawn.

    python benchmarks/gpu_methods.py --data-dir DIR_WITH_IDX_GZ --out outputs/gpu_methods \
        [--epochs 30] [--methods imsvd vicreg barlowtwins] [--dry-run]

``--data-dir`` holds the four Fashion-MNIST idx .gz files (the Debian package's folder; copy it
along when the GPU machine has no such package). ``--dry-run`` runs 3 steps per method on the CPU
to check the wiring. Results: OUT/results.json, OUT/curves.png, one run folder per method.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pretrain.curves import plot_curves  # noqa: E402
from pretrain.data.fashion_mnist import export_image_tree  # noqa: E402
from pretrain.models.build import model_from_checkpoint  # noqa: E402
from pretrain.probe.online import indexed_folder_knn  # noqa: E402

# Every method states its head: the demo recipe's output norm and TI weight 3 (beyond the paper)
# are switched off, so IMSVD runs with the paper's head and loss weights.
_PLAIN = ["model.out_norm=none"]
METHODS = {
    "imsvd": ["loss.name=imsvd", "loss.bin_size=10", "loss.ti_coeff=1.0", *_PLAIN],
    "vicreg": ["loss.name=vicreg", "optim.name=lars", "optim.base_lr=0.2", *_PLAIN],
    "barlowtwins": ["loss.name=barlowtwins", "optim.name=lars", "optim.base_lr=0.2", *_PLAIN],
}
# the same network and views for every method; the baselines' own projector shape
PROJECTOR = {"imsvd": "1024-1040", "vicreg": "1024-1024", "barlowtwins": "1024-1024"}


def method_command(name: str, args: argparse.Namespace, tree: Path, run: Path) -> list[str]:
    """The ``pretrain.main`` command line of method ``name`` (GPU, or ``--dry-run``: CPU)."""
    cmd = [
        sys.executable,
        "-m",
        "pretrain.main",
        "--config",
        str(ROOT / "configs/pretrain/imsvd_demo.yaml"),
        f"data.root={tree / 'train'}",
        f"checkpoint.output_dir={run}",
        f"model.projector={PROJECTOR[name]}",
        f"train.epochs={args.epochs}",
        f"train.batch_size={args.batch_size}",
        "data.image_size=32",
        "eval.bank_size=10000",
        "eval.query_size=2000",
        "train.max_steps=-1",
        f"eval.every_steps={args.probe_every}",
        "checkpoint.every_steps=0",
        "checkpoint.every_epochs=5",
        "log.every_steps=50",
        *METHODS[name],
    ]
    if args.dry_run:
        cmd += ["train.max_steps=3", "train.device=cpu", "eval.every_steps=3"]
        cmd += ["eval.bank_size=200", "eval.query_size=100", "data.num_workers=0"]
    else:
        cmd += ["train.precision=bf16", "data.pipeline=fast", "data.num_workers=12"]
        cmd += ["train.channels_last=true", "train.device=cuda"]
    return cmd


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--out", default=str(ROOT / "outputs/gpu_methods"))
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--probe-every", type=int, default=1000)
    p.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--dry-run", action="store_true", help="3 CPU steps per method")
    args = p.parse_args(argv)
    out = Path(args.out)
    tree = export_image_tree(out / "fashion_mnist", Path(args.data_dir))
    results: dict[str, dict] = {}
    for name in args.methods:
        t0 = time.perf_counter()
        rc = subprocess.call(method_command(name, args, tree, out / name), cwd=ROOT)
        results[name] = {"exit": rc, "seconds": round(time.perf_counter() - t0, 1)}
        print(f"[gpu_methods] {name}: exit {rc} in {results[name]['seconds']} s", flush=True)
    for name in args.methods:
        final = out / name / "backbone_final.pth"
        if final.is_file():
            n_bank, n_test = (200, 100) if args.dry_run else (10000, 2000)
            backbone = model_from_checkpoint(final)[0]
            results[name]["test_knn"] = indexed_folder_knn(
                backbone, tree / "train", tree / "test", n_bank, n_test, size=32
            )
    runs = [out / m for m in args.methods if (out / m / "metrics.jsonl").is_file()]
    if runs:
        plot_curves(runs, out / "curves.png", labels=[r.name for r in runs])
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))
    return 0 if all(r["exit"] == 0 for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

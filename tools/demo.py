#!/usr/bin/env python3
"""The README demo: IMSVD pretraining on Fashion-MNIST on a CPU, then a kNN evaluation.

Steps: make sure Fashion-MNIST is installed (Debian package), export it once to an image tree,
pretrain a small ResNet-18 with IMSVD (configs/pretrain/imsvd_demo.yaml), then report weighted
kNN top-1 (cosine, T=0.07) on the test split for raw pixels, the network at random
initialisation and the pretrained network, side by side.

    python tools/demo.py [--bank 10000] [--test 2000] [key.sub=value overrides of the recipe]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from install_fashion_mnist import DatasetMissingError, ensure_installed  # noqa: E402  (tools/)

from pretrain.checkpoint import model_from_checkpoint  # noqa: E402
from pretrain.config import ConfigError, load_config  # noqa: E402
from pretrain.data import build_image_dataset  # noqa: E402
from pretrain.fashion_mnist import DEFAULT_DIR, export_image_tree, load_split  # noqa: E402
from pretrain.log import print_table, write_json_atomic  # noqa: E402
from pretrain.transforms import eval_transform  # noqa: E402
from transfer.eval.features import extract_features  # noqa: E402
from transfer.eval.knn import knn_accuracy  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs/pretrain/imsvd_demo.yaml"))
    p.add_argument(
        "--data-dir", default=str(DEFAULT_DIR), help="Fashion-MNIST idx files (Debian package)"
    )
    p.add_argument(
        "--data-cache",
        default=str(ROOT / ".cache/fashion_mnist"),
        help="where the image tree is exported",
    )
    p.add_argument("--bank", type=int, default=10000, help="kNN bank: first N train images")
    p.add_argument("--test", type=int, default=2000, help="first N test images")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides of the recipe")
    return p.parse_args(argv)


def _raw_pixel_knn(data_dir: Path, bank: int, test: int) -> dict:
    xtr, ytr = load_split("train", data_dir)
    xte, yte = load_split("test", data_dir)
    bank, test = min(bank, len(ytr)), min(test, len(yte))
    xtr = xtr[:bank].reshape(bank, -1).astype(np.float32)
    xte = xte[:test].reshape(test, -1).astype(np.float32)
    mean = xtr.mean(axis=0, keepdims=True)
    return knn_accuracy(xtr - mean, ytr[:bank], xte - mean, yte[:test], ks=(20, 200))


def _features_knn(
    weights: str | None, cfg: dict, tree: Path, bank: int, test: int, zero_init: bool = True
) -> dict:
    """kNN top-1 of a backbone (from a checkpoint, or at random init when weights is None).

    ``zero_init`` (random init only): zero the last BN gamma of each residual block, as the
    recipe does (the run's starting point); False gives torchvision's default initialisation.
    """
    size = cfg["data"]["image_size"]
    tf = eval_transform(resize=size, crop=size)
    train_ds = build_image_dataset(root=str(tree / "train"), transform=tf)
    test_ds = build_image_dataset(root=str(tree / "test"), transform=tf)
    if weights is None:
        from pretrain.model import build_backbone

        torch.manual_seed(cfg["train"]["seed"])  # the same initial weights the run started from
        model = build_backbone(cfg["model"]["arch"], zero_init, cfg["model"]["stem"])
    else:
        model, _, _ = model_from_checkpoint(weights, device=torch.device("cpu"))
    model.eval()
    # the exported tree's file names are the idx indices: keep the first N of each split
    bank_idx = _indices_below(train_ds, bank)
    test_idx = _indices_below(test_ds, test)
    ftr, ytr = extract_features(model, torch.utils.data.Subset(train_ds, bank_idx), batch_size=256)
    fte, yte = extract_features(model, torch.utils.data.Subset(test_ds, test_idx), batch_size=256)
    return knn_accuracy(ftr, ytr, fte, yte, ks=(20, 200))


def _indices_below(ds, n: int) -> list[int]:
    return [i for i, (path, _) in enumerate(ds.samples) if int(Path(path).stem) < n]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    try:
        data_dir = ensure_installed(Path(args.data_dir))
    except DatasetMissingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    tree = export_image_tree(Path(args.data_cache), data_dir)
    try:
        cfg = load_config(args.config, [f"data.root={tree / 'train'}", *args.overrides])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"[demo] Fashion-MNIST image tree: {tree} ({time.perf_counter() - t0:.0f} s)")

    from pretrain.engine import train

    t1 = time.perf_counter()
    summary = train(cfg)
    t_train = time.perf_counter() - t1
    if summary["status"] != "finished":
        print(f"[demo] pretraining {summary['status']} at step {summary['step']}; rerun to resume")
        return 1
    print(f"[demo] pretraining took {t_train / 60:.1f} min")

    t2 = time.perf_counter()
    rows = []
    results = {}
    zero_init = cfg["model"]["zero_init_residual"]
    runs = [
        ("raw pixels (mean-centred)", lambda: _raw_pixel_knn(data_dir, args.bank, args.test)),
        (
            "ResNet, random init (the run's start)",
            lambda: _features_knn(None, cfg, tree, args.bank, args.test, zero_init),
        ),
    ]
    if zero_init:  # also the plain torchvision init, a stronger random-feature baseline
        runs.append(
            (
                "ResNet, random init (torchvision)",
                lambda: _features_knn(None, cfg, tree, args.bank, args.test, False),
            )
        )
    runs.append(
        (
            "ResNet after IMSVD",
            lambda: _features_knn(summary["backbone"], cfg, tree, args.bank, args.test),
        )
    )
    for name, fn in runs:
        res = fn()
        results[name] = res
        rows.append(
            {"features": name, "kNN top-1 k=20 (%)": res["top1_k20"], "k=200 (%)": res["top1_k200"]}
        )
    t_eval = time.perf_counter() - t2
    print_table(
        rows,
        title=f"\nFashion-MNIST weighted kNN (cosine, T=0.07), bank = first "
        f"{args.bank} train images, test = first {args.test} test images",
    )
    out = Path(cfg["checkpoint"]["output_dir"])
    report = {
        "knn": results,
        "bank": args.bank,
        "test": args.test,
        "steps": summary["step"],
        "pretrain_minutes": round(t_train / 60, 2),
        "eval_minutes": round(t_eval / 60, 2),
        "backbone": summary["backbone"],
    }
    write_json_atomic(report, out / "demo_results.json")
    print(
        f"\n[demo] checkpoint: {summary['backbone']}\n[demo] results: {out / 'demo_results.json'}"
        f"\n[demo] total {(time.perf_counter() - t0) / 60:.1f} min"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

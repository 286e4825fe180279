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

from pretrain.checkpoint import latest_checkpoint, load_training_state  # noqa: E402
from pretrain.config import load_config  # noqa: E402
from pretrain.curves import plot_curves  # noqa: E402
from pretrain.data.datasets import build_image_dataset  # noqa: E402
from pretrain.data.fashion_mnist import DEFAULT_DIR, export_image_tree, load_split  # noqa: E402
from pretrain.engine.trainer import train  # noqa: E402
from pretrain.errors import IMSVDError  # noqa: E402
from pretrain.fileio import write_json_atomic  # noqa: E402
from pretrain.log import print_table  # noqa: E402
from pretrain.losses.monitors import soft_codes  # noqa: E402
from pretrain.models.backbone import build_backbone  # noqa: E402
from pretrain.models.build import build_model, model_from_checkpoint  # noqa: E402
from pretrain.probe.knn import knn_accuracy  # noqa: E402
from pretrain.probe.online import (  # noqa: E402
    KNNProbe,
    first_by_index,
    indexed_folder_knn,
    load_probe_set,
)
from transfer.analysis.codes import CodeStatsAccumulator  # noqa: E402


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


def _backbone(weights: str | None, cfg: dict, zero_init: bool = True) -> torch.nn.Module:
    """The pretrained backbone, or the network at random initialisation when weights is None.

    ``zero_init`` (random init only): zero the last BN gamma of each residual block, as the
    recipe does (the run's starting point); False gives torchvision's default initialisation.
    """
    if weights is None:
        torch.manual_seed(cfg["train"]["seed"])  # the same initial weights the run started from
        return build_backbone(cfg["model"]["arch"], zero_init, cfg["model"]["stem"])
    return model_from_checkpoint(weights, device=torch.device("cpu"))[0]


def _code_stats(out: Path, cfg: dict, tree: Path, test: int) -> dict | None:
    """Statistics of the discrete codes of the test queries (IMSVD runs only).

    The whole trained model (backbone, projector and any output norm) comes from the run's last
    training state; the definitions are those of transfer.analysis (CodeStatsAccumulator).
    """
    if cfg["loss"]["name"] != "imsvd":
        return None
    model = build_model(cfg["model"])
    model.load_state_dict(load_training_state(latest_checkpoint(out))["model"])
    ds = build_image_dataset(root=str(tree / "test"))
    queries = load_probe_set(first_by_index(ds.samples, test), cfg["data"]["image_size"], "test")
    z = KNNProbe(queries, queries).features(model.eval(), queries.images)
    b = cfg["loss"]["bin_size"]
    acc = CodeStatsAccumulator(z.shape[1] // b, b)
    acc.update(soft_codes(z, b, cfg["loss"]["temperature"]))
    s = acc.summary()
    return {
        "argmax_marginal_entropy": s["hard_marginal_entropy_mean"],
        "log_bin_size": s["log_bin_size"],
        "active_units_mean": s["active_units_mean"],
        "onehot_0.9": s["onehot_0.9"],
        "onehot_0.99": s["onehot_0.99"],
        "num_images": s["num_images"],
    }


def _knn_table(
    args: argparse.Namespace, cfg: dict, tree: Path, data_dir: Path, backbone: str, name: str
) -> dict:
    """Weighted kNN top-1 of raw pixels, the random-init backbone(s) and the pretrained one:
    ``{row label: knn results}`` in the printed order."""
    size = cfg["data"]["image_size"]
    zero_init = cfg["model"]["zero_init_residual"]
    runs = [("raw pixels (mean-centred)", None)]
    runs.append(
        ("ResNet-18, random init (the run's start)", lambda: _backbone(None, cfg, zero_init))
    )
    if zero_init:  # also the plain torchvision init, a stronger random-feature baseline
        runs.append(("ResNet-18, random init (torchvision)", lambda: _backbone(None, cfg, False)))
    runs.append((f"ResNet-18 after {name}", lambda: _backbone(backbone, cfg)))
    results = {}
    for label, make in runs:
        if make is None:
            results[label] = _raw_pixel_knn(data_dir, args.bank, args.test)
        else:
            results[label] = indexed_folder_knn(
                make(), tree / "train", tree / "test", args.bank, args.test, size=size
            )
    return results


def _print_results(results: dict, codes: dict | None, bank: int, test: int) -> None:
    """The kNN table and the line on the test images' discrete codes."""
    print_table(
        [
            {"features": k, "kNN top-1 k=20 (%)": v["top1_k20"], "k=200 (%)": v["top1_k200"]}
            for k, v in results.items()
        ],
        title=f"\nFashion-MNIST weighted kNN (cosine, T=0.07), bank = first "
        f"{bank} train images, test = first {test} test images",
    )
    if codes:
        print(
            f"\n[demo] codes of the {codes['num_images']} test images: argmax-marginal entropy "
            f"{codes['argmax_marginal_entropy']:.3f} nats (log B = {codes['log_bin_size']:.3f}; "
            f"{codes['active_units_mean']:.1f} units in use per variable), sub-vectors with max "
            f"> 0.9: {100 * codes['onehot_0.9']:.1f}%"
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    try:
        data_dir = ensure_installed(Path(args.data_dir))
    except DatasetMissingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        tree = export_image_tree(Path(args.data_cache), data_dir)
        cfg = load_config(args.config, [f"data.root={tree / 'train'}", *args.overrides])
    except IMSVDError as e:  # a malformed idx file, a bad config or override
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"[demo] Fashion-MNIST image tree: {tree} ({time.perf_counter() - t0:.0f} s)")
    method = {"imsvd": "IMSVD", "vicreg": "VICReg", "barlowtwins": "Barlow Twins"}
    name = method[cfg["loss"]["name"]]
    t1 = time.perf_counter()
    try:
        summary = train(cfg)
    except IMSVDError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t_train = time.perf_counter() - t1
    if summary["status"] != "finished":
        print(f"[demo] pretraining {summary['status']} at step {summary['step']}; rerun to resume")
        return 1
    print(f"[demo] pretraining took {t_train / 60:.1f} min")

    t2 = time.perf_counter()
    results = _knn_table(args, cfg, tree, data_dir, summary["backbone"], name)
    out = Path(cfg["checkpoint"]["output_dir"])
    codes = _code_stats(out, cfg, tree, args.test)
    t_eval = time.perf_counter() - t2
    _print_results(results, codes, args.bank, args.test)
    curves = None
    if cfg["eval"]["every_steps"] > 0:
        refs = [(k, v["top1_k20"]) for k, v in results.items() if "after" not in k]
        curves = plot_curves([out], out / "curves.png", labels=[name], refs=refs[:1] + refs[-1:])
    report = {
        "method": cfg["loss"]["name"],
        "knn": results,
        "codes": codes,
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
        + (f"\n[demo] learning curves: {curves}" if curves else "")
        + f"\n[demo] total {(time.perf_counter() - t0) / 60:.1f} min"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

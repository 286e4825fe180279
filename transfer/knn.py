"""Weighted k-nearest-neighbour classification of frozen features (PROTOCOLS section 3).

    python -m transfer.knn --weights W --train-root TRAIN --val-root VAL --output-dir OUT
    torchrun --nproc_per_node 8 -m transfer.knn --weights W --train-root ... --val-root ...

Features are L2-normalised; each test sample votes over its k most cosine-similar training
samples with weights exp(sim / T), T = 0.07, k = 20 and 200. Extraction is sharded over
processes but the vote always uses the features of the WHOLE train set (gathered), never a
per-shard bank. Results (top-1 in percent per k) go to OUT/knn_results.json (OUT defaults to
the config's output_dir, outputs/knn); the log says where.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pretrain.config import ConfigError

logger = logging.getLogger("imsvd.knn")

RESULTS_NAME = "knn_results.json"


def knn_classify(
    train_feats: np.ndarray | torch.Tensor,
    train_labels: np.ndarray | torch.Tensor,
    test_feats: np.ndarray | torch.Tensor,
    ks: Sequence[int] = (20, 200),
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
    device: str | torch.device = "cpu",
) -> dict:
    """Weighted cosine k-NN predictions.

    Args:
        train_feats: (N, D) bank features (normalised here).
        train_labels: (N,) integer labels.
        test_feats: (M, D) query features.
        ks: neighbour counts (each capped at N).
        temperature: vote weight exp(sim / temperature).
        num_classes: label count (default: max label + 1).
        chunk_size: query rows per similarity block (bounds memory to chunk_size x N).
        device: where the similarity products run.
    Returns:
        {k: (M,) int64 numpy predictions} for each k in ks.
    """
    if temperature <= 0:
        raise ValueError(f"kNN temperature must be positive, got {temperature}")
    bank = F.normalize(torch.as_tensor(train_feats, dtype=torch.float32, device=device), dim=1)
    labels = torch.as_tensor(train_labels, dtype=torch.long, device=device)
    queries = torch.as_tensor(test_feats, dtype=torch.float32)
    if bank.ndim != 2 or queries.ndim != 2 or bank.shape[1] != queries.shape[1]:
        raise ValueError(f"kNN: bank {tuple(bank.shape)} and queries {tuple(queries.shape)} differ")
    if labels.shape[0] != bank.shape[0] or bank.shape[0] == 0:
        raise ValueError(f"kNN: {bank.shape[0]} bank rows but {labels.shape[0]} labels")
    if not ks or any(int(k) <= 0 for k in ks):
        raise ValueError(f"kNN: ks must be positive integers, got {list(ks)}")
    n_cls = int(num_classes) if num_classes else int(labels.max()) + 1
    kmax = min(max(int(k) for k in ks), bank.shape[0])
    preds: dict[int, list[torch.Tensor]] = {int(k): [] for k in ks}
    for start in range(0, queries.shape[0], chunk_size):
        q = F.normalize(queries[start : start + chunk_size].to(device), dim=1)
        sim, idx = (q @ bank.T).topk(kmax, dim=1)  # sorted, descending
        weight = (sim / temperature).exp()
        onehot = F.one_hot(labels[idx], n_cls).to(weight.dtype)  # (m, kmax, C)
        for k in preds:
            kk = min(k, kmax)
            votes = (onehot[:, :kk] * weight[:, :kk, None]).sum(1)
            preds[k].append(votes.argmax(1).cpu())
    return {k: torch.cat(v).numpy() if v else np.zeros(0, np.int64) for k, v in preds.items()}


def knn_accuracy(
    train_feats, train_labels, test_feats, test_labels, ks=(20, 200), temperature=0.07, **kw
) -> dict:
    """Top-1 accuracy (percent) per k of :func:`knn_classify`.

    Returns:
        {"top1_k20": float, "top1_k200": float, ...}.
    """
    preds = knn_classify(train_feats, train_labels, test_feats, ks, temperature, **kw)
    y = np.asarray(test_labels)
    return {f"top1_k{k}": 100.0 * float((p == y).mean()) for k, p in preds.items()}


def run(cfg: dict) -> dict:
    """kNN evaluation from a resolved config (knn.yaml schema).

    Val labels follow the train split's class names (:func:`pretrain.data.
    build_train_val_datasets`); unreadable images are left out and counted (``data.strict``:
    fail instead). The results JSON goes to ``output_dir/knn_results.json`` (``output_dir``
    defaults to the config's ``outputs/knn``); when that folder cannot be written the results
    are still printed and the reason is logged.

    Returns:
        The results dict (top-1 in percent per k, counts, unreadable images per split); every
        rank computes the same predictions, non-zero ranks return {}.
    """
    from pretrain.data import build_train_val_datasets
    from pretrain.dist import init_distributed
    from pretrain.log import print_table, setup_logging
    from pretrain.transforms import eval_transform
    from transfer.features import backbone_from_weights, cached_features, extract_features

    if not cfg["weights"]:
        raise ConfigError("config key 'weights' is required (use --weights)")
    d = cfg["data"]
    if not (d["train_root"] or d["train_list"]) or not (d["val_root"] or d["val_list"]):
        raise ConfigError("kNN needs data.train_root (or train_list) and data.val_root/val_list")
    info = init_distributed(cfg["device"])
    out = _usable_dir(cfg["output_dir"])
    setup_logging(str(out) if out else None, rank=info.rank)
    if cfg["output_dir"] and out is None:
        logger.warning("output_dir %r cannot be written: no feature cache, no results file",
                       str(cfg["output_dir"]))  # fmt: skip
    transform = eval_transform(int(d["resize"]), int(d["crop"]))
    model, meta = backbone_from_weights(cfg["weights"], info.device)
    train_ds, val_ds = build_train_val_datasets(
        d["train_root"], d["train_list"], d["val_root"], d["val_list"], transform, transform,
        strict=bool(d["strict"]),
    )  # fmt: skip
    f = cfg["features"]
    arrays = {}
    for split, ds in (("train", train_ds), ("val", val_ds)):
        args = (model, ds)
        kw = dict(batch_size=int(f["batch_size"]), layer=f["layer"], device=info.device,
                  num_workers=int(f["num_workers"]))  # fmt: skip
        if out is not None:
            arrays[split] = cached_features(out / "features", split, *args, meta["sha256"], **kw)
        else:
            arrays[split] = extract_features(*args, desc=f"{split} features", **kw)
    k = cfg["knn"]
    acc = knn_accuracy(
        arrays["train"][0], arrays["train"][1], arrays["val"][0], arrays["val"][1],
        ks=[int(x) for x in k["ks"]], temperature=float(k["temperature"]),
        num_classes=train_ds.num_classes, chunk_size=int(k["chunk_size"]), device=info.device,
    )  # fmt: skip
    if not info.is_main:
        return {}
    unreadable = {"train": len(train_ds) - len(arrays["train"][1]),
                  "val": len(val_ds) - len(arrays["val"][1])}  # fmt: skip
    results = dict(acc, num_train=len(arrays["train"][1]), num_val=len(arrays["val"][1]),
                   unreadable_images=unreadable, num_classes=train_ds.num_classes,
                   temperature=float(k["temperature"]), layer=f["layer"],
                   weights=str(cfg["weights"]), weights_sha256=meta["sha256"])  # fmt: skip
    print_table([{"metric": key, "value": v} for key, v in acc.items()], title="kNN top-1 (%)")
    if out is not None:
        from pretrain.config import save_config
        from pretrain.log import write_json_atomic

        try:
            save_config(cfg, out / "config.yaml")
            write_json_atomic(results, out / RESULTS_NAME)
            logger.info("kNN results written to %s", out / RESULTS_NAME)
        except OSError as e:
            logger.warning("kNN results NOT written to %s: %s", out / RESULTS_NAME, e)
    return results


def _usable_dir(path: str | None) -> Path | None:
    """``path`` created if needed, or None when it is empty or cannot be written."""
    if not path:
        return None
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write_test{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError:
        return None
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (2 for user errors)."""
    from transfer.evalcfg import load_eval_config

    p = argparse.ArgumentParser(
        description="Weighted kNN (k=20, 200; T=0.07) on frozen features",
        epilog="Overrides: dotted config keys, e.g. knn.ks=[10,20] data.train_list=train.txt",
    )
    p.add_argument("--config", default="knn", help="path, or a name in configs/eval/")
    p.add_argument("--weights", help="backbone checkpoint (any kind load_backbone reads)")
    p.add_argument("--train-root", help="ImageFolder tree (or list-file prefix) of the bank")
    p.add_argument("--val-root", help="ImageFolder tree (or list-file prefix) of the queries")
    p.add_argument(
        "--output-dir",
        help="features cache + knn_results.json (default: the config's, outputs/knn)",
    )
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    args = p.parse_args(argv)
    flags = {"weights": "weights", "train_root": "data.train_root",
             "val_root": "data.val_root", "output_dir": "output_dir"}  # fmt: skip
    try:
        run(load_eval_config(args, flags))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Weighted k-nearest-neighbour classification of frozen features (docs/PROTOCOLS.md 3.1).

    imsvd-knn --weights W --output-dir OUT data.train_root=TRAIN data.val_root=VAL
    torchrun --nproc_per_node 8 -m transfer.eval.knn --weights W ... (same arguments)

Features are L2-normalised; each test sample votes over its k most cosine-similar training
samples with weights exp(sim / T), T = 0.07, k = 20 and 200. Extraction is sharded over
processes but the vote always uses the features of the WHOLE train set (gathered), never a
per-shard bank. Results (top-1 in percent per k) go to OUT/knn_results.json (OUT defaults to
the recipe's output_dir, outputs/knn); the log says where.
"""

from __future__ import annotations

import sys
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pretrain.config import ConfigError
from pretrain.data import build_train_val_datasets
from pretrain.log import format_table
from pretrain.transforms import eval_transform
from transfer.eval import runner

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


def validate(cfg: dict) -> None:
    """Cross-field checks of a knn recipe (raises ConfigError naming the keys)."""
    d = cfg["data"]
    if not (d["train_root"] or d["train_list"]) or not (d["val_root"] or d["val_list"]):
        raise ConfigError("kNN needs data.train_root (or train_list) and data.val_root/val_list")
    if not cfg["knn"]["ks"] or any(int(k) <= 0 for k in cfg["knn"]["ks"]):
        raise ConfigError(f"knn.ks must be positive integers, got {cfg['knn']['ks']!r}")
    if float(cfg["knn"]["temperature"]) <= 0:
        raise ConfigError(f"knn.temperature must be positive, got {cfg['knn']['temperature']!r}")


def run(ctx: runner.EvalContext) -> dict:
    """kNN evaluation (knn.yaml schema) in a set-up context.

    Val labels follow the train split's class names (:func:`pretrain.data.
    build_train_val_datasets`); unreadable images are left out and counted (``data.strict``:
    fail instead).

    Returns:
        The results dict (top-1 in percent per k, counts, unreadable images per split); every
        rank computes the same predictions, non-zero ranks return {}.
    """
    cfg = ctx.cfg
    d = cfg["data"]
    transform = eval_transform(int(d["resize"]), int(d["crop"]))
    model, _, meta = ctx.load_model()
    train_ds, val_ds = build_train_val_datasets(
        d["train_root"], d["train_list"], d["val_root"], d["val_list"], transform, transform,
        strict=bool(d["strict"]),
    )  # fmt: skip
    arrays = {
        split: ctx.features(split, model, ds, meta["sha256"])
        for split, ds in (("train", train_ds), ("val", val_ds))
    }
    k = cfg["knn"]
    acc = knn_accuracy(
        arrays["train"][0], arrays["train"][1], arrays["val"][0], arrays["val"][1],
        ks=[int(x) for x in k["ks"]], temperature=float(k["temperature"]),
        num_classes=train_ds.num_classes, chunk_size=int(k["chunk_size"]), device=ctx.device,
    )  # fmt: skip
    if not ctx.is_main:
        return {}
    unreadable = {"train": len(train_ds) - len(arrays["train"][1]),
                  "val": len(val_ds) - len(arrays["val"][1])}  # fmt: skip
    return dict(acc, num_train=len(arrays["train"][1]), num_val=len(arrays["val"][1]),
                unreadable_images=unreadable, num_classes=train_ds.num_classes,
                temperature=float(k["temperature"]), layer=cfg["features"]["layer"],
                weights=str(cfg["model"]["weights"]), weights_sha256=meta["sha256"])  # fmt: skip


def summary(results: dict) -> str:
    """The printed table: top-1 per k."""
    rows = [{"metric": key, "value": v} for key, v in results.items() if key.startswith("top1_")]
    return format_table(rows, title="kNN top-1 (%)")


EVALUATION = runner.Evaluation(
    name="knn",
    prog="imsvd-knn",
    description="Weighted kNN (cosine, T=0.07, k=20 and 200) on frozen features",
    default_config="knn",
    results_name=RESULTS_NAME,
    validate=validate,
    run=run,
    summary=summary,
    output_required=False,
)


def main(argv: list[str] | None = None) -> int:
    """Entry point (``imsvd-knn``); returns the exit code (2 for user errors)."""
    return runner.main(EVALUATION, argv)


if __name__ == "__main__":
    sys.exit(main())

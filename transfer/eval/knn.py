"""Weighted k-nearest-neighbour classification of frozen features (docs/PROTOCOLS.md 3.1).

    imsvd-knn --weights W --output-dir OUT data.train_root=TRAIN data.val_root=VAL
    torchrun --nproc_per_node 8 -m transfer.eval.knn --weights W ... (same arguments)

Features are L2-normalised; each test sample votes over its k most cosine-similar training
samples with weights exp(sim / T), T = 0.07, k = 20 and 200 (the one implementation,
:func:`pretrain.probe.knn.knn_accuracy`, also used by the online probe). Each process keeps only its
shard of the train features (the bank, never gathered: ``knn_classify(sharded=True)`` merges
the shards' top-k), and the val features (the queries) whole; the vote is the one over the
WHOLE train set, as on one process. ``knn.bank_precision`` (bf16 / fp16) holds the normalised
bank in half the bytes. Results (top-1 in percent per k) go to OUT/knn_results.json (OUT
defaults to the recipe's output_dir, outputs/knn); the log says where.
"""

from __future__ import annotations

import sys

from pretrain.config import ConfigError
from pretrain.data.datasets import build_train_val_datasets
from pretrain.data.transforms import eval_transform
from pretrain.log import format_table
from pretrain.probe.knn import (
    BANK_PRECISIONS,
    bank_tensor,
    check_temperature,
    knn_accuracy,
    knn_classify,
)
from transfer.eval import runner
from transfer.eval.inputs import check_weights

# knn_classify / knn_accuracy live in pretrain.probe.knn (shared with the online probe); they stay
# importable from here for callers of the evaluation module.
__all__ = ["knn_accuracy", "knn_classify", "main", "run", "validate", "RESULTS_NAME"]

RESULTS_NAME = "knn_results.json"


def validate(cfg: dict) -> None:
    """Cross-field checks of a knn recipe (raises ConfigError naming the keys)."""
    d = cfg["data"]
    if not (d["train_root"] or d["train_list"]) or not (d["val_root"] or d["val_list"]):
        raise ConfigError("kNN needs data.train_root (or train_list) and data.val_root/val_list")
    if not cfg["knn"]["ks"] or any(int(k) <= 0 for k in cfg["knn"]["ks"]):
        raise ConfigError(f"knn.ks must be positive integers, got {cfg['knn']['ks']!r}")
    try:
        check_temperature(cfg["knn"]["temperature"], key="config key 'knn.temperature'")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    chunk = cfg["knn"]["chunk_size"]
    if int(chunk) <= 0:
        raise ConfigError(f"config key 'knn.chunk_size' must be a positive integer, got {chunk!r}")
    if cfg["knn"]["bank_precision"] not in BANK_PRECISIONS:
        raise ConfigError(
            f"config key 'knn.bank_precision': {cfg['knn']['bank_precision']!r} is not one of "
            f"{', '.join(BANK_PRECISIONS)}"
        )
    check_weights(cfg)


def run(ctx: runner.EvalContext) -> dict:
    """kNN evaluation (knn.yaml schema) in a set-up context.

    Val labels follow the train split's class names (:func:`pretrain.data.datasets.
    build_train_val_datasets`); unreadable images are left out and counted (``data.strict``:
    fail instead).

    Returns:
        The results dict (top-1 in percent per k, counts, unreadable images per split); every
        rank computes the same predictions, non-zero ranks return {}.
    """
    cfg = ctx.cfg
    d = cfg["data"]
    transform = eval_transform(int(d["resize"]), int(d["crop"]))
    k = cfg["knn"]
    model, _, meta = ctx.load_model()
    train_ds, val_ds = build_train_val_datasets(
        d["train_root"],
        d["train_list"],
        d["val_root"],
        d["val_list"],
        transform,
        transform,
        strict=bool(d["strict"]),
    )
    bank, bank_y = ctx.features("train", model, train_ds, meta["sha256"], gather="shard")
    queries, query_y = ctx.features("val", model, val_ds, meta["sha256"])
    n_train = ctx.total_rows(bank.shape[0])  # the whole bank, over the ranks' shards
    bank = bank_tensor(bank, str(k["bank_precision"]), ctx.device)  # numpy shard released
    acc = knn_accuracy(
        bank,
        bank_y,
        queries,
        query_y,
        ks=[int(x) for x in k["ks"]],
        temperature=float(k["temperature"]),
        num_classes=train_ds.num_classes,
        chunk_size=int(k["chunk_size"]),
        device=ctx.device,
        sharded=True,
    )
    if not ctx.is_main:
        return {}
    unreadable = {"train": len(train_ds) - n_train, "val": len(val_ds) - len(query_y)}
    return dict(
        acc,
        num_train=n_train,
        num_val=len(query_y),
        unreadable_images=unreadable,
        num_classes=train_ds.num_classes,
        temperature=float(k["temperature"]),
        bank_precision=str(k["bank_precision"]),
        layer=cfg["features"]["layer"],
        weights=str(cfg["model"]["weights"]),
        weights_sha256=meta["sha256"],
    )


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


main = EVALUATION.main  # the entry point (imsvd-knn)


if __name__ == "__main__":
    sys.exit(main())

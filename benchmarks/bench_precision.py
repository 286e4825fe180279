#!/usr/bin/env python3
"""Feature extraction in fp32 vs bf16 (autocast), one run: images/s and the kNN top-1 of each.

    python benchmarks/bench_precision.py --weights outputs/demo/backbone_final.pth

On the demo's Fashion-MNIST tree (28 px, ``make demo``): features of ``--bank`` train images and
of ``--queries`` test images (all 10,000 by default) with ``features.precision`` fp32 and bf16
(the same extractor the evaluations use), images/s of each (best of ``--repeats`` passes over
the test set), the kNN top-1 (k = 20, T = 0.07, the toolkit's weighted kNN) of each, and how
many test predictions differ; then, on the fp32 features, the kNN with the bank stored in bf16
and fp16 (``knn.bank_precision``, :func:`pretrain.probe.knn.bank_tensor`): top-1 and predictions
differing from the fp32 bank's. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Subset

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pretrain.data.datasets import build_image_dataset  # noqa: E402
from pretrain.data.transforms import eval_transform  # noqa: E402
from pretrain.models.build import model_from_checkpoint  # noqa: E402
from pretrain.probe.knn import bank_tensor, knn_classify  # noqa: E402
from transfer.eval.features import extract_features  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", default=str(ROOT / "outputs/demo/backbone_final.pth"))
    p.add_argument("--tree", default=str(ROOT / ".cache/fashion_mnist"))
    p.add_argument("--bank", type=int, default=20000)
    p.add_argument("--queries", type=int, default=10000, help="test images (a seeded subset)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=256)
    args = p.parse_args(argv)
    model = model_from_checkpoint(args.weights)[0].eval()
    tf = eval_transform(28, 28)
    train = build_image_dataset(str(Path(args.tree) / "train"), None, tf)
    test = build_image_dataset(str(Path(args.tree) / "test"), None, tf, class_names=train.classes)
    g = np.random.default_rng(0)
    bank = Subset(train, sorted(g.choice(len(train), size=args.bank, replace=False).tolist()))
    bank.transform = tf  # part of the extractor's log line only
    if args.queries < len(test):
        test = Subset(test, sorted(g.choice(len(test), size=args.queries, replace=False).tolist()))
    out: dict = {"bank": args.bank, "queries": len(test), "threads": torch.get_num_threads()}
    t_start = time.perf_counter()
    preds = {}
    for precision in ("fp32", "bf16"):
        kw = dict(batch_size=args.batch_size, precision=precision)
        fb, yb = extract_features(model, bank, desc=f"bank {precision}", **kw)
        best = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fq, yq = extract_features(model, test, desc=f"test {precision}", **kw)
            best = min(best, time.perf_counter() - t0)
        pred = knn_classify(fb, yb, fq, ks=(20,), temperature=0.07,
                            num_classes=len(train.classes))[20]  # fmt: skip
        preds[precision] = pred
        top1 = 100.0 * float(np.mean(pred == yq))
        out[precision] = {"images_per_s": len(test) / best, "knn_top1_k20": top1}
        if precision == "fp32":
            fp32 = (fb, yb, fq, yq)
    fb, yb, fq, yq = fp32
    for bank_precision in ("bf16", "fp16"):
        pred = knn_classify(bank_tensor(fb, bank_precision), yb, fq, ks=(20,), temperature=0.07,
                            num_classes=len(train.classes))[20]  # fmt: skip
        out[f"bank_{bank_precision}"] = {
            "knn_top1_k20": 100.0 * float(np.mean(pred == yq)),
            "predictions_differing_from_fp32_bank": int((pred != preds["fp32"]).sum()),
        }
    out["speedup_bf16"] = out["bf16"]["images_per_s"] / out["fp32"]["images_per_s"]
    out["top1_difference"] = out["bf16"]["knn_top1_k20"] - out["fp32"]["knn_top1_k20"]
    out["predictions_differing"] = int((preds["bf16"] != preds["fp32"]).sum())
    out["seconds"] = time.perf_counter() - t_start
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

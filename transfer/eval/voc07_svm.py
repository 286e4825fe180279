"""VOC07 linear-SVM evaluation of a frozen backbone (docs/PROTOCOLS.md section 3.2).

    imsvd-voc07 --weights W --output-dir OUT data.voc_root=VOCdevkit/VOC2007
    torchrun --nproc_per_node 8 -m transfer.eval.voc07_svm --weights W ... (same arguments)

Features of trainval and test (Resize 256 + CenterCrop 224, pool5) are cached in
``OUT/features``; one SVM per class is cross-validated over the cost list (3-fold, AP), refit on
trainval at the chosen cost and scored by VOC AP on test (difficult images excluded).
``OUT/voc07_svm_results.json`` holds per-class AP, the chosen costs, every CV score, the mAP
(all percent), the protocol's description and the unreadable images left out. Optional low-shot
protocols (:mod:`transfer.eval.low_shot`): the original one of Goyal et al. 2019 (k positives
and (K - 1) k negatives per class, fixed cost) or a cross-validated variant
(``low_shot.protocol``). The VOC2007 tree is read by :mod:`transfer.eval.voc07_data`.
"""

from __future__ import annotations

import functools
import logging
import sys
import time
from typing import Any, Mapping, Sequence

import numpy as np

from pretrain.config import ConfigError, find_config, load_config
from pretrain.data.transforms import eval_transform
from pretrain.log import format_table
from transfer.eval import runner, svm
from transfer.eval.ap import voc_ap
from transfer.eval.inputs import check_weights
from transfer.eval.liblinear import cross_validate_liblinear
from transfer.eval.low_shot import low_shot_results
from transfer.eval.svm import l2_normalize
from transfer.eval.voc07_data import (
    discover_classes,
    find_voc2007,
    read_split,
    require_positives,
    voc_dataset,
)

logger = logging.getLogger("imsvd.voc07")

RESULTS_NAME = "voc07_svm_results.json"


@functools.lru_cache(maxsize=None)
def protocol_costs() -> tuple[float, ...]:
    """The protocol's cost list, as the recipe declares it (``configs/eval/voc07_svm.yaml`` is its
    home); read on the first call, so importing this module reads no file."""
    return tuple(float(c) for c in load_config(find_config("voc07_svm", "eval"))["svm"]["costs"])


def _cross_validate(xtr: np.ndarray, labels: np.ndarray, svm_cfg: Mapping[str, Any]):
    """Cost choice by cross-validation and refit with ``svm.solver`` on normalised features
    ``xtr`` (n, d) and labels (n, K): a :class:`transfer.eval.svm.CVResult`."""
    weights = {1: float(svm_cfg["positive_weight"]), -1: float(svm_cfg["negative_weight"])}
    costs = [float(c) for c in svm_cfg["costs"]]
    folds, scaling = int(svm_cfg["folds"]), float(svm_cfg["intercept_scaling"])
    solver = svm_cfg["solver"]
    if solver == "newton":
        tol = float(svm_cfg["newton_tol"])
        return svm.cross_validate_svms(xtr, labels, costs, weights, folds, scaling, tol)
    if solver == "liblinear":
        return cross_validate_liblinear(
            xtr,
            labels,
            costs,
            weights,
            folds,
            scaling,
            float(svm_cfg["tol"]),
            int(svm_cfg["max_iter"]),
            int(svm_cfg["n_jobs"]),
        )
    raise ConfigError(f"svm.solver must be 'newton' or 'liblinear', got {solver!r}")


def _class_results(
    scores: np.ndarray, test_labels: np.ndarray, classes: Sequence[str], res: svm.CVResult
) -> dict:
    """Per class: test AP of the scores (n, K), the chosen cost and the CV AP per cost and fold
    (percent)."""
    costs = res.costs
    per_class = {}
    for j, cls in enumerate(classes):
        per_class[cls] = {
            "ap": 100.0 * voc_ap(scores[:, j], test_labels[:, j]),
            "cost": costs[int(res.best_cost_index[j])],
            "cv_ap": {
                str(c): {
                    "mean": 100.0 * float(res.cv_ap[j, ci].mean()),
                    "folds": [100.0 * float(a) for a in res.cv_ap[j, ci]],
                }
                for ci, c in enumerate(costs)
            },
        }
    return per_class


def train_and_test_svms(
    train_feats: np.ndarray,
    train_labels: np.ndarray,
    test_feats: np.ndarray,
    test_labels: np.ndarray,
    classes: Sequence[str],
    svm_cfg: Mapping[str, Any],
) -> dict:
    """The classifier stage: normalise, cross-validate costs, refit, test AP.

    Args:
        train_feats, test_feats: raw features (n, d).
        train_labels, test_labels: (n, K) in {1, -1, 0}.
        classes: K class names.
        svm_cfg: the ``svm`` section of the config.
    Returns:
        The results dict (per-class AP and chosen cost, CV scores, mAP, timings; percent).
    Raises:
        VOCError: a class without a positive training or test image (named).
    """
    require_positives(train_labels, classes, "training labels")
    require_positives(test_labels, classes, "test labels")
    xtr, xte = l2_normalize(train_feats), l2_normalize(test_feats)
    t0 = time.perf_counter()
    res = _cross_validate(xtr, train_labels, svm_cfg)
    fit_s = time.perf_counter() - t0
    scores = svm.decision_scores(xte, res.weights, float(svm_cfg["intercept_scaling"]))
    per_class = _class_results(scores, test_labels, classes, res)
    mean_ap = float(np.mean([v["ap"] for v in per_class.values()]))
    return {
        "protocol": {"name": "voc07_svm", "description": full_protocol_description(svm_cfg)},
        "mAP": mean_ap,
        "classes": per_class,
        "solver": svm_cfg["solver"],
        "fit_seconds": fit_s,
        "solver_stats": res.stats,
        "num_train": int(xtr.shape[0]),
        "num_test": int(xte.shape[0]),
        "feature_dim": int(xtr.shape[1]),
    }


def full_protocol_description(svm_cfg: Mapping[str, Any]) -> str:
    """One-paragraph description of the full (cross-validated) protocol with these settings."""
    return (
        "VOC07 linear SVM on frozen features (VISSL-era protocol): features L2-normalised "
        "f/(||f||+1e-5); per class an L2-regularised squared-hinge linear SVM with class weights "
        f"{{1: {svm_cfg['positive_weight']}, -1: {svm_cfg['negative_weight']}}} and intercept "
        f"scaling {svm_cfg['intercept_scaling']}; cost chosen by {svm_cfg['folds']}-fold "
        f"unshuffled stratified cross-validation on trainval scored by AP from "
        f"{list(svm_cfg['costs'])} (first best), refit on trainval; difficult trainval images "
        "train as negatives; test AP = area under the interpolated precision envelope (VOC2010+),"
        " difficult test images excluded; mAP = mean over classes (percent)"
    )


def validate(cfg: dict) -> None:
    """Cross-field checks of a voc07_svm recipe (raises ConfigError naming the keys)."""
    if not cfg["data"]["voc_root"]:
        raise ConfigError("config key 'data.voc_root' is required (VOCdevkit/VOC2007)")
    if cfg["svm"]["solver"] not in ("newton", "liblinear"):
        raise ConfigError(
            f"svm.solver must be 'newton' or 'liblinear', got {cfg['svm']['solver']!r}"
        )
    low = cfg["low_shot"]
    if low["enabled"] and low["protocol"] not in ("original", "cv"):
        raise ConfigError(f"low_shot.protocol must be 'original' or 'cv', got {low['protocol']!r}")
    if low["enabled"] and low["protocol"] == "cv" and cfg["svm"]["solver"] != "newton":
        raise ConfigError("low_shot.protocol=cv needs svm.solver=newton")
    check_weights(cfg)


def run(ctx: runner.EvalContext) -> dict:
    """Full VOC07 SVM evaluation in a set-up context.

    Returns:
        The results dict on rank 0; other ranks return an empty dict after feature extraction.
    """
    cfg = ctx.cfg
    voc_dir = find_voc2007(cfg["data"]["voc_root"])
    dcfg = cfg["data"]
    classes = discover_classes(voc_dir, dcfg["trainval_split"])
    transform = eval_transform(int(dcfg["resize"]), int(dcfg["crop"]))
    model, _, meta = ctx.load_model()
    low = cfg["low_shot"]
    arrays, unreadable = {}, {}
    for split in (dcfg["trainval_split"], dcfg["test_split"]):
        ids, labels = read_split(voc_dir, split, classes)
        ds = voc_dataset(voc_dir, ids, transform, strict=bool(dcfg["strict"]))
        # the SVMs train on rank 0: the other ranks extract their shards and send them there
        feats, rows = ctx.features(split, model, ds, meta["sha256"], gather="main")
        if not ctx.is_main:
            continue
        arrays[split] = (feats, labels[rows])
        unreadable[split] = sorted(set(ids) - {ids[int(r)] for r in rows})
        if unreadable[split]:
            left_out = unreadable[split]
            logger.warning(
                "%s: %d unreadable images left out: %s",
                split,
                len(left_out),
                ", ".join(left_out[:10]),
            )
    if not ctx.is_main:
        return {}
    train, test = arrays[dcfg["trainval_split"]], arrays[dcfg["test_split"]]
    results = train_and_test_svms(*train, *test, classes, cfg["svm"])
    results.update(
        weights=str(cfg["model"]["weights"]),
        weights_sha256=meta["sha256"],
        layer=cfg["features"]["layer"],
        arch=meta["arch"],
        unreadable_images={k: len(v) for k, v in unreadable.items()},
        unreadable_ids=unreadable,
    )
    if low["enabled"]:
        results["low_shot"] = low_shot_results(low, cfg["svm"], classes, train, test)
    return results


def summary(results: dict) -> str:
    """The printed tables: per-class AP and chosen cost, mAP; the low-shot mAPs when run."""
    rows = [{"class": c, "AP": v["ap"], "C": v["cost"]} for c, v in results["classes"].items()]
    rows.append({"class": "mAP", "AP": results["mAP"], "C": ""})
    text = format_table(
        rows, title=f"VOC07 SVM AP, percent ({results['layer']}, {results['arch']})"
    )
    low = results.get("low_shot")  # present only when the low-shot protocol ran
    if low:
        text += "\n" + format_table(
            [{"k": k, "mAP": v["mAP_mean"], "std": v["mAP_std"]} for k, v in low["ks"].items()],
            title=f"VOC07 low-shot SVM, {low['protocol']['name']} protocol, percent "
            f"({low['protocol']['samples']} samples per k)",
        )
    return text


EVALUATION = runner.Evaluation(
    name="voc07_svm",
    prog="imsvd-voc07",
    description="VOC07 linear-SVM evaluation of frozen features",
    default_config="voc07_svm",
    results_name=RESULTS_NAME,
    validate=validate,
    run=run,
    summary=summary,
)


main = EVALUATION.main  # the entry point (imsvd-voc07)


if __name__ == "__main__":
    sys.exit(main())

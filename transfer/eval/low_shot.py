"""The low-shot protocols of the VOC07 SVM evaluation (docs/PROTOCOLS.md section 3.2,
``low_shot.protocol``): the original one of Goyal et al. 2019 (k positives and (K - 1) k
negatives per class, fixed cost) and a cross-validated variant of this project (k positives
plus every non-positive image, cost chosen as in the full protocol).

Every (k, draw) samples its own training rows from ``low_shot.seed``; each returns
{str(k): {"mAP_mean", "mAP_std", "mAPs"}} (percent) over ``low_shot.samples`` draws.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import numpy as np

from pretrain.config import ConfigError
from transfer.eval import svm
from transfer.eval.ap import voc_ap
from transfer.eval.liblinear import liblinear_fixed_cost
from transfer.eval.newton import SolverSetup
from transfer.eval.svm import l2_normalize
from transfer.eval.voc07_data import VOCError

logger = logging.getLogger("imsvd.voc07")


def _test_map(xte: np.ndarray, weights: np.ndarray, scaling: float, test_labels: np.ndarray):
    """mAP (percent) on the whole test set of SVMs (K, D) on normalised test features (n, d)."""
    scores = svm.decision_scores(xte, weights, scaling)
    aps = [voc_ap(scores[:, j], test_labels[:, j]) for j in range(scores.shape[1])]
    return 100.0 * float(np.mean(aps))


def _map_stats(maps: list[float]) -> dict:
    """{"mAP_mean", "mAP_std", "mAPs"} of the draws of one k (percent)."""
    return {"mAP_mean": float(np.mean(maps)), "mAP_std": float(np.std(maps)), "mAPs": maps}


def low_shot_svms(
    train_feats: np.ndarray,
    train_labels: np.ndarray,
    test_feats: np.ndarray,
    test_labels: np.ndarray,
    svm_cfg: Mapping[str, Any],
    ks: Sequence[int],
    samples: int,
    seed: int,
) -> dict:
    """Cross-validated low-shot variant (``low_shot.protocol=cv``): per class k random positives
    plus every non-positive image train.

    Positives that are not drawn are left out of that class's training rows (not relabelled
    negative). Cost choice, refit and test AP are as in the full protocol; each (k, sample)
    draws its own subsets from ``seed``. See :func:`low_shot_original` for the benchmark's own
    low-shot protocol.

    Returns:
        {str(k): {"mAP_mean", "mAP_std", "mAPs"}} (percent).
    """
    if svm_cfg["solver"] != "newton":
        raise ConfigError("low_shot needs svm.solver=newton")
    xtr, xte = l2_normalize(train_feats), l2_normalize(test_feats)
    weights = {1: float(svm_cfg["positive_weight"]), -1: float(svm_cfg["negative_weight"])}
    out = {}
    for k in ks:
        maps = []
        for sample in range(int(samples)):
            rng = np.random.default_rng([int(seed), int(k), sample])
            mask = train_labels != 1
            for j in range(train_labels.shape[1]):
                pos = np.nonzero(train_labels[:, j] == 1)[0]
                mask[rng.choice(pos, size=min(int(k), pos.size), replace=False), j] = True
            res = svm.cross_validate_svms(
                xtr,
                train_labels,
                [float(c) for c in svm_cfg["costs"]],
                weights,
                int(svm_cfg["folds"]),
                float(svm_cfg["intercept_scaling"]),
                float(svm_cfg["newton_tol"]),
                row_mask=mask,
            )
            maps.append(
                _test_map(xte, res.weights, float(svm_cfg["intercept_scaling"]), test_labels)
            )
        out[str(k)] = _map_stats(maps)
        logger.info("low-shot k=%d: mAP %.2f +- %.2f", k, np.mean(maps), np.std(maps))
    return out


def _require_original_rows(train_labels: np.ndarray, classes: Sequence[str], ks: Sequence[int]):
    """Raise VOCError naming the first class with fewer than k positives or (K - 1) * k
    negatives in ``train_labels`` (n, K), for the first such k of ``ks``."""
    n_cls = train_labels.shape[1]
    for k in ks:
        for j, cls in enumerate(classes):
            n_pos = int((train_labels[:, j] == 1).sum())
            n_neg = int((train_labels[:, j] == -1).sum())
            if n_pos < k or n_neg < (n_cls - 1) * k:
                raise VOCError(
                    f"low-shot k={k}: class '{cls}' has {n_pos} positive / {n_neg} negative "
                    f"training images, the protocol draws {k} / {(n_cls - 1) * k}"
                )


def _original_draw(train_labels: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """The (n, K) bool training rows of one draw: per class k positives (1) and (K - 1) * k
    negatives (-1) at random; difficult (0) rows are never drawn."""
    n_cls = train_labels.shape[1]
    mask = np.zeros(train_labels.shape, dtype=bool)
    for j in range(n_cls):
        for value, count in ((1, k), (-1, (n_cls - 1) * k)):
            rows = np.nonzero(train_labels[:, j] == value)[0]
            mask[rng.choice(rows, size=count, replace=False), j] = True
    return mask


def low_shot_original(
    train_feats: np.ndarray,
    train_labels: np.ndarray,
    test_feats: np.ndarray,
    test_labels: np.ndarray,
    classes: Sequence[str],
    svm_cfg: Mapping[str, Any],
    ks: Sequence[int],
    samples: int,
    seed: int,
    cost: float,
) -> dict:
    """The original VOC07 low-shot protocol (Goyal et al. 2019, "Scaling and Benchmarking
    Self-Supervised Visual Representation Learning", and its benchmark code).

    Per class and draw: k random positives (1) and (K - 1) * k random negatives (-1) of
    trainval; difficult (0) images are never drawn. One SVM per class at the fixed ``cost``
    (same loss, class weights and bias as the full protocol), no cross-validation; test AP on
    the whole test set (difficult excluded). Each (k, draw) samples from ``seed``.

    Args:
        train_feats, test_feats: raw features (n, d).
        train_labels, test_labels: (n, K) in {1, -1, 0}.
        classes: K class names (for messages).
        svm_cfg: the ``svm`` section (weights, intercept scaling, solver and its tolerances).
        ks: positives per class.
        samples: independent draws per k.
        seed: sampling seed.
        cost: the fixed cost C.
    Returns:
        {str(k): {"mAP_mean", "mAP_std", "mAPs"}} (percent).
    Raises:
        VOCError: a class with fewer than k positives or (K - 1) * k negatives (named).
    """
    xtr, xte = l2_normalize(train_feats), l2_normalize(test_feats)
    weights = {1: float(svm_cfg["positive_weight"]), -1: float(svm_cfg["negative_weight"])}
    scaling = float(svm_cfg["intercept_scaling"])
    _require_original_rows(train_labels, classes, ks)
    solver = svm_cfg["solver"]
    if solver not in ("newton", "liblinear"):
        raise ConfigError(f"svm.solver must be 'newton' or 'liblinear', got {solver!r}")
    setup = SolverSetup(svm.augment(xtr, scaling)) if solver == "newton" else None
    out = {}
    for k in ks:
        maps = []
        for sample in range(int(samples)):
            rng = np.random.default_rng([int(seed), int(k), sample, 0x10])
            mask = _original_draw(train_labels, k, rng)
            if solver == "newton":
                tol = float(svm_cfg["newton_tol"])
                w = svm.fit_svms(
                    xtr, train_labels, cost, weights, scaling, tol, row_mask=mask, setup=setup
                )
            else:
                w = liblinear_fixed_cost(xtr, train_labels, mask, cost, weights, svm_cfg)
            maps.append(_test_map(xte, w, scaling, test_labels))
        out[str(k)] = _map_stats(maps)
        logger.info("low-shot (original) k=%d: mAP %.2f%% +- %.2f", k, np.mean(maps), np.std(maps))
    return out


def low_shot_description(low: Mapping[str, Any], svm_cfg: Mapping[str, Any], n_cls: int) -> str:
    """Description of the low-shot protocol ``low["protocol"]`` with these settings."""
    if low["protocol"] == "original":
        return (
            "original VOC07 low-shot protocol (Goyal et al. 2019, Scaling and Benchmarking "
            f"Self-Supervised Visual Representation Learning): per class k positives and "
            f"({n_cls} - 1) * k negatives drawn at random from trainval (difficult images never "
            f"drawn), one SVM per class at the fixed cost C={float(low['cost'])}, no "
            f"cross-validation; test AP on the whole test set (difficult excluded); "
            f"{low['samples']} draws per k, mean and std of the mAP (percent)"
        )
    return (
        "cross-validated low-shot variant of this project: per class k positives drawn at "
        "random from trainval, every non-positive trainval image kept (difficult as negative); "
        f"cost chosen by {svm_cfg['folds']}-fold CV on those rows from {list(svm_cfg['costs'])} "
        f"and refit, as in the full protocol; test AP on the whole test set; {low['samples']} "
        "draws per k, mean and std of the mAP (percent)"
    )


def low_shot_results(
    low: Mapping[str, Any],
    svm_cfg: Mapping[str, Any],
    classes: Sequence[str],
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
) -> dict:
    """The ``low_shot`` entry of the results: the protocol ``low["protocol"]`` run on the
    (raw features (n, d), labels (n, K)) of trainval and test, and its description.

    Returns:
        {"protocol": {"name", "description", "samples"}, "ks": {str(k): ...}} (percent).
    """
    (xtr, ytr), (xte, yte) = train, test
    ks, samples, seed = [int(k) for k in low["ks"]], int(low["samples"]), int(low["seed"])
    if low["protocol"] == "original":
        cost = float(low["cost"])
        table = low_shot_original(xtr, ytr, xte, yte, classes, svm_cfg, ks, samples, seed, cost)
    else:
        table = low_shot_svms(xtr, ytr, xte, yte, svm_cfg, ks, samples, seed)
    return {
        "protocol": {
            "name": low["protocol"],
            "description": low_shot_description(low, svm_cfg, len(classes)),
            "samples": int(low["samples"]),
        },
        "ks": table,
    }

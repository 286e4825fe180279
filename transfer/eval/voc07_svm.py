"""VOC07 linear-SVM evaluation of a frozen backbone (docs/PROTOCOLS.md section 3.2).

    imsvd-voc07 --weights W --output-dir OUT data.voc_root=VOCdevkit/VOC2007
    torchrun --nproc_per_node 8 -m transfer.eval.voc07_svm --weights W ... (same arguments)

Features of trainval and test (Resize 256 + CenterCrop 224, pool5) are cached in
``OUT/features``; one SVM per class is cross-validated over the cost list (3-fold, AP), refit on
trainval at the chosen cost and scored by VOC AP on test (difficult images excluded).
``OUT/voc07_svm_results.json`` holds per-class AP, the chosen costs, every CV score, the mAP
(all percent), the protocol's description and the unreadable images left out. Optional low-shot
protocols: the original one of Goyal et al. 2019 (k positives and (K - 1) k negatives per class,
fixed cost) or a cross-validated variant (``low_shot.protocol``).
"""

from __future__ import annotations

import functools
import logging
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from pretrain.config import ConfigError, find_config, load_config
from pretrain.datasets import ImageDataset
from pretrain.errors import IMSVDError
from pretrain.log import format_table
from pretrain.transforms import eval_transform
from transfer.eval import runner, svm
from transfer.eval.ap import voc_ap
from transfer.eval.liblinear import cross_validate_liblinear, liblinear_fixed_cost

logger = logging.getLogger("imsvd.voc07")

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip
RESULTS_NAME = "voc07_svm_results.json"


class VOCError(IMSVDError, ValueError):
    """The VOC tree is missing files or holds malformed lines."""


@functools.lru_cache(maxsize=None)
def protocol_costs() -> tuple[float, ...]:
    """The protocol's cost list, as the recipe declares it (``configs/eval/voc07_svm.yaml`` is its
    home); read on the first call, so importing this module reads no file."""
    return tuple(float(c) for c in load_config(find_config("voc07_svm", "eval"))["svm"]["costs"])


def find_voc2007(root: str | Path) -> Path:
    """Accept ``VOCdevkit/VOC2007`` or its ``VOCdevkit`` parent; return the VOC2007 folder."""
    root = Path(root)
    for cand in (root, root / "VOC2007"):
        if (cand / "ImageSets" / "Main").is_dir() and (cand / "JPEGImages").is_dir():
            return cand
    raise VOCError(
        f"{root} is not a VOC2007 folder: expected ImageSets/Main and JPEGImages in it "
        "(or in its VOC2007 subfolder)"
    )


def discover_classes(voc_dir: Path, split: str) -> list[str]:
    """Classes with an ImageSets/Main/<class>_<split>.txt file, in the standard VOC order."""
    main = voc_dir / "ImageSets" / "Main"
    found = {p.name[: -len(f"_{split}.txt")] for p in main.glob(f"*_{split}.txt")}
    if not found:
        raise VOCError(f"no ImageSets/Main/<class>_{split}.txt files in {voc_dir}")
    standard = [c for c in VOC_CLASSES if c in found]
    return standard + sorted(found - set(standard))


def read_split(voc_dir: Path, split: str, classes: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Image ids and the (n, K) label matrix (1 / -1 / 0) of one split.

    Args:
        voc_dir: the VOC2007 folder.
        split: "trainval" or "test".
        classes: class names (one file each).
    Returns:
        (ids in the order of the first class file, labels int8 (n, K)).
    Raises:
        VOCError: a missing file, a malformed line, an image listed twice with different labels
            in one file (naming the image id, file and both lines), files that list different
            images, or a class without any positive (1) image in this split (its AP would be
            undefined; naming the class and file). An image listed twice with the same label is
            kept once, with a warning.
    """
    ids: list[str] = []
    index: dict[str, int] = {}
    columns = []
    for ci, cls in enumerate(classes):
        path = voc_dir / "ImageSets" / "Main" / f"{cls}_{split}.txt"
        if not path.is_file():
            raise VOCError(f"missing label file {path}")
        col: dict[str, int] = {}
        line_of: dict[str, int] = {}
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2 or parts[1] not in ("1", "-1", "0"):
                raise VOCError(f"{path}:{lineno}: expected '<image id> <1|-1|0>', got {line!r}")
            img, lab = parts[0], int(parts[1])
            if img in col:
                if col[img] != lab:
                    raise VOCError(
                        f"{path}:{lineno}: image {img} is listed again with label {lab}; line "
                        f"{line_of[img]} gives it {col[img]}"
                    )
                logger.warning("%s:%d: image %s listed twice (same label)", path, lineno, img)
                continue
            col[img], line_of[img] = lab, lineno
        if not any(v == 1 for v in col.values()):
            raise VOCError(
                f"{path}: class '{cls}' has no positive (1) image in split '{split}': an SVM "
                "cannot be trained / its AP is undefined"
            )
        if ci == 0:
            ids = list(col)
            index = {i: n for n, i in enumerate(ids)}
        elif set(col) != set(index):
            only_here = sorted(set(col) - set(index))[:3]
            only_first = sorted(set(index) - set(col))[:3]
            raise VOCError(
                f"{path} lists different images than {classes[0]}_{split}.txt (only in {path.name}:"
                f" {only_here}; only in {classes[0]}_{split}.txt: {only_first})"
            )
        columns.append(col)
    labels = np.zeros((len(ids), len(classes)), dtype=np.int8)
    for ci, col in enumerate(columns):
        for img, lab in col.items():
            labels[index[img], ci] = lab
    return ids, labels


def voc_dataset(voc_dir: Path, ids: Sequence[str], transform: Any, strict: bool = True):
    """Dataset of (image, row index) over JPEGImages/<id>.jpg.

    An unreadable image is left out (its row index never appears in the extracted labels) and
    counted, or, with ``strict``, raises naming the file; it is never replaced by another one.
    """
    samples = []
    for n, img in enumerate(ids):
        path = voc_dir / "JPEGImages" / f"{img}.jpg"
        if not path.is_file():
            raise VOCError(f"image {path} listed in ImageSets is missing")
        samples.append((str(path), n))
    return ImageDataset(samples, transform=transform, strict=strict)


def require_positives(labels: np.ndarray, classes: Sequence[str], where: str) -> None:
    """Raise VOCError naming every class without a positive (1) row in ``labels`` (n, K)."""
    missing = [c for j, c in enumerate(classes) if not (np.asarray(labels)[:, j] == 1).any()]
    if missing:
        raise VOCError(
            f"{where}: class(es) {missing} have no positive (1) image: an SVM cannot be trained "
            "/ the AP is undefined"
        )


def l2_normalize(feats: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    """Per-row f / (||f|| + eps) in float64 (the protocol's normalisation)."""
    f = np.asarray(feats, dtype=np.float64)
    return f / (np.linalg.norm(f, axis=1, keepdims=True) + eps)


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
    weights = {1: float(svm_cfg["positive_weight"]), -1: float(svm_cfg["negative_weight"])}
    costs = [float(c) for c in svm_cfg["costs"]]
    t0 = time.perf_counter()
    solver = svm_cfg["solver"]
    if solver == "newton":
        res = svm.cross_validate_svms(
            xtr, train_labels, costs, weights, int(svm_cfg["folds"]),
            float(svm_cfg["intercept_scaling"]), float(svm_cfg["newton_tol"]),
        )  # fmt: skip
    elif solver == "liblinear":
        res = cross_validate_liblinear(
            xtr, train_labels, costs, weights, int(svm_cfg["folds"]),
            float(svm_cfg["intercept_scaling"]), float(svm_cfg["tol"]), int(svm_cfg["max_iter"]),
            int(svm_cfg["n_jobs"]),
        )  # fmt: skip
    else:
        raise ConfigError(f"svm.solver must be 'newton' or 'liblinear', got {solver!r}")
    fit_s = time.perf_counter() - t0
    scores = svm.decision_scores(xte, res.weights, float(svm_cfg["intercept_scaling"]))
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
    mean_ap = float(np.mean([v["ap"] for v in per_class.values()]))
    return {
        "protocol": {"name": "voc07_svm", "description": full_protocol_description(svm_cfg)},
        "mAP": mean_ap,
        "classes": per_class,
        "solver": solver,
        "fit_seconds": fit_s,
        "solver_stats": res.stats,
        "num_train": int(xtr.shape[0]),
        "num_test": int(xte.shape[0]),
        "feature_dim": int(xtr.shape[1]),
    }


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
                xtr, train_labels, [float(c) for c in svm_cfg["costs"]], weights,
                int(svm_cfg["folds"]), float(svm_cfg["intercept_scaling"]),
                float(svm_cfg["newton_tol"]), row_mask=mask,
            )  # fmt: skip
            scores = svm.decision_scores(xte, res.weights, float(svm_cfg["intercept_scaling"]))
            aps = [voc_ap(scores[:, j], test_labels[:, j]) for j in range(scores.shape[1])]
            maps.append(100.0 * float(np.mean(aps)))
        out[str(k)] = {"mAP_mean": float(np.mean(maps)), "mAP_std": float(np.std(maps)),
                       "mAPs": maps}  # fmt: skip
        logger.info("low-shot k=%d: mAP %.2f +- %.2f", k, np.mean(maps), np.std(maps))
    return out


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
    solver = svm_cfg["solver"]
    if solver not in ("newton", "liblinear"):
        raise ConfigError(f"svm.solver must be 'newton' or 'liblinear', got {solver!r}")
    setup = svm.SolverSetup(svm.augment(xtr, scaling)) if solver == "newton" else None
    out = {}
    for k in ks:
        maps = []
        for sample in range(int(samples)):
            rng = np.random.default_rng([int(seed), int(k), sample, 0x10])
            mask = np.zeros(train_labels.shape, dtype=bool)
            for j in range(n_cls):
                for value, count in ((1, k), (-1, (n_cls - 1) * k)):
                    rows = np.nonzero(train_labels[:, j] == value)[0]
                    mask[rng.choice(rows, size=count, replace=False), j] = True
            if solver == "newton":
                w = svm.fit_svms(xtr, train_labels, cost, weights, scaling,
                                 float(svm_cfg["newton_tol"]), row_mask=mask,
                                 setup=setup)  # fmt: skip
            else:
                w = liblinear_fixed_cost(xtr, train_labels, mask, cost, weights, svm_cfg)
            scores = svm.decision_scores(xte, w, scaling)
            aps = [voc_ap(scores[:, j], test_labels[:, j]) for j in range(n_cls)]
            maps.append(100.0 * float(np.mean(aps)))
        out[str(k)] = {"mAP_mean": float(np.mean(maps)), "mAP_std": float(np.std(maps)),
                       "mAPs": maps}  # fmt: skip
        logger.info("low-shot (original) k=%d: mAP %.2f%% +- %.2f", k, np.mean(maps), np.std(maps))
    return out


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
            logger.warning("%s: %d unreadable images left out: %s", split,
                           len(unreadable[split]), ", ".join(unreadable[split][:10]))  # fmt: skip
    if not ctx.is_main:
        return {}
    (xtr, ytr), (xte, yte) = arrays[dcfg["trainval_split"]], arrays[dcfg["test_split"]]
    results = train_and_test_svms(xtr, ytr, xte, yte, classes, cfg["svm"])
    results.update(weights=str(cfg["model"]["weights"]), weights_sha256=meta["sha256"],
                   layer=cfg["features"]["layer"], arch=meta["arch"],
                   unreadable_images={k: len(v) for k, v in unreadable.items()},
                   unreadable_ids=unreadable)  # fmt: skip
    if low["enabled"]:
        ks, samples, seed = [int(k) for k in low["ks"]], int(low["samples"]), int(low["seed"])
        if low["protocol"] == "original":
            table = low_shot_original(xtr, ytr, xte, yte, classes, cfg["svm"], ks, samples, seed,
                                      float(low["cost"]))  # fmt: skip
        else:
            table = low_shot_svms(xtr, ytr, xte, yte, cfg["svm"], ks, samples, seed)
        results["low_shot"] = {
            "protocol": {
                "name": low["protocol"],
                "description": low_shot_description(low, cfg["svm"], len(classes)),
                "samples": int(low["samples"]),
            },
            "ks": table,
        }
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
        )  # fmt: skip
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


def main(argv: list[str] | None = None) -> int:
    """Entry point (``imsvd-voc07``); returns the exit code (2 for user errors)."""
    return runner.main(EVALUATION, argv)


if __name__ == "__main__":
    sys.exit(main())

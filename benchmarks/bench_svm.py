"""VOC07 SVM stage: batched Newton solver vs one scikit-learn LinearSVC per (class, cost, fold).

Both sides get the same features (synthetic VOC-like multi-label data, float64, L2-normalised)
and do the full protocol: 3-fold unshuffled stratified CV by AP over the cost list, choice of
the cost per class, refit on all training rows, test AP (difficult excluded). Printed: the
reference time, the new time, their ratio, both mAPs and how many classes chose the same cost.

Run:  .venv/bin/python benchmarks/bench_svm.py [--n-train 2000 --n-test 2000 --dim 1024 --rounds 1]
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
from sklearn.model_selection import cross_val_score
from sklearn.svm import LinearSVC

from transfer.eval.ap import voc_ap
from transfer.eval.svm import cross_validate_svms, decision_scores, l2_normalize
from transfer.eval.voc07_svm import protocol_costs

# feature noise level (with the default sizes this gives a VOC-like mAP, about 85)
NOISE = 5.0


def make_features(n: int, dim: int, n_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """VOC-like data: 1-3 objects per image, ReLU features, labels 1 / -1 / 0 (difficult)."""
    rng = np.random.default_rng(seed)
    protos = rng.normal(size=(n_classes, dim))
    freq = rng.uniform(0.03, 0.25, size=n_classes)
    present = rng.random((n, n_classes)) < freq
    present[present.sum(1) == 0, rng.integers(0, n_classes)] = True
    strength = rng.uniform(0.2, 1.0, size=(n, n_classes)) * present
    feats = np.maximum(0.0, strength @ protos + NOISE * rng.normal(size=(n, dim)) + 0.5)
    labels = np.where(present, 1, -1)
    # weak (small) objects are "difficult"
    labels[present & (strength < 0.3)] = 0
    return feats, labels


def run_reference(xtr, ytr, xte, yte, costs):
    aps, chosen = [], []
    for j in range(ytr.shape[1]):
        yb = np.where(ytr[:, j] == 1, 1, -1)
        means = []
        for cost in costs:
            clf = LinearSVC(
                C=cost,
                class_weight={1: 2, -1: 1},
                intercept_scaling=1.0,
                penalty="l2",
                loss="squared_hinge",
                tol=1e-4,
                max_iter=2000,
                dual=True,
            )
            means.append(cross_val_score(clf, xtr, yb, cv=3, scoring="average_precision").mean())
        best = int(np.argmax(means))
        clf = LinearSVC(
            C=costs[best],
            class_weight={1: 2, -1: 1},
            intercept_scaling=1.0,
            penalty="l2",
            loss="squared_hinge",
            tol=1e-4,
            max_iter=2000,
            dual=True,
        ).fit(xtr, yb)
        aps.append(voc_ap(clf.decision_function(xte), yte[:, j]))
        chosen.append(best)
    return 100 * float(np.mean(aps)), np.array(chosen)


def run_new(xtr, ytr, xte, yte, costs):
    res = cross_validate_svms(xtr, ytr, costs)
    scores = decision_scores(xte, res.weights)
    aps = [voc_ap(scores[:, j], yte[:, j]) for j in range(ytr.shape[1])]
    return 100 * float(np.mean(aps)), res.best_cost_index


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--n-test", type=int, default=2000)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--classes", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=1, help="interleaved repeats; min reported")
    args = ap.parse_args()
    feats, labels = make_features(args.n_train + args.n_test, args.dim, args.classes, args.seed)
    feats = l2_normalize(feats)
    xtr, xte = feats[: args.n_train], feats[args.n_train :]
    ytr, yte = labels[: args.n_train], labels[args.n_train :]
    costs = list(protocol_costs())

    t_new, t_ref = [], []
    for _ in range(args.rounds):  # interleaved rounds; the least disturbed (min) is reported
        t0 = time.perf_counter()
        new_map, new_c = run_new(xtr, ytr, xte, yte, costs)
        t_new.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # liblinear ConvergenceWarning at large costs
            ref_map, ref_c = run_reference(xtr, ytr, xte, yte, costs)
        t_ref.append(time.perf_counter() - t0)
    print(
        "rounds: ref " + ", ".join(f"{t:.2f}" for t in t_ref)
        + " s; new " + ", ".join(f"{t:.2f}" for t in t_new) + " s"
    )  # fmt: skip
    t_new, t_ref = min(t_new), min(t_ref)
    print(
        f"features: train {xtr.shape}, test {xte.shape}, {args.classes} classes, {len(costs)} costs"
    )
    print(f"reference (serial LinearSVC): {t_ref:8.2f} s   mAP {ref_map:.3f}")
    print(f"batched Newton (this repo):   {t_new:8.2f} s   mAP {new_map:.3f}")
    print(f"speed ratio ref/new: {t_ref / t_new:.2f}x   mAP difference: {new_map - ref_map:+.3f}")
    print(f"same chosen cost: {int((ref_c == new_c).sum())}/{args.classes} classes")


if __name__ == "__main__":
    main()

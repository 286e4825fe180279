"""The literal liblinear reference of the VOC07 SVM stage: one scikit-learn LinearSVC per fit.

Same contract as :func:`transfer.eval.svm.cross_validate_svms` (which solves every problem of a
cost at once and reaches the same optimum); ``svm.solver=liblinear`` selects it.
"""

from __future__ import annotations

import warnings
from typing import Mapping, Sequence

import numpy as np
from joblib import Parallel, delayed
from sklearn.exceptions import ConvergenceWarning
from sklearn.svm import LinearSVC

from transfer.eval.ap import step_ap
from transfer.eval.svm import CVResult, binary_labels, choose_cost, stratified_folds, svm_inputs


def _liblinear_svc(cost, class_weight, intercept_scaling, tol, max_iter):
    return LinearSVC(
        C=cost,
        class_weight=class_weight,
        intercept_scaling=intercept_scaling,
        penalty="l2",
        loss="squared_hinge",
        dual=True,
        tol=tol,
        max_iter=max_iter,
    )


def liblinear_fit(x, yb, folds, cost, svc_args):
    """Held-out APs of one (class, cost) over the folds; with folds=None, the refit weights.

    Args:
        x: (n, d) features.
        yb: (n,) labels in {1, -1}.
        folds: held-out row indices per fold, or None for one fit on every row.
        cost: C.
        svc_args: (class_weight, intercept_scaling, tol, max_iter).

    Returns:
        The fold APs (list), or the weights (d + 1,) with the bias last when ``folds`` is None.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        if folds is None:
            clf = _liblinear_svc(cost, *svc_args).fit(x, yb)
            return np.r_[clf.coef_.ravel(), clf.intercept_ / svc_args[1]]
        aps = []
        for test_idx in folds:
            train = np.ones(yb.size, dtype=bool)
            train[test_idx] = False
            clf = _liblinear_svc(cost, *svc_args).fit(x[train], yb[train])
            aps.append(step_ap(clf.decision_function(x[test_idx]), yb[test_idx]))
        return aps


def cross_validate_liblinear(
    feats: np.ndarray,
    labels: np.ndarray,
    costs: Sequence[float],
    class_weight: Mapping[int, float] | None = None,
    n_folds: int = 3,
    intercept_scaling: float = 1.0,
    tol: float = 1e-4,
    max_iter: int = 2000,
    n_jobs: int = -1,
) -> CVResult:
    """Same contract as :func:`cross_validate_svms`, one scikit-learn LinearSVC per fit.

    The (class, cost) jobs run in parallel processes (``n_jobs``, -1 = every core). Slower
    than the batched solver; kept as the literal liblinear reference.
    """
    feats, labels, class_weight, costs, _ = svm_inputs(feats, labels, class_weight, costs)
    yb_all = binary_labels(labels)
    k = labels.shape[1]
    svc_args = (class_weight, float(intercept_scaling), tol, max_iter)
    folds = [stratified_folds(yb_all[:, j], n_folds) for j in range(k)]
    jobs = [(j, ci) for j in range(k) for ci in range(len(costs))]
    par = Parallel(n_jobs=n_jobs)
    out = par(
        delayed(liblinear_fit)(feats, yb_all[:, j], folds[j], costs[ci], svc_args) for j, ci in jobs
    )
    cv_ap = np.zeros((k, len(costs), n_folds))
    for (j, ci), aps in zip(jobs, out):
        cv_ap[j, ci] = aps
    best = choose_cost(cv_ap)
    weights = par(
        delayed(liblinear_fit)(feats, yb_all[:, j], None, costs[best[j]], svc_args)
        for j in range(k)
    )
    return CVResult(costs, cv_ap, best, np.stack(weights), {"fits": len(jobs) * n_folds + k})


def liblinear_fixed_cost(x, labels, mask, cost, weights, svm_cfg) -> np.ndarray:
    """One LinearSVC per class at a fixed cost on the rows of ``mask`` (n, K).

    Returns:
        (K, d + 1) weights, bias last (the low-shot protocol's refits).
    """
    yb = binary_labels(labels)
    args = (
        weights,
        float(svm_cfg["intercept_scaling"]),
        float(svm_cfg["tol"]),
        int(svm_cfg["max_iter"]),
    )
    return np.stack(
        [
            liblinear_fit(x[mask[:, j]], yb[mask[:, j], j], None, cost, args)
            for j in range(labels.shape[1])
        ]
    )

"""Batched linear SVMs with liblinear's objective, and cross-validated cost selection.

The VOC07 protocol fits one L2-regularised squared-hinge SVM per (class, cost, fold): 20 x 11 x 3
problems plus 20 refits. liblinear's dual coordinate descent solves them one at a time and
crawls at large costs (it often stops at max_iter). The objective is strictly convex, so its
minimiser is unique and any solver that reaches it gives the same classifier. Here all
problems that share a cost are solved together by Newton iterations on the primal with an exact
line search on the piecewise-quadratic objective (Keerthi & DeCoste's finite Newton method).
A Newton direction is computed exactly from an |A| x |A| system on the Gram matrix while the
problem's margin-violating set A is small (large costs; the solves run on every core), and by
conjugate gradients batched over problems otherwise (small costs; a low-rank preconditioner
from the leading eigen-directions of the features). The solution at one cost warm-starts the
next larger cost, and the refit on all rows runs only at each class's chosen cost.

Problem p, with augmented features x~ = [x, intercept_scaling] (liblinear regularises the bias):

    min_w  0.5 * ||w||^2 + sum_i c_ip * max(0, 1 - y_ip * w . x~_i)^2

where c_ip = C * class_weight[y_ip] for training samples and 0 for samples outside the fold.
The literal liblinear reference (one scikit-learn LinearSVC per fit) is
:mod:`transfer.eval.liblinear`.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
from sklearn.model_selection import StratifiedKFold

from pretrain.errors import IMSVDError
from transfer.eval.ap import step_ap
from transfer.eval.newton import SolverSetup, newton_iteration

logger = logging.getLogger("imsvd.svm")


class SVMError(IMSVDError, ValueError):
    """Invalid input to the SVM stage (shapes, labels, costs)."""


def l2_normalize(feats: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    """Per-row f / (||f|| + eps) in float64 (the protocol's normalisation)."""
    f = np.asarray(feats, dtype=np.float64)
    return f / (np.linalg.norm(f, axis=1, keepdims=True) + eps)


def augment(x: np.ndarray, intercept_scaling: float = 1.0) -> np.ndarray:
    """Append the constant bias feature liblinear uses: (n, d) -> (n, d + 1) float64."""
    x = np.asarray(x, dtype=np.float64)
    return np.hstack([x, np.full((x.shape[0], 1), float(intercept_scaling))])


def _objective(w: np.ndarray, viol: np.ndarray, c: np.ndarray) -> np.ndarray:
    return 0.5 * np.einsum("dp,dp->p", w, w) + np.einsum("np,np->p", c, viol * viol)


def fit_batched(
    xa: np.ndarray,
    y: np.ndarray,
    c: np.ndarray,
    w0: np.ndarray | None = None,
    tol: float = 1e-6,
    max_newton: int = 100,
    max_cg: int = 500,
    setup: SolverSetup | None = None,
    threads: int | None = None,
) -> tuple[np.ndarray, dict]:
    """Solve P squared-hinge linear SVMs on shared features by batched Newton iterations.

    Each Newton direction is exact where the problem's margin-violating set A is small (the
    minimiser of the quadratic on A, from an |A| x |A| dual system on the Gram matrix) and
    approximate otherwise (preconditioned CG, batched over problems); an exact line search on
    the true objective follows. Both give liblinear's optimum; only the path differs.

    Args:
        xa: (n, D) float64 augmented features (see :func:`augment`).
        y: (n, P) labels in {+1, -1}.
        c: (n, P) per-sample costs >= 0 (0 removes a sample from that problem).
        w0: optional (D, P) warm start.
        tol: stop a problem when ||grad|| <= tol * ||grad at w=0||.
        max_newton: Newton iterations cap.
        max_cg: conjugate-gradient iterations cap per Newton step.
        setup: precomputed :class:`transfer.eval.newton.SolverSetup` for ``xa`` (built here
            when None).
        threads: parallel direct solves (default: every core).
    Returns:
        (w, info): w is (D, P); info has "newton_iters", "cg_iters", "direct_solves" and
        "converged" (P,) bool.
    """
    setup = setup or SolverSetup(xa)
    threads = threads or os.cpu_count() or 1
    xa = setup.xa
    n, dim = xa.shape
    if y.shape != c.shape or y.shape[0] != n:
        raise SVMError(f"fit_batched: xa {xa.shape}, y {y.shape}, c {c.shape} disagree")
    p_all = y.shape[1]
    w = np.zeros((dim, p_all)) if w0 is None else np.array(w0, dtype=np.float64, copy=True)
    g0 = np.linalg.norm(2.0 * (xa.T @ (c * y)), axis=0)
    g_stop = tol * np.where(g0 > 0, g0, 1.0)
    z = xa @ w
    active = np.arange(p_all)
    info = {"newton_iters": 0, "cg_iters": 0, "direct_solves": 0}
    info["converged"] = np.zeros(p_all, dtype=bool)
    for _ in range(max_newton):
        if active.size == 0:
            break
        info["newton_iters"] += 1
        active = newton_iteration(setup, w, z, y, c, active, g_stop, info, max_cg, threads)
    return w, info


def binary_labels(labels: np.ndarray) -> np.ndarray:
    """VOC labels {1, -1, 0} -> training labels {+1, -1} (difficult kept as negative)."""
    labels = np.asarray(labels)
    bad = ~np.isin(labels, (1, -1, 0))
    if bad.any():
        raise SVMError(f"labels must be 1, -1 or 0; found {np.unique(labels[bad])[:5].tolist()}")
    return np.where(labels == 1, 1.0, -1.0)


def stratified_folds(y: np.ndarray, n_folds: int) -> list[np.ndarray]:
    """Test-index arrays of unshuffled stratified K folds (scikit-learn's cv=K for classifiers)."""
    if n_folds < 2:
        raise SVMError(f"cross-validation needs at least 2 folds, got {n_folds}")
    splitter = StratifiedKFold(n_splits=n_folds, shuffle=False)
    with warnings.catch_warnings():
        # a class with fewer positives than folds is allowed: some folds are all-negative
        warnings.simplefilter("ignore", UserWarning)
        return [test for _, test in splitter.split(np.zeros((y.size, 1)), y)]


@dataclass
class CVResult:
    """Output of :func:`cross_validate_svms`.

    Attributes:
        costs: the cost list.
        cv_ap: (K, n_costs, n_folds) held-out AP per class, cost and fold.
        best_cost_index: (K,) index of the chosen cost (first maximum of the fold mean).
        weights: (K, D) refit weights on all training rows at the chosen cost (bias last).
        stats: solver iteration counts.
    """

    costs: list
    cv_ap: np.ndarray
    best_cost_index: np.ndarray
    weights: np.ndarray
    stats: dict


def svm_inputs(
    feats: np.ndarray,
    labels: np.ndarray,
    class_weight: Mapping[int, float] | None,
    costs: Sequence[float],
    row_mask: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, dict, list[float], np.ndarray]:
    """The inputs of every SVM fit (batched Newton and liblinear), checked and in shape.

    Args:
        feats: (n, d) features.
        labels: (n,) or (n, K) labels in {1, -1, 0}.
        class_weight: {1: w_pos, -1: w_neg}, or None for the protocol's {1: 2, -1: 1}.
        costs: the cost(s) C to fit, each > 0.
        row_mask: optional (n, K) bool, the rows each class trains on (default: all).

    Returns:
        (feats float64 (n, d), labels (n, K), class_weight, costs as floats, row_mask bool).

    Raises:
        SVMError: class weights without exactly the keys 1 and -1, an empty cost list or a cost
            <= 0, features and labels of different row counts, a row mask of another shape.
    """
    class_weight = dict(class_weight or {1: 2.0, -1: 1.0})
    if set(class_weight) != {1, -1}:
        raise SVMError(f"class_weight must have keys 1 and -1, got {sorted(class_weight)}")
    costs = [float(cst) for cst in costs]
    if not costs or not all(cst > 0 for cst in costs):
        raise SVMError(f"costs must be a non-empty list of positive numbers, got {costs}")
    labels = np.asarray(labels)
    if labels.ndim == 1:
        labels = labels[:, None]
    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim != 2 or feats.shape[0] != labels.shape[0]:
        raise SVMError(f"features {feats.shape} and labels {labels.shape} disagree")
    shape = labels.shape
    row_mask = np.ones(shape, dtype=bool) if row_mask is None else np.asarray(row_mask, bool)
    if row_mask.shape != shape:
        raise SVMError(f"row_mask shape {row_mask.shape} must be {shape}")
    return feats, labels, class_weight, costs, row_mask


class _CountingSolver:
    """:func:`fit_batched` on fixed features and settings, its iteration counts summed in
    ``stats`` ("newton_iters", "cg_iters", "direct_solves", "unconverged" problems)."""

    def __init__(self, xa: np.ndarray, tol: float, max_newton: int) -> None:
        self.xa, self.setup, self.tol, self.max_newton = xa, SolverSetup(xa), tol, max_newton
        self.stats = {"newton_iters": 0, "cg_iters": 0, "direct_solves": 0, "unconverged": 0}

    def __call__(self, y: np.ndarray, c: np.ndarray, w0: np.ndarray | None):
        w_out, info = fit_batched(
            self.xa, y, c, w0=w0, tol=self.tol, max_newton=self.max_newton, setup=self.setup
        )
        for key in ("newton_iters", "cg_iters", "direct_solves"):
            self.stats[key] += info[key]
        self.stats["unconverged"] += int((~info["converged"]).sum())
        return w_out, info


def _fold_problems(yb: np.ndarray, base_c: np.ndarray, row_mask: np.ndarray, n_folds: int):
    """The cross-validation problems: one per (class j, fold f), column j * n_folds + f.

    Args:
        yb: (n, K) labels in {+1, -1}.
        base_c: (n, K) per-row costs at C = 1 (0 outside a class's rows).
        row_mask: (n, K) bool, the rows each class trains on.
        n_folds: folds of unshuffled stratified CV over each class's rows.
    Returns:
        (folds: per class, the held-out rows of each fold; labels (n, K * n_folds); costs at
        C = 1 (n, K * n_folds), 0 on each problem's held-out rows).
    """
    n, k = yb.shape
    folds = []
    for j in range(k):
        rows = np.nonzero(row_mask[:, j])[0]
        folds.append([rows[t] for t in stratified_folds(yb[rows, j], n_folds)])
    mask = np.ones((n, k * n_folds))
    for j in range(k):
        for f, test_idx in enumerate(folds[j]):
            mask[test_idx, j * n_folds + f] = 0.0
    return folds, np.repeat(yb, n_folds, axis=1), np.repeat(base_c, n_folds, axis=1) * mask


def _held_out_ap(scores: np.ndarray, yb: np.ndarray, folds: list, n_folds: int) -> np.ndarray:
    """(K, n_folds) AP of each (class, fold) problem's scores (n, K * n_folds) on its held-out
    rows, against the labels ``yb`` (n, K)."""
    ap = np.zeros((yb.shape[1], n_folds))
    for j in range(yb.shape[1]):
        for f, test_idx in enumerate(folds[j]):
            ap[j, f] = step_ap(scores[test_idx, j * n_folds + f], yb[test_idx, j])
    return ap


def cross_validate_svms(
    feats: np.ndarray,
    labels: np.ndarray,
    costs: Sequence[float],
    class_weight: Mapping[int, float] | None = None,
    n_folds: int = 3,
    intercept_scaling: float = 1.0,
    tol: float = 1e-6,
    max_newton: int = 100,
    row_mask: np.ndarray | None = None,
) -> CVResult:
    """Per class: K-fold CV of every cost by held-out AP, pick the best, refit on all rows.

    Args:
        feats: (n, d) features (already normalised as the protocol wants).
        labels: (n, K) labels in {1, -1, 0}; 0 trains as negative.
        costs: cost list, visited in increasing order for warm starts.
        class_weight: {1: w_pos, -1: w_neg}; default {1: 2, -1: 1}.
        n_folds: folds of unshuffled stratified CV.
        intercept_scaling: value of the constant bias feature.
        tol: relative gradient-norm tolerance of the solver.
        max_newton: Newton iterations cap per cost.
        row_mask: optional (n, K) bool, the rows each class trains on (low-shot subsets);
            folds and refit use only those rows.
    Returns:
        A :class:`CVResult`.
    """
    feats, labels, class_weight, costs, row_mask = svm_inputs(
        feats, labels, class_weight, costs, row_mask
    )
    k, nf = labels.shape[1], n_folds
    xa = augment(feats, intercept_scaling)
    yb = binary_labels(labels)  # (n, K)
    base_c = np.where(yb > 0, class_weight[1], class_weight[-1])
    base_c = base_c * row_mask  # a zero cost removes a row from every problem of its class
    folds, y_p, c_base = _fold_problems(yb, base_c, row_mask, nf)
    cv_ap = np.zeros((k, len(costs), n_folds))
    fold_w = np.zeros((len(costs), xa.shape[1], k * nf))
    w = None
    solve = _CountingSolver(xa, tol, max_newton)
    for ci in np.argsort(costs, kind="stable"):  # increasing costs: each warm-starts the next
        w, info = solve(y_p, costs[ci] * c_base, w)
        fold_w[ci] = w
        cv_ap[:, ci] = _held_out_ap(xa @ w, yb, folds, nf)
        logger.info(
            "C=%g: mean CV AP %.2f%% (%d Newton iterations, %d CG iterations, %d direct solves)",
            costs[ci],
            100.0 * cv_ap[:, ci].mean(),
            info["newton_iters"],
            info["cg_iters"],
            info["direct_solves"],
        )
    best = choose_cost(cv_ap)
    # refit on all rows, only at each class's chosen cost, warm-started from its fold solutions
    w0 = np.stack([fold_w[best[j]][:, j * nf : (j + 1) * nf].mean(axis=1) for j in range(k)], 1)
    c_refit = base_c * np.array([costs[b] for b in best])[None, :]
    weights, _ = solve(yb, c_refit, w0)
    if solve.stats["unconverged"]:
        logger.warning("%d SVM problems stopped at max_newton", solve.stats["unconverged"])
    return CVResult(costs, cv_ap, best, weights.T.copy(), solve.stats)


def fit_svms(
    feats: np.ndarray,
    labels: np.ndarray,
    cost: float,
    class_weight: Mapping[int, float] | None = None,
    intercept_scaling: float = 1.0,
    tol: float = 1e-6,
    max_newton: int = 100,
    row_mask: np.ndarray | None = None,
    setup: SolverSetup | None = None,
) -> np.ndarray:
    """Per class one SVM at a fixed cost on its rows, no cross-validation (low-shot protocol).

    Args:
        feats: (n, d) features (already normalised as the protocol wants).
        labels: (n, K) labels in {1, -1, 0}; 0 trains as negative where its row is used.
        cost: the cost C.
        class_weight: {1: w_pos, -1: w_neg}; default {1: 2, -1: 1}.
        intercept_scaling: value of the constant bias feature.
        tol: relative gradient-norm tolerance of the solver.
        max_newton: Newton iterations cap.
        row_mask: optional (n, K) bool, the rows each class trains on (default: all).
        setup: a :class:`SolverSetup` of ``augment(feats, intercept_scaling)`` to reuse across
            calls on the same features (built here when None).
    Returns:
        (K, d + 1) weights, bias last (see :func:`decision_scores`).
    Raises:
        SVMError: bad cost, labels, class weights or shapes, or a class with no training row of
            one sign.
    """
    feats, labels, class_weight, (cost,), row_mask = svm_inputs(
        feats, labels, class_weight, [cost], row_mask
    )
    n, k = labels.shape
    yb = binary_labels(labels)
    for j in range(k):
        signs = set(yb[row_mask[:, j], j].tolist())
        if signs != {1.0, -1.0}:
            raise SVMError(f"class {j} has no {'positive' if 1.0 not in signs else 'negative'} row")
    xa = augment(feats, intercept_scaling)
    c = np.where(yb > 0, class_weight[1], class_weight[-1]) * float(cost) * row_mask
    w, info = fit_batched(xa, yb, c, tol=tol, max_newton=max_newton, setup=setup or SolverSetup(xa))
    if not info["converged"].all():
        logger.warning("%d SVM problems stopped at max_newton", int((~info["converged"]).sum()))
    return w.T.copy()


def choose_cost(cv_ap: np.ndarray) -> np.ndarray:
    """Index of the best mean CV AP per class, the first one on ties.

    Args:
        cv_ap: (K, n_costs, n_folds).
    Returns:
        (K,) int indices.
    """
    mean = cv_ap.mean(axis=2)
    # ties: AP depends only on the ranking, equal rankings give bit-equal APs, but the fold mean
    # can differ in the last ulp with the summation path; compare on a 1e-12 grid
    return np.argmax(np.round(mean, 12), axis=1)


def decision_scores(feats: np.ndarray, weights: np.ndarray, intercept_scaling: float = 1.0):
    """Scores (n, K) of the refit SVMs (weights (K, D), bias last) on features (n, d)."""
    return augment(feats, intercept_scaling) @ np.asarray(weights).T

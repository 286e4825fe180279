"""Batched linear SVMs with liblinear's objective, and cross-validated cost selection.

The VOC07 protocol fits one L2-regularised squared-hinge SVM per (class, cost, fold): 20 x 11 x 3
problems plus 20 refits. liblinear's dual coordinate descent solves them one at a time and
crawls at large costs (it often stops at max_iter). The objective is strictly convex, so its
minimiser is unique and any solver that reaches it gives the same classifier. Here all
problems that share a cost are solved together in the primal by a truncated Newton method
(preconditioned conjugate gradients + exact line search on the piecewise-quadratic objective):
every step is a dense matrix product over all problems at once, which keeps every core busy,
and the solution at one cost warm-starts the next larger cost.

Problem p, with augmented features x~ = [x, intercept_scaling] (liblinear regularises the bias):

    min_w  0.5 * ||w||^2 + sum_i c_ip * max(0, 1 - y_ip * w . x~_i)^2

where c_ip = C * class_weight[y_ip] for training samples and 0 for samples outside the fold.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
from sklearn.model_selection import StratifiedKFold

from transfer.ap import step_ap

logger = logging.getLogger("imsvd.svm")


class SVMError(ValueError):
    """Invalid input to the SVM stage (shapes, labels, costs)."""


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
    tol: float = 1e-4,
    max_newton: int = 100,
    max_cg: int = 500,
) -> tuple[np.ndarray, dict]:
    """Solve P squared-hinge linear SVMs on shared features by batched truncated Newton.

    Args:
        xa: (n, D) float64 augmented features (see :func:`augment`).
        y: (n, P) labels in {+1, -1}.
        c: (n, P) per-sample costs >= 0 (0 removes a sample from that problem).
        w0: optional (D, P) warm start.
        tol: stop a problem when ||grad|| <= tol * ||grad at w=0||.
        max_newton: Newton iterations cap.
        max_cg: conjugate-gradient iterations cap per Newton step.
    Returns:
        (w, info): w is (D, P); info has "newton_iters", "cg_iters" and "converged" (P,) bool.
    """
    n, dim = xa.shape
    if y.shape != c.shape or y.shape[0] != n:
        raise SVMError(f"fit_batched: xa {xa.shape}, y {y.shape}, c {c.shape} disagree")
    p_all = y.shape[1]
    w = np.zeros((dim, p_all)) if w0 is None else np.array(w0, dtype=np.float64, copy=True)
    cy = c * y
    g0 = np.linalg.norm(2.0 * (xa.T @ cy), axis=0)
    g0 = np.where(g0 > 0, g0, 1.0)
    xa2t = (xa * xa).T
    eig = None
    if PRECOND == "eig":
        lam, vec = np.linalg.eigh(xa.T @ xa)
        eig = (np.maximum(lam, 0.0), vec)
    z = xa @ w
    active = np.arange(p_all)
    converged = np.zeros(p_all, dtype=bool)
    newton_iters = cg_total = 0
    for _ in range(max_newton):
        if active.size == 0:
            break
        newton_iters += 1
        wa, ya, ca, cya = w[:, active], y[:, active], c[:, active], cy[:, active]
        m = ya * z[:, active]
        viol = np.maximum(0.0, 1.0 - m)
        grad = wa - 2.0 * (xa.T @ (cya * viol))
        gnorm = np.linalg.norm(grad, axis=0)
        done = gnorm <= tol * g0[active]
        if done.any():
            converged[active[done]] = True
            keep = ~done
            active = active[keep]
            if active.size == 0:
                break
            wa, ya, ca, cya = wa[:, keep], ya[:, keep], ca[:, keep], cya[:, keep]
            m, viol, grad, gnorm = m[:, keep], viol[:, keep], grad[:, keep], gnorm[keep]
        dmask = ca * (m < 1.0)
        if eig is not None:
            gamma = 2.0 * dmask.sum(axis=0) / n
            precond = (eig[0], eig[1], gamma)
        else:
            precond = 1.0 + 2.0 * (xa2t @ dmask)
        s, iters = _pcg(xa, dmask, -grad, precond, rtol=0.1, max_iter=max_cg)
        cg_total += iters
        u = ya * (xa @ s)
        t = _line_search(wa, s, m, u, ca)
        w[:, active] = wa + t * s
        z[:, active] += t * (ya * u)  # ya * ya = 1: back to raw scores
    info = {"newton_iters": newton_iters, "cg_iters": cg_total, "converged": converged}
    return w, info


PRECOND = "eig"


def _apply_precond(precond, r, idx):
    if isinstance(precond, tuple):
        lam, vec, gamma = precond
        return vec @ ((vec.T @ r) / (1.0 + np.outer(lam, gamma[idx])))
    return r / precond[:, idx]


def _pcg(
    xa: np.ndarray,
    dmask: np.ndarray,
    b: np.ndarray,
    precond: np.ndarray,
    rtol: float,
    max_iter: int,
) -> tuple[np.ndarray, int]:
    """Batched preconditioned CG for (I + 2 X^T diag(d_p) X) s_p = b_p, one column per problem."""
    s = np.zeros_like(b)
    xa32 = xa.astype(np.float32)
    xa32t = np.ascontiguousarray(xa32.T)
    dmask32 = dmask.astype(np.float32)
    r = b.copy()
    zr = _apply_precond(precond, r, np.arange(b.shape[1]))
    pdir = zr.copy()
    rz = np.einsum("dp,dp->p", r, zr)
    bnorm = np.linalg.norm(b, axis=0)
    live = np.ones(b.shape[1], dtype=bool)
    it = 0
    for it in range(1, max_iter + 1):
        idx = np.nonzero(live)[0]
        pd = pdir[:, idx]
        # float32 products: the direction only needs to be approximate (the gradient, objective
        # and line search stay float64), and they halve the cost of the dominant operation
        pd32 = pd.astype(np.float32)
        hp = pd + 2.0 * (xa32t @ (dmask32[:, idx] * (xa32 @ pd32))).astype(np.float64)
        php = np.einsum("dp,dp->p", pd, hp)
        alpha = rz[idx] / np.where(php > 0, php, 1.0)
        s[:, idx] += alpha * pd
        r[:, idx] -= alpha * hp
        rn = np.linalg.norm(r[:, idx], axis=0)
        finished = rn <= rtol * bnorm[idx]
        zr_i = _apply_precond(precond, r[:, idx], idx)
        rz_new = np.einsum("dp,dp->p", r[:, idx], zr_i)
        beta = rz_new / np.where(rz[idx] > 0, rz[idx], 1.0)
        pdir[:, idx] = zr_i + beta * pd
        rz[idx] = rz_new
        live[idx[finished]] = False
        if not live.any():
            break
    return s, it


def _line_search(
    w: np.ndarray, s: np.ndarray, m: np.ndarray, u: np.ndarray, c: np.ndarray, iters: int = 20
) -> np.ndarray:
    """Exact minimiser over t >= 0 of the piecewise-quadratic objective along w + t s (per column).

    phi(t) = 0.5 ||w + t s||^2 + sum c max(0, 1 - m - t u)^2 is convex and piecewise quadratic:
    Newton's method on phi' from t = 1 reaches the minimiser in a few steps.
    """
    ws = np.einsum("dp,dp->p", w, s)
    ss = np.einsum("dp,dp->p", s, s)
    t = np.ones(w.shape[1])
    for _ in range(iters):
        v = 1.0 - m - t * u
        act = v > 0
        d1 = ws + t * ss - 2.0 * np.einsum("np,np->p", c * act * v, u)
        d2 = ss + 2.0 * np.einsum("np,np->p", c * act, u * u)
        step = d1 / np.where(d2 > 0, d2, 1.0)
        t = np.maximum(t - step, 0.0)
        if np.all(np.abs(step) <= 1e-12 * np.maximum(t, 1.0)):
            break
    return t


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
    import warnings

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
        refit_weights: (K, n_costs, D) refit weights at every cost.
        stats: solver iteration counts.
    """

    costs: list
    cv_ap: np.ndarray
    best_cost_index: np.ndarray
    weights: np.ndarray
    refit_weights: np.ndarray
    stats: dict


def cross_validate_svms(
    feats: np.ndarray,
    labels: np.ndarray,
    costs: Sequence[float],
    class_weight: Mapping[int, float] | None = None,
    n_folds: int = 3,
    intercept_scaling: float = 1.0,
    tol: float = 1e-4,
    max_newton: int = 100,
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
    Returns:
        A :class:`CVResult`.
    """
    class_weight = dict(class_weight or {1: 2.0, -1: 1.0})
    if set(class_weight) != {1, -1}:
        raise SVMError(f"class_weight must have keys 1 and -1, got {sorted(class_weight)}")
    costs = [float(cst) for cst in costs]
    if not costs or any(cst <= 0 for cst in costs):
        raise SVMError(f"costs must be a non-empty list of positive numbers, got {costs}")
    labels = np.asarray(labels)
    if labels.ndim == 1:
        labels = labels[:, None]
    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim != 2 or feats.shape[0] != labels.shape[0]:
        raise SVMError(f"features {feats.shape} and labels {labels.shape} disagree")
    n, k = labels.shape
    xa = augment(feats, intercept_scaling)
    yb = binary_labels(labels)  # (n, K)
    base_c = np.where(yb > 0, class_weight[1], class_weight[-1])
    # problems: (class, fold) for each CV fold plus one "all rows" refit problem per class
    folds = [stratified_folds(yb[:, j], n_folds) for j in range(k)]
    nf = n_folds + 1
    y_p = np.repeat(yb, nf, axis=1)  # column j * nf + f
    mask = np.ones((n, k * nf))
    for j in range(k):
        for f, test_idx in enumerate(folds[j]):
            mask[test_idx, j * nf + f] = 0.0
    c_base = np.repeat(base_c, nf, axis=1) * mask
    order = np.argsort(costs, kind="stable")
    cv_ap = np.zeros((k, len(costs), n_folds))
    refit = np.zeros((k, len(costs), xa.shape[1]))
    w = None
    stats = {"newton_iters": 0, "cg_iters": 0, "unconverged": 0}
    for ci in order:
        w, info = fit_batched(xa, y_p, costs[ci] * c_base, w0=w, tol=tol, max_newton=max_newton)
        stats["newton_iters"] += info["newton_iters"]
        stats["cg_iters"] += info["cg_iters"]
        stats["unconverged"] += int((~info["converged"]).sum())
        scores = xa @ w
        for j in range(k):
            for f, test_idx in enumerate(folds[j]):
                cv_ap[j, ci, f] = step_ap(scores[test_idx, j * nf + f], yb[test_idx, j])
            refit[j, ci] = w[:, j * nf + n_folds]
        logger.info(
            "C=%g: mean CV AP %.4f (%d Newton, %d CG iterations)",
            costs[ci],
            cv_ap[:, ci].mean(),
            info["newton_iters"],
            info["cg_iters"],
        )
    if stats["unconverged"]:
        logger.warning("%d SVM problems stopped at max_newton", stats["unconverged"])
    best = choose_cost(cv_ap)
    weights = refit[np.arange(k), best]
    return CVResult(costs, cv_ap, best, weights, refit, stats)


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


def _liblinear_cv_job(xa_plain, yb, folds, cost, class_weight, intercept_scaling, tol, max_iter):
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.svm import LinearSVC

    def make() -> LinearSVC:
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

    aps = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for test_idx in folds:
            train = np.ones(yb.size, dtype=bool)
            train[test_idx] = False
            clf = make().fit(xa_plain[train], yb[train])
            aps.append(step_ap(clf.decision_function(xa_plain[test_idx]), yb[test_idx]))
        clf = make().fit(xa_plain, yb)
    return aps, np.r_[clf.coef_.ravel(), clf.intercept_ / intercept_scaling]


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
    from joblib import Parallel, delayed

    class_weight = dict(class_weight or {1: 2.0, -1: 1.0})
    costs = [float(cst) for cst in costs]
    labels = np.asarray(labels)
    if labels.ndim == 1:
        labels = labels[:, None]
    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim != 2 or feats.shape[0] != labels.shape[0]:
        raise SVMError(f"features {feats.shape} and labels {labels.shape} disagree")
    yb_all = binary_labels(labels)
    k = labels.shape[1]
    folds = [stratified_folds(yb_all[:, j], n_folds) for j in range(k)]
    jobs = [(j, ci) for j in range(k) for ci in range(len(costs))]
    out = Parallel(n_jobs=n_jobs)(
        delayed(_liblinear_cv_job)(
            feats,
            yb_all[:, j],
            folds[j],
            costs[ci],
            class_weight,
            intercept_scaling,
            tol,
            max_iter,
        )
        for j, ci in jobs
    )
    cv_ap = np.zeros((k, len(costs), n_folds))
    refit = np.zeros((k, len(costs), feats.shape[1] + 1))
    for (j, ci), (aps, w) in zip(jobs, out):
        cv_ap[j, ci] = aps
        refit[j, ci] = w
    best = choose_cost(cv_ap)
    return CVResult(costs, cv_ap, best, refit[np.arange(k), best], refit, {"fits": len(jobs)})

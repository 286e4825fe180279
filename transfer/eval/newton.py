"""Inner steps of the batched finite-Newton SVM solver of :mod:`transfer.eval.svm`.

:class:`SolverSetup` holds what every problem on the same features shares; each iteration
(:func:`newton_iteration`) drops the converged problems and moves the others by a Newton step.
The Newton direction of each problem comes either from an exact solve on the Gram matrix of
its margin-violating rows (:func:`direct_direction`) or from conjugate gradients batched over
problems (:func:`pcg`) with a low-rank preconditioner (:func:`top_eig`, :func:`apply_precond`);
:func:`line_search` finds the exact step on the piecewise-quadratic objective.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
from threadpoolctl import threadpool_limits


class SolverSetup:
    """Quantities shared by every problem on the same features (computed once per feature set).

    Attributes:
        xa: (n, D) float64 augmented features; xa32 / xa32t: float32 copies for CG products.
        eig: leading eigenpairs (values, vectors) of xa^T xa, for the CG preconditioner.
        kernel: (n, n) Gram matrix xa xa^T for the direct dual solves, or None when n is too
            large to hold it (then only CG is used).
        direct_max: the largest margin-violating set whose Newton direction is solved directly
            (0 without ``kernel``).
    """

    def __init__(self, xa: np.ndarray, max_kernel_rows: int = 12000) -> None:
        self.xa = np.ascontiguousarray(xa, dtype=np.float64)
        self.xa32 = self.xa.astype(np.float32)
        self.xa32t = np.ascontiguousarray(self.xa32.T)
        self.eig = top_eig(self.xa, rank=min(64, self.xa.shape[1]))
        n, dim = self.xa.shape
        self.kernel = self.xa @ self.xa.T if n <= max_kernel_rows else None
        # a direct solve costs ~|A|^3 / 3 flops, a CG solve ~ (iterations) * 4 n D: prefer the
        # direct solve while it is cheaper than about 30 CG iterations
        self.direct_max = int((3 * 30 * 4 * n * dim) ** (1 / 3)) if self.kernel is not None else 0


def newton_iteration(
    setup: SolverSetup,
    w: np.ndarray,
    z: np.ndarray,
    y: np.ndarray,
    c: np.ndarray,
    active: np.ndarray,
    g_stop: np.ndarray,
    info: dict,
    max_cg: int,
    threads: int,
) -> np.ndarray:
    """One Newton iteration of the problems ``active``; ``w``, ``z`` and ``info`` are updated.

    A problem whose gradient norm is at most its ``g_stop`` is marked converged and dropped;
    every other one moves along its Newton direction (:func:`newton_direction`) by the exact
    line search.

    Args:
        setup: the :class:`SolverSetup` of the features.
        w, z: (D, P) weights of every problem and (n, P) their raw scores ``setup.xa @ w``.
        y, c: (n, P) labels in {+1, -1} and per-sample costs.
        active: indices of the problems still iterating.
        g_stop: (P,) gradient norm at which each problem stops.
        info: "cg_iters" and "direct_solves" (added to), "converged" (P,) bool (set).
        max_cg, threads: as in :func:`transfer.eval.svm.fit_batched`.
    Returns:
        The indices of the problems still iterating.
    """
    xa = setup.xa
    wa, ya, ca = w[:, active], y[:, active], c[:, active]
    m = ya * z[:, active]
    viol = np.maximum(0.0, 1.0 - m)
    grad = wa - 2.0 * (xa.T @ (ca * ya * viol))
    done = np.linalg.norm(grad, axis=0) <= g_stop[active]
    if done.any():
        info["converged"][active[done]] = True
        keep = ~done
        active = active[keep]
        if active.size == 0:
            return active
        wa, ya, ca, m, grad = wa[:, keep], ya[:, keep], ca[:, keep], m[:, keep], grad[:, keep]
    s, direct_solves, cg_iters = newton_direction(
        setup, wa, ya, ca * (m < 1.0), grad, max_cg, threads
    )
    info["direct_solves"] += direct_solves
    info["cg_iters"] += cg_iters
    u = ya * (xa @ s)
    t = line_search(wa, s, m, u, ca)
    w[:, active] = wa + t * s
    z[:, active] += t * (ya * u)  # ya * ya = 1: back to raw scores
    return active


def newton_direction(
    setup: SolverSetup,
    w: np.ndarray,
    y: np.ndarray,
    dmask: np.ndarray,
    grad: np.ndarray,
    max_cg: int,
    threads: int,
) -> tuple[np.ndarray, int, int]:
    """The Newton step (D, P) of each problem from weights ``w`` (D, P) and gradient ``grad``.

    Exact (:func:`direct_direction`, ``threads`` at a time) where the problem's violating set
    has at most ``setup.direct_max`` rows, batched preconditioned CG (:func:`pcg`, at most
    ``max_cg`` iterations) otherwise. ``y``: (n, P) labels; ``dmask``: (n, P) the costs of the
    margin-violating rows, 0 elsewhere.

    Returns:
        (step, direct solves, CG iterations).
    """
    n_act = (dmask > 0).sum(axis=0)
    direct = n_act <= setup.direct_max
    s = np.empty_like(w)
    direct_solves = cg_iters = 0
    if direct.any():
        cols = np.nonzero(direct)[0]
        dirs = _map_threads(
            lambda col: direct_direction(setup, y[:, col], dmask[:, col]), cols, threads
        )
        for col, d in zip(cols, dirs):
            s[:, col] = d - w[:, col]
        direct_solves = int(cols.size)
    if (~direct).any():
        cols = np.nonzero(~direct)[0]
        n = setup.xa.shape[0]
        precond = (setup.eig[0], setup.eig[1], 2.0 * dmask[:, cols].sum(axis=0) / n)
        s[:, cols], cg_iters = pcg(setup, dmask[:, cols], -grad[:, cols], precond, 0.1, max_cg)
    return s, direct_solves, cg_iters


def _map_threads(fn, items, threads: int) -> list:
    """``[fn(i) for i in items]`` on a thread pool, BLAS single-threaded inside each task.

    The direct solves are independent, moderate-size LAPACK calls (they release the GIL):
    one per core beats one multi-threaded factorisation at a time.
    """
    if threads <= 1 or len(items) == 1:
        return [fn(i) for i in items]
    with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(threads) as pool:
        return list(pool.map(fn, items))


def direct_direction(setup: SolverSetup, y: np.ndarray, dcost: np.ndarray) -> np.ndarray:
    """Minimiser of 0.5||w||^2 + sum_A c_i (1 - y_i w.x_i)^2 over the violating set A.

    Stationarity gives w = sum_A alpha_i y_i x_i with (Q_AA + diag(1 / (2 c_A))) alpha = 1,
    Q_ij = y_i y_j x_i.x_j. As Q = D_y K D_y with D_y^2 = I, beta = y * alpha solves the
    label-free system (K_AA + diag(1 / (2 c_A))) beta = y_A and w = sum_A beta_i x_i.
    """
    from scipy.linalg import cho_factor, cho_solve

    a = np.nonzero(dcost > 0)[0]
    if a.size == 0:
        return np.zeros(setup.xa.shape[1])
    q = setup.kernel[np.ix_(a, a)]
    q[np.diag_indices_from(q)] += 1.0 / (2.0 * dcost[a])
    factor = cho_factor(q, lower=True, overwrite_a=True, check_finite=False)
    beta = cho_solve(factor, y[a], check_finite=False)
    return setup.xa[a].T @ beta


def top_eig(xa: np.ndarray, rank: int, iters: int = 4, seed: int = 0):
    """Leading ``rank`` eigenpairs of xa^T xa by randomized subspace iteration (no D^3 work)."""

    def orth(m: np.ndarray) -> np.ndarray:
        # tall-skinny QR gains nothing from BLAS threads and stalls badly on a busy machine
        with threadpool_limits(limits=1, user_api="blas"):
            return np.linalg.qr(m)[0]

    rng = np.random.default_rng(seed)
    q = orth(xa.T @ (xa @ rng.normal(size=(xa.shape[1], rank))))
    for _ in range(iters):
        q = orth(xa.T @ (xa @ q))
    small = q.T @ (xa.T @ (xa @ q))
    lam, u = np.linalg.eigh((small + small.T) / 2)
    return np.maximum(lam, 0.0), q @ u


def apply_precond(precond, r: np.ndarray) -> np.ndarray:
    # inverse of M_p = I + gamma_p V diag(lam) V^T: the leading eigen-directions of X^T X
    # scaled by problem p's mean curvature weight gamma_p. Pooled CNN features are strongly
    # correlated, and these few directions are what makes the Newton system ill-conditioned
    lam, vec, gamma = precond
    shrink = np.outer(lam, gamma) / (1.0 + np.outer(lam, gamma))
    return r - vec @ (shrink * (vec.T @ r))


def pcg(
    setup: SolverSetup,
    dmask: np.ndarray,
    b: np.ndarray,
    precond: tuple,
    rtol: float,
    max_iter: int,
) -> tuple[np.ndarray, int]:
    """Batched preconditioned CG for (I + 2 X^T diag(d_p) X) s_p = b_p, one column per problem."""
    s = np.zeros_like(b)
    dmask32 = dmask.astype(np.float32)
    r = b.copy()
    zr = apply_precond(precond, r)
    pdir = zr.copy()
    rz = np.einsum("dp,dp->p", r, zr)
    bnorm = np.linalg.norm(b, axis=0)
    live = np.ones(b.shape[1], dtype=bool)
    lam, vec, gamma = precond
    it = 0
    for it in range(1, max_iter + 1):
        idx = np.nonzero(live)[0]
        pd = pdir[:, idx]
        # float32 products: the direction only needs to be approximate (the gradient, objective
        # and line search stay float64), and they halve the cost of the dominant operation
        prod = setup.xa32t @ (dmask32[:, idx] * (setup.xa32 @ pd.astype(np.float32)))
        hp = pd + 2.0 * prod.astype(np.float64)
        php = np.einsum("dp,dp->p", pd, hp)
        alpha = rz[idx] / np.where(php > 0, php, 1.0)
        s[:, idx] += alpha * pd
        r[:, idx] -= alpha * hp
        rn = np.linalg.norm(r[:, idx], axis=0)
        finished = rn <= rtol * bnorm[idx]
        zr_i = apply_precond((lam, vec, gamma[idx]), r[:, idx])
        rz_new = np.einsum("dp,dp->p", r[:, idx], zr_i)
        beta = rz_new / np.where(rz[idx] > 0, rz[idx], 1.0)
        pdir[:, idx] = zr_i + beta * pd
        rz[idx] = rz_new
        live[idx[finished]] = False
        if not live.any():
            break
    return s, it


def line_search(
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

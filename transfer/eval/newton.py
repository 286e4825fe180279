"""Inner steps of the batched finite-Newton SVM solver of :mod:`transfer.eval.svm`.

The Newton direction of each problem comes either from an exact solve on the Gram matrix of
its margin-violating rows (:func:`direct_direction`) or from conjugate gradients batched over
problems (:func:`pcg`) with a low-rank preconditioner (:func:`top_eig`, :func:`apply_precond`);
:func:`line_search` finds the exact step on the piecewise-quadratic objective.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # a type only: transfer.eval.svm imports this module
    from transfer.eval.svm import SolverSetup


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
    from threadpoolctl import threadpool_limits

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

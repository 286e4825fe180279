"""Average precision for the VOC07 SVM protocol.

Two flavours are needed (PROTOCOLS section 3):

* :func:`voc_ap` - the reported test metric: area under the monotone (interpolated) precision-
  recall envelope over all recall points (VOC2010+ style). Labels are 1 / -1 / 0 and the 0
  ("difficult") examples are excluded.
* :func:`step_ap` - the cross-validation score: non-interpolated AP (sum over thresholds of
  precision times recall increment), the definition scikit-learn's ``average_precision_score``
  uses, so the chosen costs agree with ``cross_val_score(..., scoring="average_precision")``.

Both treat tied scores as one threshold, so the result does not depend on the input order.
A class with no positive example has AP 0.0 (scikit-learn's convention).
"""

from __future__ import annotations

import numpy as np


def _pr_points(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall at each distinct score threshold (descending).

    Args:
        scores: (n,) decision scores.
        positive: (n,) bool, True for positives.
    Returns:
        (precision, recall), each (t,) for the t distinct thresholds; empty when no positive.
    """
    order = np.argsort(-scores, kind="mergesort")
    s = scores[order]
    pos = positive[order].astype(np.float64)
    tp = np.cumsum(pos)
    fp = np.cumsum(1.0 - pos)
    # keep the last index of every run of equal scores: ties form one threshold
    last = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]
    tp, fp = tp[last], fp[last]
    npos = tp[-1] if tp.size else 0.0
    if npos == 0:
        return np.zeros(0), np.zeros(0)
    return tp / (tp + fp), tp / npos


def _check(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel()
    if scores.shape != labels.shape:
        raise ValueError(f"AP: {scores.size} scores but {labels.size} labels")
    if not np.all(np.isfinite(scores)):
        raise ValueError("AP: scores contain NaN or inf")
    return scores, labels


def voc_ap(scores: np.ndarray, labels: np.ndarray) -> float:
    """VOC2010+ AP: area under the interpolated precision envelope, difficult (0) excluded.

    Args:
        scores: (n,) decision scores, higher = more confident positive.
        labels: (n,) in {1, -1, 0}; 0 marks difficult examples, ignored here.
    Returns:
        AP in [0, 1] (0.0 when there is no positive).
    """
    scores, labels = _check(scores, labels)
    keep = labels != 0
    prec, rec = _pr_points(scores[keep], labels[keep] > 0)
    if prec.size == 0:
        return 0.0
    # envelope: precision at recall r is the max precision at any recall >= r
    env = np.maximum.accumulate(prec[::-1])[::-1]
    drec = np.diff(np.r_[0.0, rec])
    return float(np.sum(drec * env))


def step_ap(scores: np.ndarray, labels: np.ndarray) -> float:
    """Non-interpolated AP (scikit-learn's ``average_precision_score``) for labels > 0 positive.

    Args:
        scores: (n,) decision scores.
        labels: (n,) labels; > 0 is positive, anything else negative.
    Returns:
        AP in [0, 1] (0.0 when there is no positive).
    """
    scores, labels = _check(scores, labels)
    prec, rec = _pr_points(scores, labels > 0)
    if prec.size == 0:
        return 0.0
    return float(np.sum(np.diff(np.r_[0.0, rec]) * prec))

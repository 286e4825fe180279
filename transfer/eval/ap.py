"""Average precision for the VOC07 SVM protocol.

Two flavours are needed (docs/PROTOCOLS.md section 3.5):

* :func:`voc_ap` - the reported test metric: area under the monotone (interpolated) precision-
  recall envelope over all recall points (VOC2010+ style). Labels are 1 / -1 / 0 and the 0
  ("difficult") examples are excluded. The precision-recall points come from scikit-learn's
  ``precision_recall_curve``; the envelope is the protocol's own step.
* :func:`step_ap` - the cross-validation score: scikit-learn's ``average_precision_score``
  (non-interpolated AP), so the chosen costs agree with
  ``cross_val_score(..., scoring="average_precision")``.

Both treat tied scores as one threshold, so the result does not depend on the input order.
A class with no positive example has AP 0.0 (scikit-learn's convention), without a warning.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, precision_recall_curve


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
    Raises:
        ValueError: shapes differ or a score is not finite.
    """
    scores, labels = _check(scores, labels)
    keep = labels != 0
    positive = labels[keep] > 0
    if not positive.any():
        return 0.0
    prec, rec, _ = precision_recall_curve(positive, scores[keep])
    # scikit-learn lists the points by decreasing recall and appends (recall 0, precision 1);
    # drop that end point and walk by increasing recall
    prec, rec = prec[:-1][::-1], rec[:-1][::-1]
    # envelope: precision at recall r is the max precision at any recall >= r
    env = np.maximum.accumulate(prec[::-1])[::-1]
    return float(np.sum(np.diff(np.r_[0.0, rec]) * env))


def step_ap(scores: np.ndarray, labels: np.ndarray) -> float:
    """Non-interpolated AP (scikit-learn's ``average_precision_score``), labels > 0 positive.

    Args:
        scores: (n,) decision scores.
        labels: (n,) labels; > 0 is positive, anything else negative.
    Returns:
        AP in [0, 1] (0.0 when there is no positive, e.g. a CV fold of a rare class).
    Raises:
        ValueError: shapes differ or a score is not finite.
    """
    scores, labels = _check(scores, labels)
    positive = labels > 0
    if not positive.any():
        return 0.0
    return float(average_precision_score(positive, scores))

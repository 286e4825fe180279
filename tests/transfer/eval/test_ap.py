"""Average precision (transfer.eval.ap): hand-checked values, ties, difficult examples left out,
a brute-force reference and scikit-learn's."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from transfer.eval.ap import step_ap, voc_ap

# ----------------------------------------------------------------------------- AP


def test_voc_ap_hand_checked():
    assert voc_ap([3, 2, 1], [1, 1, -1]) == pytest.approx(1.0)
    # ranks + - - + + : precisions 1, .5, .33, .5, .6 ; envelope 1, .6, .6 at recalls 1/3, 2/3, 1
    s, y = [5, 4, 3, 2, 1], [1, -1, -1, 1, 1]
    assert voc_ap(s, y) == pytest.approx((1 + 0.6 + 0.6) / 3)
    assert step_ap(s, y) == pytest.approx((1 + 0.5 + 0.6) / 3)  # not interpolated
    assert step_ap(s, y) == pytest.approx(average_precision_score(np.array(y) > 0, s))


def test_ap_ties_are_one_threshold_independent_of_order():
    assert voc_ap([0.5, 0.5], [1, -1]) == pytest.approx(0.5)
    assert voc_ap([0.5, 0.5], [-1, 1]) == pytest.approx(0.5)
    # tie between one positive and two negatives after a sure positive
    s, y = [2.0, 1.0, 1.0, 1.0], [1, -1, 1, -1]
    assert voc_ap(s, y) == pytest.approx(0.5 * 1.0 + 0.5 * 0.5)
    rng = np.random.default_rng(0)
    s = rng.integers(0, 4, size=50).astype(float)
    y = np.where(rng.random(50) < 0.3, 1, -1)
    assert step_ap(s, y) == pytest.approx(average_precision_score(y > 0, s))


def test_difficult_excluded_and_all_negative():
    base = voc_ap([3, 2, 1], [1, -1, 1])
    # a difficult image with the top score changes nothing
    assert voc_ap([9, 3, 2, 1], [0, 1, -1, 1]) == pytest.approx(base)
    assert voc_ap([1, 2, 3], [-1, -1, 0]) == 0.0
    assert step_ap([1, 2, 3], [-1, -1, -1]) == 0.0
    with pytest.raises(ValueError, match="3 scores but 2 labels"):
        voc_ap([1, 2, 3], [1, -1])


def _reference_voc_ap(scores, labels):
    """VOC2010+ AP by brute force: for each distinct threshold, precision and recall of the
    non-difficult examples scoring >= it; envelope; area over recall steps."""
    scores, labels = np.asarray(scores, float), np.asarray(labels)
    keep = labels != 0
    s, pos = scores[keep], labels[keep] > 0
    if not pos.any():
        return 0.0
    points = []
    for t in sorted(set(s.tolist()), reverse=True):
        sel = s >= t
        points.append((pos[sel].sum() / pos.sum(), pos[sel].sum() / sel.sum()))
    ap, prev = 0.0, 0.0
    for r, _ in points:
        ap += (r - prev) * max(p for rr, p in points if rr >= r)
        prev = r
    return ap


@pytest.mark.parametrize("seed", range(6))
def test_voc_ap_matches_a_brute_force_reference(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 60))
    scores = rng.integers(0, 8, n).astype(float) if seed % 2 else rng.normal(size=n)  # ties
    labels = rng.choice([1, -1, -1, 0], n)
    labels[0] = 1
    assert voc_ap(scores, labels) == pytest.approx(_reference_voc_ap(scores, labels), abs=1e-12)
    binary = np.where(labels == 1, 1, -1)
    assert step_ap(scores, binary) == pytest.approx(average_precision_score(binary > 0, scores))

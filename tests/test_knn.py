"""Weighted cosine kNN: hand-checked votes, chunking, entry point, 2 processes == 1 process."""

from __future__ import annotations

import json

import numpy as np
import pytest
from eval_helpers import make_image_tree, make_weights, run_module

from transfer.knn import knn_accuracy, knn_classify, main


def test_weighted_vote_hand_checked():
    # query along x; bank: one class-0 point very close, two class-1 points further away
    bank = np.array([[1.0, 0.05], [1.0, 0.6], [1.0, -0.6], [-1.0, 0.0]])
    labels = np.array([0, 1, 1, 2])
    q = np.array([[1.0, 0.0]])
    sims = (bank / np.linalg.norm(bank, axis=1, keepdims=True)) @ np.array([1.0, 0.0])
    w = np.exp(sims / 0.07)
    # k=3: class 0 weight w0 vs class 1 weight w1 + w2; T=0.07 makes the close point win
    assert w[0] > w[1] + w[2]
    assert knn_classify(bank, labels, q, ks=(1, 3))[3][0] == 0
    # a hot temperature turns it into a near-majority vote: class 1 wins
    assert knn_classify(bank, labels, q, ks=(3,), temperature=100.0)[3][0] == 1
    # k larger than the bank is capped; the far class-2 point adds almost nothing
    assert knn_classify(bank, labels, q, ks=(200,))[200][0] == 0


def test_chunking_and_scale_invariance():
    rng = np.random.default_rng(0)
    bank, labels = rng.normal(size=(300, 16)), rng.integers(0, 5, 300)
    q = rng.normal(size=(77, 16))
    a = knn_classify(bank, labels, q, ks=(20, 200), chunk_size=8)
    b = knn_classify(bank * 3.0, labels, q * 0.5, ks=(20, 200), chunk_size=1000)
    for k in (20, 200):
        np.testing.assert_array_equal(a[k], b[k])
    # queries equal to bank rows with k=1 recover the bank labels
    acc = knn_accuracy(bank, labels, bank, labels, ks=(1,))
    assert acc["top1_k1"] == 100.0


def test_bad_inputs():
    with pytest.raises(ValueError, match="temperature"):
        knn_classify(np.ones((2, 2)), [0, 1], np.ones((1, 2)), temperature=0)
    with pytest.raises(ValueError, match="differ"):
        knn_classify(np.ones((2, 2)), [0, 1], np.ones((1, 3)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("knn")
    make_image_tree(root / "train", n_per_class=8, seed=0)
    make_image_tree(root / "val", n_per_class=4, seed=1)
    return root, make_weights(root / "w.pth")


def test_entry_point_on_tiny_tree(tiny, tmp_path):
    root, weights = tiny
    out = tmp_path / "out"
    assert main(["--config", "knn_tiny", "--weights", str(weights), "--train-root",
                 str(root / "train"), "--val-root", str(root / "val"),
                 "--output-dir", str(out)]) == 0  # fmt: skip
    res = json.loads((out / "knn_results.json").read_text())
    assert res["num_train"] == 24 and res["num_val"] == 12
    assert res["top1_k1"] > 60.0  # colour classes: well above the 33% chance level
    assert (out / "features" / "train_pool5.feats.npy").is_file()


@pytest.mark.dist
def test_two_processes_equal_one(tiny, tmp_path):
    root, weights = tiny
    results = []
    for nproc in (1, 2):
        out = tmp_path / f"out{nproc}"
        run_module("transfer.knn", ["--config", "knn_tiny", "--weights", str(weights),
                                    "--train-root", str(root / "train"), "--val-root",
                                    str(root / "val"), "--output-dir", str(out)],
                   nproc=nproc)  # fmt: skip
        results.append(json.loads((out / "knn_results.json").read_text()))
        feats = np.load(out / "features" / "train_pool5.feats.npy")
        if nproc == 1:
            ref = feats
    np.testing.assert_allclose(feats, ref, rtol=1e-5, atol=1e-6)
    for key in ("top1_k1", "top1_k3", "num_train"):
        assert results[0][key] == results[1][key]

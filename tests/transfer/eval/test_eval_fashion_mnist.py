"""Real-data check on Fashion-MNIST: kNN and VOC-style SVMs on features of a fixed random-init
ResNet-18 give sensible (well above chance) and exactly reproducible numbers."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from pretrain.models.backbone import build_backbone
from pretrain.probe.knn import knn_accuracy
from transfer.eval.ap import voc_ap
from transfer.eval.features import extract_features, freeze
from transfer.eval.svm import cross_validate_svms, decision_scores, l2_normalize

ROOT = Path("/usr/share/datasets/fashion-mnist")
pytestmark = pytest.mark.skipif(
    not (ROOT / "train-images-idx3-ubyte.gz").is_file(), reason="Fashion-MNIST not installed"
)
N_TRAIN, N_TEST = 2000, 500


def _idx(name: str) -> np.ndarray:
    with gzip.open(ROOT / name) as f:
        data = f.read()
    nd = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(nd)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * nd).reshape(dims)


def _dataset(split: str, n: int) -> torch.utils.data.TensorDataset:
    prefix = "train" if split == "train" else "t10k"
    x = _idx(f"{prefix}-images-idx3-ubyte.gz")[:n].astype(np.float32)
    y = _idx(f"{prefix}-labels-idx1-ubyte.gz")[:n].astype(np.int64)
    t = (torch.from_numpy(x) / 255.0 - 0.286) / 0.353
    t = torch.nn.functional.pad(t, (2, 2, 2, 2))[:, None].expand(-1, 3, -1, -1).contiguous()
    return torch.utils.data.TensorDataset(t, torch.from_numpy(y))


def _features(seed: int = 0):
    torch.manual_seed(seed)
    # zero_init_residual=False: with zeroed residual branches a random ResNet's pooled features
    # are nearly constant and every evaluation sits at chance
    net = freeze(build_backbone("resnet18", zero_init_residual=False, stem="small_s2"))
    ftr, ytr = extract_features(net, _dataset("train", N_TRAIN), batch_size=250)
    fte, yte = extract_features(net, _dataset("test", N_TEST), batch_size=250)
    return ftr, ytr, fte, yte


@pytest.fixture(scope="module")
def feats():
    return _features()


def test_knn_is_sensible_and_reproducible(feats):
    ftr, ytr, fte, yte = feats
    acc = knn_accuracy(ftr, ytr, fte, yte, ks=(20, 200))
    # chance is 10%; this network measured 74.2% (k=20) / 58.4% (k=200) on this split
    assert acc["top1_k20"] > 60.0 and acc["top1_k200"] > 45.0
    again = _features()
    np.testing.assert_array_equal(again[0], ftr)
    assert knn_accuracy(*again, ks=(20, 200)) == acc


def test_voc_style_svm_is_sensible_and_reproducible(feats):
    ftr, ytr, fte, yte = feats
    n = 1000
    labels_tr = np.where(ytr[:n, None] == np.arange(10), 1, -1)
    labels_te = np.where(yte[:, None] == np.arange(10), 1, -1)
    costs = [0.1, 1.0, 10.0]
    res = cross_validate_svms(l2_normalize(ftr[:n]), labels_tr, costs)
    scores = decision_scores(l2_normalize(fte), res.weights)
    aps = [voc_ap(scores[:, j], labels_te[:, j]) for j in range(10)]
    # one-vs-rest: a random ranking would give AP ~ 0.1
    assert np.mean(aps) > 0.6 and min(aps) > 0.2
    res2 = cross_validate_svms(l2_normalize(ftr[:n]), labels_tr, costs)
    np.testing.assert_array_equal(res2.best_cost_index, res.best_cost_index)
    np.testing.assert_allclose(res2.weights, res.weights, rtol=1e-10, atol=1e-12)

"""Frozen feature extractor: layers, dataset order, cache hits and misses."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import make_image_tree

from pretrain.checkpoint import model_from_checkpoint
from pretrain.datasets import build_image_dataset
from pretrain.images import CorruptImageError
from pretrain.transforms import eval_transform
from transfer.eval import features as feat_mod
from transfer.eval.features import (
    FeatureError,
    cached_features,
    extract_features,
    feature_dim,
    freeze,
    shard_range,
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_backbone):
    root = tmp_path_factory.mktemp("feat")
    tree = make_image_tree(root / "train", n_per_class=4)
    model, _, meta = model_from_checkpoint(tiny_backbone)
    model = freeze(model)
    ds = build_image_dataset(str(tree), transform=eval_transform(40, 32))
    return root, model, meta, ds


def test_backbone_is_frozen_and_in_eval_mode(setup):
    _, model, meta, _ = setup
    assert meta["arch"] == "resnet18" and meta["stem"] == "small_s2"
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("layer", ["pool5", "res5", "res4"])
def test_layers_shapes_and_dataset_order(setup, layer):
    _, model, _, ds = setup
    feats, labels = extract_features(model, ds, batch_size=5, layer=layer)
    assert feats.shape == (len(ds), feature_dim(model, layer))
    assert feats.dtype == np.float32
    np.testing.assert_array_equal(labels, np.array(ds.targets))
    # a single image through the model gives the same row: order is the dataset order
    x = ds[7][0][None]
    with torch.no_grad():
        row = feat_mod.forward_features(model, x, layer)[0].numpy()
    np.testing.assert_allclose(feats[7], row, rtol=1e-4, atol=1e-5)


def test_pool5_is_global_average_of_res5(setup):
    _, model, _, ds = setup
    pool5, _ = extract_features(model, ds, batch_size=6, layer="pool5")
    res5, _ = extract_features(model, ds, batch_size=6, layer="res5")
    # res5 is 2x2-pooled: averaging the four cells gives the global average
    np.testing.assert_allclose(res5.reshape(len(ds), -1, 4).mean(2), pool5, rtol=1e-4, atol=1e-5)


def test_unknown_layer_is_a_clear_error(setup):
    _, model, _, ds = setup
    with pytest.raises(FeatureError, match="unknown feature layer 'fc7'"):
        extract_features(model, ds, layer="fc7")


def test_shard_ranges_are_contiguous_and_cover():
    for n in (0, 1, 7, 10):
        for world in (1, 2, 3, 4):
            ranges = [shard_range(n, r, world) for r in range(world)]
            assert ranges[0][0] == 0 and ranges[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))


def test_cache_hit_and_invalidation(setup, tmp_path, monkeypatch):
    _, model, meta, ds = setup
    f1, y1 = cached_features(tmp_path, "train", model, ds, meta["sha256"], batch_size=8)
    info = json.loads((tmp_path / "train_pool5.json").read_text())
    assert info["weights_sha256"] == meta["sha256"] and info["layer"] == "pool5"
    assert info["split"] == "train" and "CenterCrop" in info["transform"]

    calls = []
    real = feat_mod.extract_features

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(feat_mod, "extract_features", counting)
    f2, y2 = cached_features(tmp_path, "train", model, ds, meta["sha256"], batch_size=8)
    assert calls == []  # hit: nothing extracted
    np.testing.assert_array_equal(f1, f2)
    np.testing.assert_array_equal(y1, y2)
    # other weights -> miss
    cached_features(tmp_path, "train", model, ds, "0" * 64, batch_size=8)
    assert len(calls) == 1
    # other transform -> miss
    ds.transform = eval_transform(36, 32)
    try:
        cached_features(tmp_path, "train", model, ds, "0" * 64, batch_size=8)
    finally:
        ds.transform = eval_transform(40, 32)
    assert len(calls) == 2


@pytest.mark.parametrize("bad_bytes", [b"not an image", b"", b"\x89PNG\r\n\x1a\n\x00\x00"])
def test_unreadable_images_are_left_out_with_their_labels(setup, tmp_path, bad_bytes):
    root, model, meta, _ = setup
    tree = make_image_tree(tmp_path / "t", n_per_class=3)
    (tree / "c0" / "img000.png").write_bytes(bad_bytes)  # first image of the first class
    (tree / "c2" / "img002.png").write_bytes(bad_bytes)  # last image of the last class
    ds = build_image_dataset(str(tree), transform=eval_transform(40, 32))
    feats, labels = extract_features(model, ds, batch_size=4)
    keep = [
        i
        for i, (p, _) in enumerate(ds.samples)
        if not p.endswith(("c0/img000.png", "c2/img002.png"))
    ]
    assert feats.shape[0] == len(keep) == 7
    np.testing.assert_array_equal(labels, [ds.targets[i] for i in keep])
    with torch.no_grad():  # each row is its own image, not a neighbour standing in for it
        rows = feat_mod.forward_features(model, torch.stack([ds[i][0] for i in keep]))
    np.testing.assert_allclose(feats, rows.numpy(), rtol=1e-4, atol=1e-5)
    cached = cached_features(tmp_path / "cache", "val", model, ds, meta["sha256"], batch_size=4)
    np.testing.assert_array_equal(cached[1], labels)
    again = cached_features(tmp_path / "cache", "val", model, ds, meta["sha256"], batch_size=4)
    np.testing.assert_array_equal(again[0], cached[0])
    ds.strict = True  # a cache written with rows left out is not good enough in strict mode
    with pytest.raises(CorruptImageError, match="img00[02].png"):
        cached_features(tmp_path / "cache", "val", model, ds, meta["sha256"], batch_size=4)


def test_no_readable_image_is_an_error(setup, tmp_path):
    _, model, _, _ = setup
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        (tmp_path / c / "x.png").write_bytes(b"junk")
    ds = build_image_dataset(str(tmp_path), transform=eval_transform(40, 32))
    with pytest.raises(FeatureError, match="none of the 2 images"):
        extract_features(model, ds, batch_size=2)

"""Frozen feature extractor: layers, dataset order, unreadable images, half precision."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import make_image_tree

from pretrain.data.datasets import build_image_dataset
from pretrain.data.images import CorruptImageError
from pretrain.data.transforms import eval_transform
from transfer.eval import feature_cache as cache_mod
from transfer.eval import features as feat_mod
from transfer.eval.feature_cache import cached_features
from transfer.eval.features import (
    FeatureError,
    extract_features,
    feature_dim,
    shard_range,
)


def test_backbone_is_frozen_and_in_eval_mode(frozen_tree):
    _, model, meta, _ = frozen_tree
    assert meta["arch"] == "resnet18" and meta["stem"] == "small_s2"
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("layer", ["pool5", "res5", "res4"])
def test_layers_shapes_and_dataset_order(frozen_tree, layer):
    _, model, _, ds = frozen_tree
    feats, labels = extract_features(model, ds, batch_size=5, layer=layer)
    assert feats.shape == (len(ds), feature_dim(model, layer))
    assert feats.dtype == np.float32
    np.testing.assert_array_equal(labels, np.array(ds.targets))
    # a single image through the model gives the same row: order is the dataset order
    x = ds[7][0][None]
    with torch.no_grad():
        row = feat_mod.forward_features(model, x, layer)[0].numpy()
    np.testing.assert_allclose(feats[7], row, rtol=1e-4, atol=1e-5)


def test_pool5_is_global_average_of_res5(frozen_tree):
    _, model, _, ds = frozen_tree
    pool5, _ = extract_features(model, ds, batch_size=6, layer="pool5")
    res5, _ = extract_features(model, ds, batch_size=6, layer="res5")
    # res5 is 2x2-pooled: averaging the four cells gives the global average
    np.testing.assert_allclose(res5.reshape(len(ds), -1, 4).mean(2), pool5, rtol=1e-4, atol=1e-5)


def test_unknown_layer_is_a_clear_error(frozen_tree):
    _, model, _, ds = frozen_tree
    with pytest.raises(FeatureError, match="unknown feature layer 'fc7'"):
        extract_features(model, ds, layer="fc7")


def test_shard_ranges_are_contiguous_and_cover():
    for n in (0, 1, 7, 10):
        for world in (1, 2, 3, 4):
            ranges = [shard_range(n, r, world) for r in range(world)]
            assert ranges[0][0] == 0 and ranges[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))


def test_cache_hit_and_invalidation(frozen_tree, tmp_path, monkeypatch):
    _, model, meta, ds = frozen_tree
    f1, y1 = cached_features(tmp_path, "train", model, ds, meta["sha256"], batch_size=8)
    info = json.loads((tmp_path / "train_pool5.json").read_text())
    assert info["weights_sha256"] == meta["sha256"] and info["layer"] == "pool5"
    assert info["split"] == "train" and "CenterCrop" in info["transform"]

    calls = []
    real = cache_mod.extract_features

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(cache_mod, "extract_features", counting)
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
def test_unreadable_images_are_left_out_with_their_labels(frozen_tree, tmp_path, bad_bytes):
    root, model, meta, _ = frozen_tree
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


def test_no_readable_image_is_an_error(frozen_tree, tmp_path):
    _, model, _, _ = frozen_tree
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        (tmp_path / c / "x.png").write_bytes(b"junk")
    ds = build_image_dataset(str(tmp_path), transform=eval_transform(40, 32))
    with pytest.raises(FeatureError, match="none of the 2 images"):
        extract_features(model, ds, batch_size=2)


@pytest.mark.parametrize("precision, rtol", [("bf16", 3e-2), ("fp16", 3e-2)])
def test_half_precision_extraction_is_close_and_cached_apart(
    frozen_tree, tmp_path, precision, rtol, monkeypatch
):
    _, model, meta, ds = frozen_tree
    full, y = extract_features(model, ds, batch_size=6)
    half, y2 = extract_features(model, ds, batch_size=6, precision=precision)
    assert half.dtype == np.float32 and np.array_equal(y, y2)
    scale = np.abs(full).max()
    np.testing.assert_allclose(half, full, rtol=rtol, atol=rtol * scale)
    assert not np.array_equal(half, full)  # the forward really ran in half precision
    fp32 = cached_features(tmp_path, "train", model, ds, meta["sha256"], batch_size=6)[0]
    assert "precision" not in json.loads((tmp_path / "train_pool5.json").read_text())
    calls = []
    real = cache_mod.extract_features
    monkeypatch.setattr(
        cache_mod, "extract_features", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    again = cached_features(
        tmp_path, "train", model, ds, meta["sha256"], batch_size=6, precision=precision
    )[0]
    assert calls == [1] and np.array_equal(again, half)  # an fp32 entry is not a bf16 one
    assert json.loads((tmp_path / "train_pool5.json").read_text())["precision"] == precision
    assert np.array_equal(fp32, full)
    with pytest.raises(FeatureError, match="features.precision 'fp8'"):
        extract_features(model, ds, precision="fp8")


def test_one_process_gets_the_whole_arrays_whatever_the_gather(frozen_tree):
    _, model, _, ds = frozen_tree
    ref = extract_features(model, ds, batch_size=5)
    for gather in ("main", "shard"):
        got = extract_features(model, ds, batch_size=5, gather=gather)
        np.testing.assert_array_equal(got[0], ref[0])
        np.testing.assert_array_equal(got[1], ref[1])
    with pytest.raises(FeatureError, match="feature gather 'rank0'"):
        extract_features(model, ds, gather="rank0")


def test_channels_last_extraction_gives_the_same_features(frozen_tree):
    _, model, _, ds = frozen_tree
    ref, y = extract_features(model, ds, batch_size=5)
    got, y2 = extract_features(model, ds, batch_size=5, channels_last=True)
    assert np.array_equal(y, y2)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
    assert all(p.is_contiguous() for p in model.parameters())  # the model is left as it is


def test_a_cache_that_cannot_be_written_leaves_the_features(
    frozen_tree, tmp_path, monkeypatch, caplog
):
    _, model, meta, ds = frozen_tree
    ref = extract_features(model, ds, batch_size=5)

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache_mod, "_write_cache", full_disk)
    with caplog.at_level("WARNING", logger="imsvd.features"):
        got = cached_features(tmp_path, "train", model, ds, meta["sha256"], batch_size=5)
    np.testing.assert_array_equal(got[0], ref[0])
    assert "not written" in caplog.text and "No space left" in caplog.text


def test_an_empty_npy_in_the_cache_is_re_extracted(frozen_tree, tmp_path, monkeypatch):
    _, model, meta, ds = frozen_tree
    first = cached_features(tmp_path, "train", model, ds, meta["sha256"], batch_size=5)
    (tmp_path / "train_pool5.feats.npy").write_bytes(b"")
    again = cached_features(tmp_path, "train", model, ds, meta["sha256"], batch_size=5)
    np.testing.assert_array_equal(again[0], first[0])

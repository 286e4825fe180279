"""Frozen feature extractor: layers, dataset order, cache hits and misses."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from helpers import make_image_tree

from pretrain.data.datasets import build_image_dataset
from pretrain.data.images import CorruptImageError
from pretrain.data.transforms import eval_transform
from pretrain.errors import IMSVDError
from pretrain.models.build import model_from_checkpoint
from transfer.eval import feature_cache as cache_mod
from transfer.eval import features as feat_mod
from transfer.eval.feature_cache import cached_features
from transfer.eval.features import (
    FeatureError,
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


def _counting(monkeypatch):
    calls = []
    real = cache_mod.extract_features

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(cache_mod, "extract_features", counting)
    return calls


def _tree_dataset(root, seed=0):
    tree = make_image_tree(root, n_per_class=2, seed=seed)
    return build_image_dataset(str(tree), transform=eval_transform(40, 32))


def test_images_overwritten_under_the_same_names_are_re_extracted(
    setup, tmp_path, monkeypatch, caplog
):
    _, model, meta, _ = setup
    ds = _tree_dataset(tmp_path / "val", seed=0)
    first = cached_features(tmp_path / "cache", "val", model, ds, meta["sha256"])
    calls = _counting(monkeypatch)
    make_image_tree(tmp_path / "val", n_per_class=2, seed=5)  # new pixels, same file names
    ds = build_image_dataset(str(tmp_path / "val"), transform=eval_transform(40, 32))
    with caplog.at_level("INFO", logger="imsvd.features"):
        again = cached_features(tmp_path / "cache", "val", model, ds, meta["sha256"])
    assert calls == [1] and not np.array_equal(first[0], again[0])
    assert "files (size / mtime_ns / content) under the same paths changed" in caplog.text
    # only an mtime change (same bytes): re-extracted too
    path = ds.samples[0][0]
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    cached_features(tmp_path / "cache", "val", model, ds, meta["sha256"])
    assert calls == [1, 1]
    caplog.clear()
    with caplog.at_level("INFO", logger="imsvd.features"):
        cached_features(tmp_path / "cache", "val", model, ds, meta["sha256"])
    assert calls == [1, 1] and "features cache hit" in caplog.text


def test_content_check_sees_same_size_same_mtime_rewrites(setup, tmp_path, monkeypatch):
    _, model, meta, _ = setup
    ds = _tree_dataset(tmp_path / "val")
    for check in ("stat", "content"):
        cached_features(tmp_path / check, "val", model, ds, meta["sha256"], check=check)
    path = ds.samples[0][0]
    st = os.stat(path)
    data = bytearray(open(path, "rb").read())
    data[-1] ^= 0xFF  # same size; the mtime is put back below
    open(path, "wb").write(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    calls = _counting(monkeypatch)
    cached_features(tmp_path / "stat", "val", model, ds, meta["sha256"], check="stat")
    assert calls == []  # size and mtime_ns unchanged: the stat check cannot see it
    cached_features(tmp_path / "content", "val", model, ds, meta["sha256"], check="content")
    assert calls == [1]
    with pytest.raises(FeatureError, match="cache_check"):
        cached_features(tmp_path / "x", "val", model, ds, meta["sha256"], check="mtime")


def test_relative_roots_from_another_directory_are_other_files(setup, tmp_path, monkeypatch):
    _, model, meta, _ = setup
    for where, seed in (("a", 0), ("b", 7)):
        make_image_tree(tmp_path / where / "val", n_per_class=2, seed=seed)
    monkeypatch.chdir(tmp_path / "a")
    ds = build_image_dataset("val", transform=eval_transform(40, 32))
    first = cached_features(tmp_path / "cache", "val", model, ds, meta["sha256"])
    monkeypatch.chdir(tmp_path / "b")
    ds = build_image_dataset("val", transform=eval_transform(40, 32))
    calls = _counting(monkeypatch)
    again = cached_features(tmp_path / "cache", "val", model, ds, meta["sha256"])
    assert calls == [1] and not np.array_equal(first[0], again[0])
    stored = json.loads((tmp_path / "cache" / "val_pool5.json").read_text())
    assert stored["samples_sha256"] == cache_mod.dataset_signature(ds)


@pytest.mark.parametrize("killed_after", ["feats", "labels"])
def test_a_killed_rewrite_never_leaves_a_valid_looking_mix(
    setup, tmp_path, monkeypatch, killed_after
):
    _, model, meta, _ = setup
    ds = _tree_dataset(tmp_path / "val")
    cache = tmp_path / "cache"
    w1 = cached_features(cache, "val", model, ds, meta["sha256"])
    # a run with other weights is killed right after it replaced one array
    torch.manual_seed(3)
    other = freeze(_other_weights(model))
    real_save = cache_mod._save_npy_atomic

    def save_then_die(arr, path):
        real_save(arr, path)
        if str(path).endswith(f"{killed_after}.npy"):
            raise KeyboardInterrupt

    monkeypatch.setattr(cache_mod, "_save_npy_atomic", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        cached_features(cache, "val", other, ds, "1" * 64)
    monkeypatch.setattr(cache_mod, "_save_npy_atomic", real_save)
    calls = _counting(monkeypatch)
    again = cached_features(cache, "val", model, ds, meta["sha256"])  # w1 again
    assert calls == [1]  # not a "hit" on w2's arrays under w1's name
    np.testing.assert_allclose(again[0], w1[0], rtol=1e-5, atol=1e-6)


def _other_weights(model):
    """A copy of ``model`` with other random weights (same architecture)."""
    import copy

    net = copy.deepcopy(model)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.1)
    return net


def _as_rank1(monkeypatch, rank0_says):
    """This process plays rank 1 of 2: rank 0's decision is ``rank0_says`` ([state, rows,
    cols]), the other all-reduces see this rank alone; the files are never signed here."""
    monkeypatch.setattr(cache_mod, "get_rank", lambda: 1)
    monkeypatch.setattr(cache_mod, "get_world_size", lambda: 2)
    monkeypatch.setattr(cache_mod, "main_rank_values", lambda values, device: list(rank0_says))
    monkeypatch.setattr(cache_mod, "all_reduce_sum", lambda t: t)  # this rank alone
    monkeypatch.setattr(cache_mod, "run_on_main", lambda *a, **k: (None, None, 0))  # not rank 0

    def not_here(*a, **k):
        raise AssertionError("files signed on rank 1")

    monkeypatch.setattr(cache_mod, "files_signature", not_here)
    calls = []

    def extract(model, ds, *a, **k):
        calls.append(1)
        return np.zeros((len(ds), 3), np.float32), np.zeros(len(ds), np.int64)

    monkeypatch.setattr(cache_mod, "extract_features", extract)
    return calls


@pytest.mark.parametrize("says", ["miss", "hit", "hit of another shape"])
def test_rank_0_decides_hit_or_miss_for_every_rank(setup, tmp_path, monkeypatch, says):
    _, model, meta, _ = setup
    ds = _tree_dataset(tmp_path / "val")
    cache = tmp_path / "cache"
    first = cached_features(cache, "val", model, ds, meta["sha256"])  # a valid entry
    stored = (cache / "val_pool5.json").read_text()
    n, d = first[0].shape
    rank0_says = {"miss": [0, 0, 0], "hit": [1, n, d], "hit of another shape": [1, n, d + 1]}
    calls = _as_rank1(monkeypatch, rank0_says[says])
    got = cached_features(cache, "val", model, ds, meta["sha256"], check="content")
    if says == "hit":  # read from the entry rank 0 checked, nothing extracted
        assert calls == []
        np.testing.assert_array_equal(got[0], first[0])
    else:  # rank 0 missed (or this rank cannot read the entry): extracts, as rank 0 does
        assert calls == [1] and got[0].shape == (n, 3)
    assert (cache / "val_pool5.json").read_text() == stored  # only rank 0 writes


def test_rank_0_failing_to_check_stops_the_other_ranks(setup, tmp_path, monkeypatch):
    _, model, meta, _ = setup
    ds = _tree_dataset(tmp_path / "val")
    calls = _as_rank1(monkeypatch, [2, 0, 0])
    with pytest.raises(FeatureError, match="rank 0 failed to check"):
        cached_features(tmp_path / "cache", "val", model, ds, meta["sha256"])
    assert calls == []


def _cache_worker(rank, world, port, weights, tree, cache, out_dir):
    from pretrain.dist import cleanup, init_distributed

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    init_distributed("cpu")
    model, _, meta = model_from_checkpoint(weights)
    model = freeze(model)
    ds = build_image_dataset(tree, transform=eval_transform(40, 32))
    if rank == 1:  # this rank would see other files (e.g. a stale NFS attribute cache)
        cache_mod.files_signature = lambda *a, **k: "other"
    calls = _counting(pytest.MonkeyPatch())
    got = [cached_features(cache, "val", model, ds, meta["sha256"]) for _ in range(2)]
    torch.save(
        {"calls": len(calls), "feats": [torch.from_numpy(g[0]) for g in got]},
        f"{out_dir}/rank{rank}.pt",
    )
    cleanup()


@pytest.mark.dist
def test_two_ranks_take_the_same_cache_branch(tiny_backbone, tmp_path):
    import socket

    import torch.multiprocessing as mp

    tree = make_image_tree(tmp_path / "val", n_per_class=2)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = (2, port, str(tiny_backbone), str(tree), str(tmp_path / "cache"), str(tmp_path))
    ctx = mp.spawn(_cache_worker, args=args, nprocs=2, join=False)
    try:
        for _ in range(120):  # a rank alone in a collective would hang: fail instead
            if ctx.join(timeout=1):
                break
        else:
            raise AssertionError("the ranks did not finish (one waits in a collective)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert [g["calls"] for g in got] == [1, 1]  # extracted together once, then a hit on both
    for g in got:
        for feats in g["feats"]:
            torch.testing.assert_close(feats, got[0]["feats"][0], rtol=0, atol=0)


@pytest.mark.parametrize("precision, rtol", [("bf16", 3e-2), ("fp16", 3e-2)])
def test_half_precision_extraction_is_close_and_cached_apart(
    setup, tmp_path, precision, rtol, monkeypatch
):
    _, model, meta, ds = setup
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


def _gather_worker(rank, world, port, weights, tree, cache, out_dir, bad_tree):
    from pretrain import dist as pdist
    from pretrain.dist import cleanup, init_distributed

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    init_distributed("cpu")
    model = freeze(model_from_checkpoint(weights)[0])
    ds = build_image_dataset(tree, transform=eval_transform(40, 32))
    got = {g: extract_features(model, ds, batch_size=2, gather=g) for g in feat_mod.GATHERS}
    # a miss (extract, the shards sent to rank 0 for writing), then a hit (rows memory-mapped)
    got["cache_miss"] = cached_features(cache, "val", model, ds, "w", batch_size=2, gather="shard")
    got["cache_hit"] = cached_features(cache, "val", model, ds, "w", batch_size=2, gather="shard")
    got["cache_main"] = cached_features(cache, "val", model, ds, "w", batch_size=2, gather="main")
    # a corrupt image in rank 1's shard, strict mode: both ranks raise, neither waits alone
    bad = build_image_dataset(bad_tree, transform=eval_transform(40, 32), strict=True)
    try:
        extract_features(model, bad, batch_size=2, gather="shard")
    except IMSVDError as e:
        got["strict_error"] = f"{type(e).__name__}: {e}"
    # uneven (one rank empty) rows sent in one-row chunks
    rows = torch.arange(rank * 7, dtype=torch.float64).reshape(-1, 1) * (rank + 1)
    whole = pdist.gather_rows_to_main(rows, [0, 7], chunk_bytes=1)
    got["rows"] = whole
    out = {k: (v if not isinstance(v, tuple) else tuple(torch.from_numpy(a) for a in v))
           for k, v in got.items()}  # fmt: skip
    torch.save(out, f"{out_dir}/gather{rank}.pt")
    cleanup()


@pytest.mark.dist
def test_gather_modes_on_two_ranks(tiny_backbone, tmp_path):
    """all: the whole arrays everywhere; main: on rank 0 only; shard: each rank its own
    contiguous rows, rank 0 first; with the cache, a miss writes the whole entry and a hit
    gives each rank a contiguous slice; every variant equals one process's arrays."""
    import socket

    import torch.multiprocessing as mp

    tree = make_image_tree(tmp_path / "val", n_per_class=3)  # 9 images: shards of 4 and 5
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cache = tmp_path / "cache"
    bad_tree = make_image_tree(tmp_path / "bad", n_per_class=3)
    (bad_tree / "c2" / "img002.png").write_bytes(b"not an image")  # row 8: rank 1's shard
    args = (2, port, str(tiny_backbone), str(tree), str(cache), str(tmp_path), str(bad_tree))
    mp.spawn(_gather_worker, args=args, nprocs=2, join=True)
    model = freeze(model_from_checkpoint(tiny_backbone)[0])
    ref_f, ref_y = extract_features(
        model, build_image_dataset(str(tree), transform=eval_transform(40, 32)), batch_size=2
    )
    got = [torch.load(tmp_path / f"gather{r}.pt") for r in range(2)]

    def same(pair, lo, hi):
        torch.testing.assert_close(pair[0], torch.from_numpy(ref_f[lo:hi]), rtol=1e-5, atol=1e-6)
        assert pair[1].tolist() == ref_y[lo:hi].tolist()

    for r in range(2):
        same(got[r]["all"], 0, 9)
    same(got[0]["main"], 0, 9)
    assert got[1]["main"][0].shape == (0, ref_f.shape[1]) and got[1]["main"][1].shape == (0,)
    for key in ("shard", "cache_miss", "cache_hit"):
        same(got[0][key], 0, 4)
        same(got[1][key], 4, 9)
    same(got[0]["cache_main"], 0, 9)
    assert got[1]["cache_main"][0].shape[0] == 0
    np.testing.assert_allclose(np.load(cache / "val_pool5.feats.npy"), ref_f, rtol=1e-5, atol=1e-6)
    assert got[1]["strict_error"].startswith("CorruptImageError")
    assert (
        got[0]["strict_error"] == "FeatureError: features: rank 1 failed to extract (see its error)"
    )
    assert got[0]["rows"].flatten().tolist() == [2.0 * i for i in range(7)]
    assert got[1]["rows"] is None


def test_one_process_gets_the_whole_arrays_whatever_the_gather(setup):
    _, model, _, ds = setup
    ref = extract_features(model, ds, batch_size=5)
    for gather in ("main", "shard"):
        got = extract_features(model, ds, batch_size=5, gather=gather)
        np.testing.assert_array_equal(got[0], ref[0])
        np.testing.assert_array_equal(got[1], ref[1])
    with pytest.raises(FeatureError, match="feature gather 'rank0'"):
        extract_features(model, ds, gather="rank0")


def test_channels_last_extraction_gives_the_same_features(setup):
    _, model, _, ds = setup
    ref, y = extract_features(model, ds, batch_size=5)
    got, y2 = extract_features(model, ds, batch_size=5, channels_last=True)
    assert np.array_equal(y, y2)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
    assert all(p.is_contiguous() for p in model.parameters())  # the model is left as it is


def test_a_cache_that_cannot_be_written_leaves_the_features(setup, tmp_path, monkeypatch, caplog):
    _, model, meta, ds = setup
    ref = extract_features(model, ds, batch_size=5)

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache_mod, "_write_cache", full_disk)
    with caplog.at_level("WARNING", logger="imsvd.features"):
        got = cached_features(tmp_path, "train", model, ds, meta["sha256"], batch_size=5)
    np.testing.assert_array_equal(got[0], ref[0])
    assert "not written" in caplog.text and "No space left" in caplog.text


def test_an_empty_npy_in_the_cache_is_re_extracted(setup, tmp_path, monkeypatch):
    _, model, meta, ds = setup
    first = cached_features(tmp_path, "train", model, ds, meta["sha256"], batch_size=5)
    (tmp_path / "train_pool5.feats.npy").write_bytes(b"")
    again = cached_features(tmp_path, "train", model, ds, meta["sha256"], batch_size=5)
    np.testing.assert_array_equal(again[0], first[0])

"""The feature cache: hits and misses by content, killed rewrites, rank 0 deciding for every rank,
the gather modes on two ranks."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from helpers import act_as_launcher, free_port, make_image_tree

from pretrain.data.datasets import build_image_dataset
from pretrain.data.transforms import eval_transform
from pretrain.errors import IMSVDError
from pretrain.models.build import model_from_checkpoint
from transfer.eval import feature_cache as cache_mod
from transfer.eval import features as feat_mod
from transfer.eval.feature_cache import cached_features
from transfer.eval.features import (
    FeatureError,
    extract_features,
    freeze,
)


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
    frozen_tree, tmp_path, monkeypatch, caplog
):
    _, model, meta, _ = frozen_tree
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


def test_content_check_sees_same_size_same_mtime_rewrites(frozen_tree, tmp_path, monkeypatch):
    _, model, meta, _ = frozen_tree
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


def test_relative_roots_from_another_directory_are_other_files(frozen_tree, tmp_path, monkeypatch):
    _, model, meta, _ = frozen_tree
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
    frozen_tree, tmp_path, monkeypatch, killed_after
):
    _, model, meta, _ = frozen_tree
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
def test_rank_0_decides_hit_or_miss_for_every_rank(frozen_tree, tmp_path, monkeypatch, says):
    _, model, meta, _ = frozen_tree
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


def test_rank_0_failing_to_check_stops_the_other_ranks(frozen_tree, tmp_path, monkeypatch):
    _, model, meta, _ = frozen_tree
    ds = _tree_dataset(tmp_path / "val")
    calls = _as_rank1(monkeypatch, [2, 0, 0])
    with pytest.raises(FeatureError, match="rank 0 failed to check"):
        cached_features(tmp_path / "cache", "val", model, ds, meta["sha256"])
    assert calls == []


def _cache_worker(rank, world, port, weights, tree, cache, out_dir):
    from pretrain.dist import cleanup, init_distributed

    act_as_launcher(rank, world, port)
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

    import torch.multiprocessing as mp

    tree = make_image_tree(tmp_path / "val", n_per_class=2)
    port = free_port()
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


def _gather_worker(rank, world, port, weights, tree, cache, out_dir, bad_tree):
    from pretrain import dist as pdist
    from pretrain.dist import cleanup, init_distributed

    act_as_launcher(rank, world, port)
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

    import torch.multiprocessing as mp

    tree = make_image_tree(tmp_path / "val", n_per_class=3)  # 9 images: shards of 4 and 5
    port = free_port()
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

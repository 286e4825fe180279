"""Datasets, list files, corrupt-image handling and the pretraining loader."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from pretrain.data import (
    CorruptImageError,
    DataError,
    build_image_dataset,
    build_pretrain_loader,
    parse_list_file,
)
from pretrain.transforms import eval_transform, train_linear_transform


def _save(path, size=(40, 30), seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


@pytest.fixture()
def tree(tmp_path):
    for c, cls in enumerate(["dog", "cat"]):
        os.makedirs(tmp_path / cls)
        for i in range(5):
            _save(tmp_path / cls / f"{i}.jpg", seed=10 * c + i)
    return tmp_path


def _corrupt(tree):
    (tree / "cat" / "bad.jpg").write_bytes(b"not an image")
    good = (tree / "dog" / "0.jpg").read_bytes()
    (tree / "dog" / "trunc.jpg").write_bytes(good[: len(good) // 3])


def test_imagefolder_sorted_classes_and_eval_transform(tree):
    ds = build_image_dataset(str(tree), transform=eval_transform(36, 32))
    assert ds.classes == ["cat", "dog"]
    assert len(ds) == 10 and ds.targets == [0] * 5 + [1] * 5
    img, label = ds[7]
    assert img.shape == (3, 32, 32) and img.dtype == torch.float32 and label == 1
    x, _ = build_image_dataset(str(tree), transform=train_linear_transform(24))[0]
    assert x.shape == (3, 24, 24)


def test_missing_and_empty_roots(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        build_image_dataset(str(tmp_path / "nope"))
    with pytest.raises(DataError, match="no class sub-folders"):
        build_image_dataset(str(tmp_path))
    os.makedirs(tmp_path / "a")
    with pytest.raises(DataError, match="no images"):
        build_image_dataset(str(tmp_path))
    with pytest.raises(DataError, match="root"):
        build_image_dataset()


def test_list_file_formats_and_errors(tree):
    lst = tree / "train.csv"
    lst.write_text("# places style\ndog/0.jpg 3\n\ncat/1.jpg,7\n  cat/2.jpg\t0 \n")
    samples = parse_list_file(str(lst), str(tree))
    assert [s[1] for s in samples] == [3, 7, 0]
    assert samples[1][0] == os.path.join(str(tree), "cat/1.jpg")
    ds = build_image_dataset(list_file=str(lst))  # root defaults to the list's folder
    assert ds[0][0].size == (40, 30) and ds[1][1] == 7
    lst.write_text("dog/0.jpg 3\ndog/1.jpg three\n")
    with pytest.raises(DataError, match=r"train.csv:2: malformed line"):
        build_image_dataset(str(tree), list_file=str(lst))
    lst.write_text("dog/0.jpg -1\n")
    with pytest.raises(DataError, match=r":1: negative label"):
        parse_list_file(str(lst))
    lst.write_text("\n# nothing\n")
    with pytest.raises(DataError, match="no samples"):
        parse_list_file(str(lst))
    with pytest.raises(DataError, match="does not exist"):
        parse_list_file(str(tree / "missing.txt"))


def test_corrupt_images_skipped_counted_or_strict(tree, caplog):
    _corrupt(tree)
    ds = build_image_dataset(str(tree), transform=eval_transform(32, 32))
    assert len(ds) == 12
    labels = [ds[i][1] for i in range(len(ds))]  # never raises
    assert ds.num_skipped == 2 and len(labels) == 12
    assert "bad.jpg" in caplog.text and "trunc.jpg" in caplog.text
    strict = build_image_dataset(str(tree), strict=True)
    bad = [i for i, (p, _) in enumerate(strict.samples) if p.endswith("bad.jpg")][0]
    with pytest.raises(CorruptImageError, match="bad.jpg"):
        strict[bad]


def _cfg(**kw):
    base = {
        "kind": "synthetic",
        "image_size": 16,
        "synthetic_size": 24,
        "synthetic_length": 24,
        "num_workers": 0,
        "pin_memory": False,
        "pipeline": "fast",
    }
    base.update(kw)
    return base


def _epoch(loader, epoch, start_iter=0):
    loader.set_epoch(epoch, start_iter)
    out = []
    for b in loader:
        x1, x2 = loader.prepare(b, "cpu")
        out.append((b["index"], x1, x2))
    return out


@pytest.mark.parametrize("pipeline", ["fast", "pil"])
def test_loader_shapes_and_determinism(pipeline):
    kw = dict(rank=0, world_size=1, seed=3, batch_size_per_rank=5)
    a = build_pretrain_loader(_cfg(pipeline=pipeline), **kw)
    assert len(a) == 4  # 24 // 5, drop_last
    ea = _epoch(a, 0)
    assert len(ea) == 4
    idx, x1, x2 = ea[0]
    assert x1.shape == x2.shape == (5, 3, 16, 16) and x1.dtype == torch.float32
    assert torch.isfinite(x1).all() and x1.abs().max() < 3.0  # normalised range
    assert not torch.equal(x1, x2)  # two different views
    b = build_pretrain_loader(_cfg(pipeline=pipeline), **kw)
    for (i1, y1, z1), (i2, y2, z2) in zip(ea, _epoch(b, 0)):
        assert torch.equal(i1, i2) and torch.equal(y1, y2) and torch.equal(z1, z2)
    e1 = _epoch(a, 1)
    assert not torch.equal(e1[0][0], ea[0][0])  # reshuffled per epoch
    c = build_pretrain_loader(_cfg(pipeline=pipeline), **{**kw, "seed": 4})
    assert not torch.equal(_epoch(c, 0)[0][1], x1)


def test_worker_count_and_resume_do_not_change_batches():
    kw = dict(rank=0, world_size=1, seed=7, batch_size_per_rank=4)
    ref = _epoch(build_pretrain_loader(_cfg(), **kw), 2)
    par = _epoch(build_pretrain_loader(_cfg(num_workers=2), **kw), 2)
    resumed = _epoch(build_pretrain_loader(_cfg(num_workers=2), **kw), 2, start_iter=4)
    assert len(ref) == 6 and len(resumed) == 2
    for (i1, a1, b1), (i2, a2, b2) in zip(ref, par):
        assert torch.equal(i1, i2) and torch.equal(a1, a2) and torch.equal(b1, b2)
    for (i1, a1, b1), (i2, a2, b2) in zip(ref[4:], resumed):
        assert torch.equal(i1, i2) and torch.equal(a1, a2) and torch.equal(b1, b2)


def test_ranks_partition_the_epoch():
    seen = []
    for rank in range(2):
        ld = build_pretrain_loader(_cfg(), rank=rank, world_size=2, seed=0, batch_size_per_rank=5)
        assert len(ld) == 2
        seen += [i for b in _epoch(ld, 0) for i in b[0].tolist()]
    assert len(seen) == len(set(seen)) == 20


def test_loader_drops_corrupt_images_and_strict(tree):
    _corrupt(tree)
    cfg = _cfg(kind="imagefolder", root=str(tree), image_size=16)
    ld = build_pretrain_loader(cfg, rank=0, world_size=1, seed=0, batch_size_per_rank=6)
    total = 0
    for ep in range(2):
        for _, x1, x2 in _epoch(ld, ep):
            assert x1.shape[0] == x2.shape[0]
            total += x1.shape[0]
    assert ld.skipped == 4 and total == 20  # 2 bad files x 2 epochs; 12 - 2 per epoch
    assert ld.pop_skipped() == 4 and ld.pop_skipped() == 0
    strict = build_pretrain_loader(
        {**cfg, "strict": True}, rank=0, world_size=1, seed=0, batch_size_per_rank=6
    )
    strict.set_epoch(0)
    with pytest.raises(CorruptImageError, match=r"(bad|trunc)\.jpg"):
        for _ in strict:
            pass


def test_loader_list_kind_and_all_bad_batch(tmp_path):
    for i in range(4):
        (tmp_path / f"bad{i}.jpg").write_bytes(b"xx")
    _save(tmp_path / "ok0.jpg")
    _save(tmp_path / "ok1.jpg", seed=1)
    (tmp_path / "l.txt").write_text(
        "".join(f"bad{i}.jpg 0\n" for i in range(4)) + "ok0.jpg 1\nok1.jpg 1\n"
    )
    cfg = _cfg(kind="list", list_file=str(tmp_path / "l.txt"), pipeline="fast")
    ld = build_pretrain_loader(cfg, rank=0, world_size=1, seed=0, batch_size_per_rank=2)
    got = _epoch(ld, 0)
    assert ld.skipped == 4 and sum(x.shape[0] for _, x, _ in got) == 2


def test_data_config_errors(tree):
    kw = dict(rank=0, world_size=1, seed=0, batch_size_per_rank=2)
    with pytest.raises(DataError, match="unknown data config key"):
        build_pretrain_loader(_cfg(colour=1), **kw)
    with pytest.raises(DataError, match="data.kind"):
        build_pretrain_loader(_cfg(kind="webdataset"), **kw)
    with pytest.raises(DataError, match="pipeline"):
        build_pretrain_loader(_cfg(pipeline="dali"), **kw)
    with pytest.raises(DataError, match="crop_scale"):
        build_pretrain_loader(_cfg(crop_scale=0.5), **kw)
    with pytest.raises(DataError, match="list_file"):
        build_pretrain_loader(_cfg(kind="list"), **kw)
    with pytest.raises(DataError, match="fewer than one global batch"):
        build_pretrain_loader(_cfg(synthetic_length=3), **{**kw, "batch_size_per_rank": 4})
    ld = build_pretrain_loader(_cfg(), **kw)
    with pytest.raises(DataError, match="start_iter"):
        ld.set_epoch(0, start_iter=99)


def test_auto_pipeline_is_pil_on_cpu():
    kw = dict(rank=0, world_size=1, seed=0, batch_size_per_rank=4)
    assert build_pretrain_loader(_cfg(pipeline="auto"), **kw).dataset.pipeline == "pil"
    assert (
        build_pretrain_loader(_cfg(pipeline="auto"), device="cuda", **kw).dataset.pipeline == "fast"
    )


def test_channels_last_option():
    ld = build_pretrain_loader(
        _cfg(channels_last=True), rank=0, world_size=1, seed=0, batch_size_per_rank=4
    )
    ld.set_epoch(0)
    x1, x2 = ld.prepare(next(iter(ld)), "cpu")
    assert x1.is_contiguous(memory_format=torch.channels_last)

"""The two-view loader: shapes, determinism, workers, resume, ranks, corrupt images, errors."""

import pytest
import torch
from helpers import add_unreadable_images, dog_cat_tree, noise_image

from pretrain.data.images import CorruptImageError, DataError
from pretrain.data.loader import build_pretrain_loader


@pytest.fixture()
def tree(tmp_path):
    return dog_cat_tree(tmp_path)


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
    add_unreadable_images(tree)
    cfg = _cfg(kind="imagefolder", root=str(tree), image_size=16)
    ld = build_pretrain_loader(cfg, rank=0, world_size=1, seed=0, batch_size_per_rank=6)
    total, bad = 0, {
        i for i, (p, _) in enumerate(ld.dataset.source.samples) if "bad" in p or "trunc" in p
    }
    for ep in range(2):
        for idx, x1, x2 in _epoch(ld, ep):
            assert x1.shape[0] == x2.shape[0] == 6  # unreadable images are replaced: full batches
            assert not bad & set(idx.tolist())  # by readable ones
            total += x1.shape[0]
    # 2 bad files x 2 epochs, plus any replacement try that met a bad file again
    skipped = ld.skipped
    assert skipped >= 4 and total == 24
    assert ld.pop_skipped() == skipped and ld.pop_skipped() == 0
    again = build_pretrain_loader(cfg, rank=0, world_size=1, seed=0, batch_size_per_rank=6)
    first = [b[0].tolist() for b in _epoch(again, 1)]
    assert first == [b[0].tolist() for b in _epoch(again, 1)]  # replacements are deterministic
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
    noise_image(tmp_path / "ok0.jpg")
    noise_image(tmp_path / "ok1.jpg", seed=1)
    (tmp_path / "l.txt").write_text(
        "".join(f"bad{i}.jpg 0\n" for i in range(4)) + "ok0.jpg 1\nok1.jpg 1\n"
    )
    cfg = _cfg(kind="list", list_file=str(tmp_path / "l.txt"), pipeline="fast")
    ld = build_pretrain_loader(cfg, rank=0, world_size=1, seed=0, batch_size_per_rank=2)
    got = _epoch(ld, 0)
    # each bad image is replaced by a readable one: 3 full batches of the two good images
    assert ld.skipped >= 4 and [x.shape[0] for _, x, _ in got] == [2, 2, 2]
    assert {i for idx, _, _ in got for i in idx.tolist()} <= {4, 5}
    # nothing readable at all: every try fails, the batches are empty (the engine skips them)
    (tmp_path / "all_bad.txt").write_text("".join(f"bad{i}.jpg 0\n" for i in range(4)))
    cfg = _cfg(kind="list", list_file=str(tmp_path / "all_bad.txt"), pipeline="fast")
    ld = build_pretrain_loader(cfg, rank=0, world_size=1, seed=0, batch_size_per_rank=2)
    ld.set_epoch(0)
    sizes = [b["size"] for b in ld]
    assert sizes == [0, 0] and ld.skipped == 4  # four slots left empty


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

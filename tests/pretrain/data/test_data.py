"""Datasets, list files, corrupt images, image modes, symlinks, train/val labels, the loader."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import REPO
from PIL import Image

from pretrain.data.datasets import (
    build_image_dataset,
    build_train_val_datasets,
    collate_readable,
    parse_list_file,
    scan_image_folder,
)
from pretrain.data.images import CorruptImageError, DataError, PixelLimitError, load_rgb, to_rgb
from pretrain.data.loader import TwoViewDataset, build_pretrain_loader
from pretrain.data.transforms import AugmentConfig, eval_transform, train_linear_transform


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


def test_corrupt_images_dropped_never_substituted(tree, caplog):
    _corrupt(tree)
    (tree / "cat" / "empty.png").write_bytes(b"")
    ds = build_image_dataset(str(tree), transform=eval_transform(32, 32))
    assert len(ds) == 13
    bad = {i for i, (p, _) in enumerate(ds.samples) if os.path.basename(p) in BAD_NAMES}
    assert len(bad) == 3
    for i in range(len(ds)):
        item = ds[i]  # never raises
        if i in bad:
            assert item is None  # not the next image under this file's label
        else:
            assert item[1] == ds.samples[i][1]
    assert ds.num_skipped == 3
    for name in BAD_NAMES:
        assert name in caplog.text
    # batched: the unreadable items are left out and counted, every label is its own image's
    for workers in (0, 1):
        loader = torch.utils.data.DataLoader(
            ds, batch_size=4, collate_fn=collate_readable, num_workers=workers
        )
        rows, dropped, labels = 0, 0, []
        for images, y, n_bad in loader:
            if images is not None:
                assert images.shape[0] == y.shape[0]
                rows += images.shape[0]
                labels += y.tolist()
            dropped += n_bad
        assert (rows, dropped) == (10, 3)
        assert labels == [t for i, t in enumerate(ds.targets) if i not in bad]
    strict = build_image_dataset(str(tree), strict=True)
    for i in sorted(bad):
        with pytest.raises(CorruptImageError, match=os.path.basename(strict.samples[i][0])):
            strict[i]


BAD_NAMES = ("bad.jpg", "trunc.jpg", "empty.png")


def test_collate_readable_all_unreadable_batch():
    x = torch.zeros(3)
    assert collate_readable([None, None]) == (None, None, 2)
    images, labels, dropped = collate_readable([(x, 1), None, (x + 1, 2)])
    assert images.shape == (2, 3) and labels.tolist() == [1, 2] and dropped == 1


# ------------------------------------------------------------------------ image modes -> RGB


def _frombytes(mode, arr):
    """A PIL image of ``mode`` holding exactly the bytes of ``arr`` (h, w[, bands])."""
    arr = np.ascontiguousarray(arr)
    return Image.frombytes(mode, (arr.shape[1], arr.shape[0]), arr.tobytes())


def _grid16(h=4, w=5):
    """16-bit values covering the range, including 0, 65535 and values that round up/down."""
    v = np.array([0, 1, 128, 129, 256, 257, 385, 386, 1000, 32767, 32768, 40000, 65278, 65407,
                  65408, 65535, 12345, 54321, 300, 60000], dtype=np.int64)  # fmt: skip
    return v.reshape(h, w)


def _expect16(v):
    out = np.array([[round(x / 257) for x in row] for row in v.tolist()], dtype=np.uint8)
    return np.repeat(out[..., None], 3, axis=2)


def _composite(rgb, alpha):
    # over white, rounded to nearest, computed in floats independently of the code under test
    a = alpha[..., None].astype(np.float64) / 255.0
    return np.round(rgb.astype(np.float64) * a + 255.0 * (1.0 - a)).astype(np.uint8)


def _mode_cases():
    rng = np.random.default_rng(0)
    v16 = _grid16()
    rgb = rng.integers(0, 256, (4, 5, 3)).astype(np.uint8)
    alpha = rng.integers(0, 256, (4, 5)).astype(np.uint8)
    alpha[0, :3] = [0, 255, 128]
    grey = rng.integers(0, 256, (4, 5)).astype(np.uint8)
    cases = {}
    cases["I;16"] = (_frombytes("I;16", v16.astype("<u2")), _expect16(v16))
    cases["I;16B"] = (_frombytes("I;16B", v16.astype(">u2")), _expect16(v16))
    big = v16.copy()
    big[0, 0], big[0, 1] = -5, 70000  # clipped to 0..65535
    cases["I"] = (_frombytes("I", big.astype(np.int32)), _expect16(np.clip(big, 0, 65535)))
    f = np.linspace(-0.2, 1.2, 20).reshape(4, 5).astype(np.float32)
    f_exp = np.array([[round(min(max(float(x), 0.0), 1.0) * 255) for x in r] for r in f.tolist()])
    cases["F"] = (_frombytes("F", f), np.repeat(f_exp.astype(np.uint8)[..., None], 3, 2))
    cases["L"] = (_frombytes("L", grey), np.repeat(grey[..., None], 3, 2))
    bits = grey > 127
    one = _frombytes("L", bits.astype(np.uint8) * 255).convert("1")
    cases["1"] = (one, np.repeat(bits[..., None].astype(np.uint8) * 255, 3, 2))
    cases["RGBA"] = (_frombytes("RGBA", np.dstack([rgb, alpha])), _composite(rgb, alpha))
    cases["LA"] = (
        _frombytes("LA", np.dstack([grey, alpha])),
        _composite(np.repeat(grey[..., None], 3, 2), alpha),
    )
    palette = rng.integers(0, 256, (256, 3)).astype(np.uint8)
    idx = rng.integers(0, 4, (4, 5)).astype(np.uint8)
    p = _frombytes("P", idx)
    p.putpalette(palette.ravel().tolist())
    cases["P"] = (p, palette[idx])
    pt = p.copy()
    pt.info["transparency"] = 2  # palette entry 2 fully transparent
    cases["P+transparency"] = (pt, np.where((idx == 2)[..., None], 255, palette[idx]))
    pa = _frombytes("PA", np.dstack([idx, alpha]))
    pa.putpalette(palette.ravel().tolist())
    cases["PA"] = (pa, _composite(palette[idx], alpha))
    cmyk = rng.integers(0, 256, (4, 5, 4)).astype(np.uint8)
    k = cmyk[..., 3:].astype(np.float64)
    exp = np.round((255.0 - cmyk[..., :3]) * (255.0 - k) / 255.0).astype(np.uint8)
    cases["CMYK"] = (_frombytes("CMYK", cmyk), exp)
    cases["RGB"] = (_frombytes("RGB", rgb), rgb)
    return cases


MODE_CASES = _mode_cases()
# file formats that store each mode as itself (the loader path, not only the conversion)
FILE_FORMATS = {"I;16": "png", "I;16B": "tiff", "I": "tiff", "F": "tiff", "L": "png",
                "1": "png", "RGBA": "png", "LA": "png", "P": "png", "P+transparency": "png",
                "CMYK": "tiff", "RGB": "png"}  # fmt: skip


@pytest.mark.parametrize("mode", sorted(MODE_CASES))
def test_every_mode_converts_to_the_expected_8bit_rgb(mode, tmp_path):
    img, expected = MODE_CASES[mode]
    out = to_rgb(img)
    assert out.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(out), expected)
    fmt = FILE_FORMATS.get(mode)
    if fmt:
        path = tmp_path / f"img.{fmt}"
        kw = {"transparency": 2} if mode == "P+transparency" else {}
        img.save(path, **kw)
        with Image.open(path) as check:  # the file really holds this mode
            assert check.mode == img.mode
        np.testing.assert_array_equal(np.asarray(load_rgb(str(path))), expected)


def test_sixteen_bit_png_is_not_saturated(tmp_path):
    # the reported case: a mid-grey 16-bit PNG came out (almost) all white
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    out = np.asarray(load_rgb(str(tmp_path / "ramp.png")))
    assert (out == 255).mean() < 0.01
    np.testing.assert_array_equal(out[..., 0], np.round(ramp / 257.0).astype(np.uint8))
    # and the pretraining loader decodes it the same way in both pipelines
    os.makedirs(tmp_path / "tree" / "a")
    for i in range(2):
        Image.fromarray(ramp).save(tmp_path / "tree" / "a" / f"{i}.png")
    ds = build_image_dataset(str(tmp_path / "tree"))
    for pipeline in ("fast", "pil"):
        img, _ = TwoViewDataset(ds, AugmentConfig(size=16), 0, pipeline)._open(0)
        assert img.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(img), out)


def test_lab_and_unknown_modes():
    lab = Image.new("LAB", (1, 1), (255, 128, 128))  # L = 100, a = b = 0: white
    assert all(c >= 250 for c in to_rgb(lab).getpixel((0, 0)))
    with pytest.raises(CorruptImageError, match="'La'"):
        to_rgb(Image.new("La", (1, 1)))


# ------------------------------------------------------------------------ symlinks


def _link_tree(tmp_path):
    root = tmp_path / "root"
    for cls in ("a", "b"):
        os.makedirs(root / cls / "sub")
        for i in range(3):
            _save(root / cls / f"{i}.png", size=(8, 8), seed=i)
        _save(root / cls / "sub" / "deep.png", size=(8, 8))
    return root


@pytest.mark.parametrize(
    "target", ["self", "class_parent", "root", "sibling_class", "outside_loop"]
)
def test_directory_symlinks_are_not_followed(tmp_path, caplog, target):
    root = _link_tree(tmp_path)
    real_count = 8
    link = root / "a" / "sub" / "loop"
    dest = {
        "self": root / "a" / "sub",
        "class_parent": root / "a",
        "root": root,
        "sibling_class": root / "b",
        "outside_loop": tmp_path,
    }[target]
    os.symlink(dest, link, target_is_directory=True)
    samples, classes = scan_image_folder(str(root))
    assert classes == ["a", "b"] and len(samples) == real_count
    assert [lab for _, lab in samples].count(0) == 4  # no image of b under a's label
    assert "not followed" in caplog.text and "loop" in caplog.text


def test_class_folder_symlinks(tmp_path, caplog):
    root = _link_tree(tmp_path)
    elsewhere = tmp_path / "disk2" / "c"
    os.makedirs(elsewhere)
    _save(elsewhere / "x.png", size=(8, 8))
    os.symlink(elsewhere, root / "c", target_is_directory=True)  # assembled tree: read
    os.symlink(root, root / "z", target_is_directory=True)  # the root itself: skipped
    samples, classes = scan_image_folder(str(root))
    assert classes == ["a", "b", "c"] and len(samples) == 9
    assert "links to the root" in caplog.text


# ------------------------------------------------------------------------ train / val labels


def _tree(root, classes, n=2):
    for c in classes:
        os.makedirs(root / c, exist_ok=True)
        for i in range(n):
            _save(root / c / f"{i}.png", size=(8, 8), seed=i)
    return str(root)


@pytest.mark.parametrize(
    "val_classes", [["cat", "dog"], ["ant", "dog"], ["dog"], ["ant"], ["ant", "bee", "cat", "dog"]]
)
def test_val_labels_follow_the_train_class_names(tmp_path, val_classes):
    train = _tree(tmp_path / "train", ["ant", "bee", "cat", "dog"])
    val = _tree(tmp_path / "val", val_classes)
    tr, va = build_train_val_datasets(train, None, val, None)
    assert va.classes == tr.classes == ["ant", "bee", "cat", "dog"]
    for path, label in va.samples:
        assert tr.classes[label] == os.path.basename(os.path.dirname(path))


@pytest.mark.parametrize("extra", ["emu", "aardvark"])
def test_val_class_missing_from_train_is_an_error(tmp_path, extra):
    train = _tree(tmp_path / "train", ["ant", "bee"])
    val = _tree(tmp_path / "val", ["ant", extra])
    with pytest.raises(DataError, match=f"{extra}.*not classes of the training split"):
        build_train_val_datasets(train, None, val, None)


def test_train_val_with_list_files(tmp_path):
    train = _tree(tmp_path / "train", ["ant", "bee", "cat"])
    (tmp_path / "val.txt").write_text("train/ant/0.png 0\ntrain/cat/1.png 2\n")
    tr, va = build_train_val_datasets(train, None, str(tmp_path), str(tmp_path / "val.txt"))
    assert va.targets == [0, 2] and va.classes == tr.classes
    (tmp_path / "val.txt").write_text("train/ant/0.png 0\ntrain/cat/1.png 5\n")
    with pytest.raises(DataError, match=r"val.txt.*label\(s\) 5"):
        build_train_val_datasets(train, None, str(tmp_path), str(tmp_path / "val.txt"))
    (tmp_path / "train.txt").write_text("train/ant/0.png 0\ntrain/bee/0.png 1\n")
    with pytest.raises(DataError, match="give data.val_list"):
        build_train_val_datasets(str(tmp_path), str(tmp_path / "train.txt"), train, None)
    with pytest.raises(DataError, match="val split needs"):
        build_train_val_datasets(train, None, "", "")


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
    _save(tmp_path / "ok0.jpg")
    _save(tmp_path / "ok1.jpg", seed=1)
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


def _exif_image(path, orientation, size=(40, 20)):
    """A JPEG whose pixels are ``size`` (w, h): left half red, right half blue, with an EXIF
    orientation tag."""
    a = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    a[:, : size[0] // 2] = (255, 0, 0)
    a[:, size[0] // 2 :] = (0, 0, 255)
    img = Image.fromarray(a)
    exif = img.getexif()
    exif[0x0112] = orientation
    img.save(path, exif=exif, quality=95)
    return path


@pytest.mark.parametrize(
    "orientation, size", [(1, (40, 20)), (3, (40, 20)), (6, (20, 40)), (8, (20, 40)), (5, (20, 40))]
)
def test_exif_orientation_is_applied_everywhere(tmp_path, orientation, size):
    path = _exif_image(tmp_path / "x.jpg", orientation)
    img = load_rgb(str(path))
    assert img.size == size
    if orientation == 6:  # rotate 90 clockwise to display: the red (left) half is on top
        top = np.asarray(img)[2, 10]
        assert top[0] > 200 and top[2] < 60
    # the pretraining loader, both pipelines, and the evaluation datasets read it the same way
    (tmp_path / "c").mkdir()
    os.replace(path, tmp_path / "c" / "x.jpg")
    ds = build_image_dataset(str(tmp_path))
    for pipeline in ("fast", "pil"):
        got, _ = TwoViewDataset(ds, AugmentConfig(size=16), 0, pipeline)._open(0)
        assert got.size == size, pipeline
    assert ds[0][0].size == size


@pytest.mark.parametrize("size, ok", [((10, 10), True), ((11, 10), False), ((1, 101), False)])
def test_pixel_limit_refuses_large_images_with_a_clear_message(tmp_path, monkeypatch, size, ok):
    monkeypatch.setenv("IMSVD_MAX_IMAGE_PIXELS", "100")
    path = tmp_path / "big.png"
    Image.new("1", size).save(path)
    if ok:
        assert load_rgb(str(path)).size == size
        return
    with pytest.raises(CorruptImageError, match=r"over the limit of 100 pixels.*IMSVD_MAX_IMAGE"):
        load_rgb(str(path))
    (tmp_path / "c").mkdir()
    os.replace(path, tmp_path / "c" / "big.png")
    ds = build_image_dataset(str(tmp_path))
    got, _ = TwoViewDataset(ds, AugmentConfig(size=16), 0, "fast")._open(0)
    assert got is None  # unreadable: counted and replaced, never decoded


def test_default_pixel_limit_refuses_a_small_file_that_decodes_huge(tmp_path, monkeypatch):
    monkeypatch.delenv("IMSVD_MAX_IMAGE_PIXELS", raising=False)
    path = tmp_path / "bomb.png"
    Image.new("1", (10000, 10000)).save(path, optimize=True)
    assert path.stat().st_size < 50_000
    with pytest.raises(CorruptImageError, match="10000 x 10000"):
        load_rgb(str(path))
    for bad in ("0", "-5", "many"):
        monkeypatch.setenv("IMSVD_MAX_IMAGE_PIXELS", bad)
        with pytest.raises(PixelLimitError, match="IMSVD_MAX_IMAGE_PIXELS"):
            load_rgb(str(path))


@pytest.mark.parametrize("bad", ["1e9", "many", "0", "-5", "1.5"])
def test_a_malformed_pixel_limit_is_one_error_not_unreadable_images(tmp_path, monkeypatch, bad):
    (tmp_path / "c").mkdir()
    _save(tmp_path / "c" / "a.png")
    ds = build_image_dataset(str(tmp_path))
    monkeypatch.setenv("IMSVD_MAX_IMAGE_PIXELS", bad)
    assert not issubclass(PixelLimitError, DataError)  # the readers catch DataError / ValueError
    message = rf"IMSVD_MAX_IMAGE_PIXELS='{bad}' must be a positive integer"
    with pytest.raises(PixelLimitError, match=message):
        load_rgb(ds.samples[0][0])
    with pytest.raises(PixelLimitError, match=message):
        ds[0]  # not "unreadable, dropped"
    for pipeline in ("fast", "pil"):
        with pytest.raises(PixelLimitError, match=message):
            TwoViewDataset(ds, AugmentConfig(size=16), 0, pipeline)._open(0)
    assert ds.num_skipped == 0


def test_a_raised_pixel_limit_reaches_pil_before_any_image_is_opened(tmp_path, monkeypatch):
    # PIL refuses in Image.open an image over twice its own limit, before check_pixels runs:
    # emulated with a small PIL limit (1000, so 60 x 60 is over 2 x 1000) and a larger setting
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    monkeypatch.setenv("IMSVD_MAX_IMAGE_PIXELS", "5000")
    (tmp_path / "c").mkdir()
    path = tmp_path / "c" / "big.png"
    Image.new("RGB", (60, 60)).save(path)
    assert load_rgb(str(path)).size == (60, 60)
    assert Image.MAX_IMAGE_PIXELS == 5000
    # the loader opens the file first, then checks: the limit is given to PIL at import
    script = (
        "import sys; from PIL import Image; Image.MAX_IMAGE_PIXELS = 1000\n"
        "from pretrain.data.loader import TwoViewDataset\n"
        "from pretrain.data.datasets import build_image_dataset\n"
        "from pretrain.data.transforms import AugmentConfig\n"
        "ds = build_image_dataset(sys.argv[1])\n"
        "img, _ = TwoViewDataset(ds, AugmentConfig(size=16), 0, 'fast')._open(0)\n"
        "print(Image.MAX_IMAGE_PIXELS, img.size, ds.num_skipped)\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["5000", "(60,", "60)", "0"]

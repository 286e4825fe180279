"""Datasets: image folders, list files, corrupt images dropped, symlinks, train / val labels."""

import os

import pytest
import torch
from helpers import add_unreadable_images, dog_cat_tree, noise_image

from pretrain.data.datasets import (
    build_image_dataset,
    build_train_val_datasets,
    collate_readable,
    parse_list_file,
    scan_image_folder,
)
from pretrain.data.images import CorruptImageError, DataError
from pretrain.data.transforms import eval_transform, train_linear_transform


@pytest.fixture()
def tree(tmp_path):
    return dog_cat_tree(tmp_path)


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
    add_unreadable_images(tree)
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


# ------------------------------------------------------------------------ symlinks


def _link_tree(tmp_path):
    root = tmp_path / "root"
    for cls in ("a", "b"):
        os.makedirs(root / cls / "sub")
        for i in range(3):
            noise_image(root / cls / f"{i}.png", size=(8, 8), seed=i)
        noise_image(root / cls / "sub" / "deep.png", size=(8, 8))
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
    noise_image(elsewhere / "x.png", size=(8, 8))
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
            noise_image(root / c / f"{i}.png", size=(8, 8), seed=i)
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

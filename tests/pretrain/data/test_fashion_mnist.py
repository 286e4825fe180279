"""The demo's dataset helpers: idx reading, image-tree export, missing-dataset message."""

import gzip
import struct

import numpy as np
import pytest
from helpers import REPO, load_tool
from PIL import Image

from pretrain.data import fashion_mnist as fm
from pretrain.data.datasets import build_image_dataset


def _installer():
    """tools/install_fashion_mnist.py as a module (tools/ is not a package)."""
    return load_tool("install_fashion_mnist")


def _write_idx(path, arr):
    arr = np.asarray(arr, dtype=np.uint8)
    header = struct.pack(">I", 0x0800 | arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.tobytes())


@pytest.fixture()
def fake_dir(tmp_path):
    rng = np.random.default_rng(0)
    d = tmp_path / "fm"
    d.mkdir()
    for split, n in (("train", 12), ("test", 5)):
        img_file, lbl_file = fm.FILES[split]
        _write_idx(d / img_file, rng.integers(0, 256, size=(n, 28, 28)))
        _write_idx(d / lbl_file, np.arange(n) % 10)
    return d


def test_read_idx_round_trip_and_errors(tmp_path):
    arr = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    _write_idx(tmp_path / "a.gz", arr)
    assert np.array_equal(fm.read_idx(tmp_path / "a.gz"), arr)
    with gzip.open(tmp_path / "bad.gz", "wb") as f:
        f.write(struct.pack(">I", 0x0D03) + b"\0" * 16)
    with pytest.raises(ValueError, match="not an idx uint8 file"):
        fm.read_idx(tmp_path / "bad.gz")
    with gzip.open(tmp_path / "short.gz", "wb") as f:
        f.write(struct.pack(">IIII", 0x0803, 2, 28, 28) + b"\0" * 10)
    with pytest.raises(ValueError, match="truncated"):
        fm.read_idx(tmp_path / "short.gz")


def test_export_tree_is_readable_and_idempotent(tmp_path, fake_dir):
    out = fm.export_image_tree(tmp_path / "tree", fake_dir)
    ds = build_image_dataset(root=str(out / "train"))
    assert len(ds) == 12 and ds.classes == fm.class_folders()
    images, labels = fm.load_split("train", fake_dir)
    for path, label in ds.samples:
        idx = int(path.rsplit("/", 1)[1].split(".")[0])
        assert label == labels[idx]
        assert np.array_equal(np.asarray(Image.open(path)), images[idx])
    first = (out / "train" / fm.class_folders()[0] / "00000.png").stat().st_mtime_ns
    fm.export_image_tree(tmp_path / "tree", fake_dir)  # marker present: nothing rewritten
    assert (out / "train" / fm.class_folders()[0] / "00000.png").stat().st_mtime_ns == first


def test_missing_dataset_names_the_install_command(tmp_path):
    inst = _installer()
    with pytest.raises(inst.DatasetMissingError) as e:
        inst.ensure_installed(tmp_path / "nowhere", allow_install=False)
    assert "apt-get install -y dataset-fashion-mnist" in str(e.value)
    assert str(tmp_path / "nowhere") in str(e.value)


@pytest.mark.slow
def test_demo_end_to_end_on_a_small_fake_dataset(tmp_path):
    """tools/demo.py: export, pretrain a few steps, kNN table with every baseline, results JSON."""
    import json
    import subprocess
    import sys

    rng = np.random.default_rng(1)
    d = tmp_path / "fm"
    d.mkdir()
    for split, n in (("train", 160), ("test", 60)):
        img_file, lbl_file = fm.FILES[split]
        labels = np.arange(n) % 10
        # class-dependent bright band, so features have something to find
        imgs = rng.integers(0, 40, size=(n, 28, 28))
        for i, lbl in enumerate(labels):
            imgs[i, 2 * lbl : 2 * lbl + 6] += 200
        _write_idx(d / img_file, imgs)
        _write_idx(d / lbl_file, labels)
    repo = REPO
    out = tmp_path / "run"
    res = subprocess.run(
        [sys.executable, str(repo / "tools/demo.py"), "--data-dir", str(d),
         "--data-cache", str(tmp_path / "tree"), "--bank", "100", "--test", "40",
         f"checkpoint.output_dir={out}", "train.max_steps=2", "train.batch_size=32",
         "data.num_workers=0", "log.every_steps=1", "eval.every_steps=1",
         "eval.bank_size=60", "eval.query_size=30"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    report = json.loads((out / "demo_results.json").read_text())
    assert report["steps"] == 2 and report["bank"] == 100 and report["test"] == 40
    names = list(report["knn"])
    assert names[0].startswith("raw pixels") and names[-1] == "ResNet-18 after IMSVD"
    assert any("torchvision" in n for n in names)
    for accs in report["knn"].values():
        assert set(accs) == {"top1_k20", "top1_k200"}
        assert all(0.0 <= v <= 100.0 for v in accs.values())
    assert report["knn"][names[0]]["top1_k20"] > 50.0  # the bands make pixels separable
    assert (out / "backbone_final.pth").is_file()
    assert "ResNet-18 after IMSVD" in res.stdout
    codes = report["codes"]  # statistics of the test images' discrete codes
    assert codes["num_images"] == 40
    f32 = float(np.finfo(np.float32).eps)  # a float32 entropy against a float64 log B
    assert 0.0 <= codes["argmax_marginal_entropy"] <= codes["log_bin_size"] * (1 + 64 * f32)
    assert (out / "curves.png").stat().st_size > 10000  # the learning-curve figure
    probes = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in probes if "knn/top1_k20" in r] == [0, 1, 2]

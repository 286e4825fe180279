"""benchmarks/gpu_check.py: its CPU dry mode runs every part and its checks hold; a failing part
is recorded and the next part runs; the budget guard skips parts with the reason."""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
from helpers import REPO

from pretrain.data import fashion_mnist as fm

SCRIPT = REPO / "benchmarks" / "gpu_check.py"
VARIANTS = ("reference_fp16", "trainer_fp16", "trainer_bf16_channels_last")


def _module():
    """benchmarks/gpu_check.py as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _write_idx(path, arr):
    arr = np.asarray(arr, dtype=np.uint8)
    header = struct.pack(">I", 0x0800 | arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.tobytes())


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One ``--dry`` run with a small fake Fashion-MNIST (320 train / 120 test images), so that
    gpu_methods.py's dry run (batch 32, probe bank 200 / queries 100) runs too."""
    root = tmp_path_factory.mktemp("gpu_check")
    data = root / "fm"
    data.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 320), ("test", 120)):
        img_file, lbl_file = fm.FILES[split]
        _write_idx(data / img_file, rng.integers(0, 256, size=(n, 28, 28)))
        _write_idx(data / lbl_file, np.arange(n) % 10)
    out = root / "out"
    cmd = [sys.executable, str(SCRIPT), "--dry", "--out", str(out), "--data-dir", str(data),
           "--threads", "1"]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    written = out / "gpu_check.json"
    report = json.loads(written.read_text()) if written.is_file() else None
    return proc, report, out


@pytest.mark.slow
def test_dry_run_gives_every_figure(dry_run):
    proc, report, out = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    parts = report["parts"]
    assert {k: p["status"] for k, p in parts.items()} == {
        "train": "ok",
        "knn": "ok",
        "methods": "ok",
    }
    train = parts["train"]
    for name in VARIANTS:
        v = train["variants"][name]
        assert v["status"] == "ok", v
        assert v["images_per_s"] > 0 and len(v["rounds"]) == 1
    assert train["variants"]["reference_fp16"]["ddp"] is True
    for name in VARIANTS[1:]:
        rate = train["variants"][name]["images_per_s"]
        ratio = train[f"ratio_{name}_over_reference_fp16"]
        assert ratio == pytest.approx(rate / train["variants"]["reference_fp16"]["images_per_s"])
    knn = parts["knn"]
    assert knn["seconds"] > 0 and (knn["bank_rows"], knn["dim"], knn["queries"]) == (4096, 64, 256)
    assert knn["bank_bytes"] == 4096 * 64 * 4
    methods = parts["methods"]
    assert methods["seconds"] > 0 and methods["exit"] == 0
    assert set(methods["results"]) == {"imsvd", "vicreg", "barlowtwins"}
    for r in methods["results"].values():
        assert (
            r["exit"] == 0
            and r["seconds"] > 0
            and set(r["test_knn"])
            == {
                "top1_k20",
                "top1_k200",
            }
        )
    table = (out / "gpu_check.md").read_text()
    assert "| train | trainer, bf16 + channels_last" in table and "| methods | imsvd" in table
    assert table in proc.stdout


@pytest.mark.slow
def test_dry_run_loops_agree_and_knn_matches_the_plain_vote(dry_run):
    _, report, _ = dry_run
    loss = report["parts"]["train"]["fp32_first_step_loss"]
    # the two loops' fp32 losses before the first update, from the same weights and batch
    assert math.isfinite(loss["reference"]) and loss["reference"] != 0.0
    assert abs(loss["reference"] - loss["trainer"]) <= 1e-5 * abs(loss["reference"])
    assert loss["match"] is True
    check = report["parts"]["knn"]["reference_check"]
    assert check["queries"] == 256 and check["differing"] == {"20": 0, "200": 0}
    assert report["checks"] == {
        "fp32_first_step_loss_match": True,
        "knn_predictions_equal_reference": True,
        "knn_peak_within_bank_plus_2GiB": None,  # CPU: no device memory counter
    }


def test_methods_part_without_data_dir_is_skipped(tmp_path):
    gc = _module()
    res = gc.methods_part(None, tmp_path, 1, True, 10.0)
    assert res == {"status": "skipped", "reason": "skipped: no data dir (--data-dir not given)"}
    res = gc.methods_part(str(tmp_path), tmp_path, 1, True, 10.0)  # no idx files there
    assert res["status"] == "skipped" and res["reason"].startswith("skipped: no data dir")
    assert not (tmp_path / "gpu_methods").exists()


def test_a_failing_part_is_recorded_and_the_next_part_runs(tmp_path, monkeypatch, capsys):
    gc = _module()

    def broken(*args):
        raise RuntimeError("no such device here")

    monkeypatch.setattr(gc, "train_part", broken)
    assert gc.main(["--dry", "--out", str(tmp_path)]) == 1
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    train, knn = report["parts"]["train"], report["parts"]["knn"]
    assert train["status"] == "error" and train["error"] == "RuntimeError: no such device here"
    assert knn["status"] == "ok" and knn["reference_check"]["equal"] is True
    assert report["parts"]["methods"]["status"] == "skipped"
    assert "| train | error | RuntimeError: no such device here |" in capsys.readouterr().out


def test_budget_guard_skips_what_does_not_fit(tmp_path):
    gc = _module()
    assert gc.main(["--dry", "--out", str(tmp_path), "--budget-s", "0"]) == 0
    parts = json.loads((tmp_path / "gpu_check.json").read_text())["parts"]
    assert set(parts) == {"train", "knn", "methods"}
    for p in parts.values():
        assert p["status"] == "skipped" and p["reason"].startswith("budget: "), p

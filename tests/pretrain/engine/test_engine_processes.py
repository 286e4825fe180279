"""The engine across processes: tools/pretrain.sh (torchrun), SIGTERM of a launched run, two gloo
processes (a skipped batch taken together, the probe bank sharded over them)."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REPO, free_port

from pretrain import checkpoint as ckpt
from pretrain.engine import trainer as engine

SMOKE = REPO / "configs" / "pretrain" / "imsvd_smoke.yaml"


def _launch(out: Path, *overrides: str, **env: str) -> subprocess.CompletedProcess:
    """Run the smoke recipe through tools/pretrain.sh (torchrun); fail with its output."""
    res = subprocess.run(
        ["bash", str(REPO / "tools/pretrain.sh"), str(SMOKE), f"checkpoint.output_dir={out}",
         *overrides],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def test_smoke_through_launcher(tmp_path):
    """tools/pretrain.sh (torchrun) leaves checkpoints that load with weights_only=True."""
    out = tmp_path / "smoke"
    res = _launch(out, MASTER_PORT=str(free_port()))
    assert "pretraining finished at step 4" in res.stdout
    raw = torch.load(out / engine.FINAL_BACKBONE, weights_only=True, map_location="cpu")
    assert raw["format"] == "imsvd-backbone"
    sd, meta = ckpt.load_backbone(out / engine.FINAL_BACKBONE)
    assert meta["arch"] == "resnet18" and meta["stem"] == "small"
    assert not any(k.startswith("fc.") for k in sd)
    state = ckpt.load_training_state(ckpt.latest_checkpoint(out))
    assert state["step"] == 4 and state["epoch"] == 2
    assert (out / "config.yaml").is_file() and (out / "metrics.jsonl").is_file()
    # keep_last: 2 training states remain
    assert len(ckpt.list_checkpoints(out)) == 2
    # the saved backbone equals the training state's backbone
    for k, v in sd.items():
        assert torch.equal(v, state["model"]["backbone." + k])


@pytest.mark.slow
def test_sigterm_subprocess_exits_cleanly(tmp_path):
    out = tmp_path / "term"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pretrain.main",
            "--config",
            str(SMOKE),
            f"checkpoint.output_dir={out}",
            "train.epochs=50",
            "checkpoint.every_steps=0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
    )
    deadline = time.time() + 300
    lines = []
    while time.time() < deadline:
        line = proc.stdout.readline()
        lines.append(line)
        if "step 1/" in line:
            break
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=300)
    text = "".join(lines) + rest
    assert proc.returncode == 0, text[-2000:]
    assert "pretraining preempted" in text
    state = ckpt.load_training_state(ckpt.latest_checkpoint(out))
    assert state["step"] >= 2


@pytest.mark.slow
@pytest.mark.dist
def test_two_process_gloo_run(tmp_path):
    out = tmp_path / "ddp"
    res = _launch(out, NPROC_PER_NODE="2", MASTER_PORT=str(free_port()))
    assert "process 0/2" in res.stdout
    state = ckpt.load_training_state(ckpt.latest_checkpoint(out))
    assert state["step"] == 4
    assert len(state["rng_per_rank"]) == 2  # each rank's RNG streams, for an exact resume
    assert ckpt.rng_state_for_rank(state, 1, 2) is state["rng_per_rank"][1]
    # the DDP-trained backbone exports with torchvision key names (no "module." prefix)
    sd, meta = ckpt.load_backbone(out / engine.FINAL_BACKBONE)
    assert meta["arch"] == "resnet18"


@pytest.mark.slow
@pytest.mark.dist
def test_two_processes_skip_a_batch_together(tmp_path):
    """A batch with < 2 readable images on ONE rank is skipped by both (no collective hangs).

    A list of 8 readable and 32 unreadable images: each slot gets up to 8 replacement tries, so
    most per-rank batches of 2 are full and a few are not, on one rank at a time.
    """
    from PIL import Image

    rng = np.random.default_rng(0)
    lines = []
    for i in range(40):
        name = f"img{i:02d}.png"
        if i % 10 < 2:
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / name)
        else:
            (tmp_path / name).write_bytes(b"not an image")
        lines.append(f"{name} 0\n")
    (tmp_path / "list.txt").write_text("".join(lines))
    out = tmp_path / "run"
    res = _launch(
        out,
        "data.kind=list",
        f"data.root={tmp_path}",
        f"data.list_file={tmp_path / 'list.txt'}",
        "train.batch_size=4",
        "train.epochs=1",
        "train.seed=3",
        NPROC_PER_NODE="2",
        MASTER_PORT=str(free_port()),
    )
    text = res.stdout + res.stderr
    skips = re.findall(r"fewer than 2 readable images in its batch \((\d+) here", text)
    # rank 0 logs: at least one skip where rank 0 itself had a full batch (the other rank had not)
    assert "2" in skips, text[-3000:]
    # skipped batches are not steps: the run still makes its 10 steps (into the next epoch)
    assert "pretraining finished at step 10" in res.stdout
    state = ckpt.load_training_state(ckpt.latest_checkpoint(out))
    assert state["step"] == 10 and state["epoch"] >= 1


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("bank_size", [20, 1])  # 1: rank 0's shard of the bank is empty
def test_probe_bank_sharded_over_two_processes_matches_one(tmp_path, bank_size):
    """The online probe at step 0 (same initial weights): 2 ranks, each loading and embedding
    its shard of the bank, report what one process holding the whole bank reports."""
    probe = ["eval.every_steps=2", f"eval.bank_size={bank_size}", "eval.query_size=10",
             "eval.ks=[1,3]", "train.epochs=1", "train.max_steps=1"]  # fmt: skip
    rows = {}
    for nproc in ("1", "2"):
        out = tmp_path / f"probe{nproc}"
        _launch(out, *probe, NPROC_PER_NODE=nproc, MASTER_PORT=str(free_port()))
        lines = (out / "metrics.jsonl").read_text().splitlines()
        first = [json.loads(x) for x in lines if '"knn/top1_k1"' in x][0]
        rows[nproc] = first
    assert rows["1"]["step"] == rows["2"]["step"] == 0
    for k in ("knn/top1_k1", "knn/top1_k3"):
        assert rows["2"][k] == rows["1"][k], (k, rows)

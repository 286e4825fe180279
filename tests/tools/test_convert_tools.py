"""tools/convert_to_d2.py and tools/convert_to_mmdet.py run as commands from any folder (neither
stack needed)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torchvision
from helpers import REPO


@pytest.mark.parametrize(
    "tool, suffix, needles",
    [
        ("convert_to_d2.py", ".pkl", ["converted 100 tensors"]),
        ("convert_to_mmdet.py", ".pth", ["converted 120 tensors", "roi_head.shared_head.*"]),
    ],
)
def test_convert_script_runs_as_a_command(tmp_path, tool, suffix, needles):
    src, out = str(tmp_path / "in.pth"), str(tmp_path / f"out{suffix}")
    torch.save(torchvision.models.resnet18().state_dict(), src)
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / tool), src, out],
        capture_output=True,
        text=True,
        cwd=str(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr
    assert all(n in proc.stdout for n in needles) and os.path.isfile(out), proc.stdout

"""Tiny data and weights for the frozen-evaluation tests (transfer/)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
VOC_TINY_CLASSES = ("aeroplane", "bicycle", "bird")


def make_weights(path: Path, seed: int = 0, arch: str = "resnet18", stem: str = "small_s2") -> Path:
    """Export a random-init backbone in this project's backbone format."""
    from pretrain.checkpoint import export_backbone
    from pretrain.model import build_backbone

    torch.manual_seed(seed)
    net = build_backbone(arch, zero_init_residual=False, stem=stem)
    export_backbone(path, net.state_dict(), arch=arch, stem=stem, epoch=0, config=None)
    return path


def class_image(label: int, rng: np.random.Generator, size: int = 40) -> Image.Image:
    """An RGB image whose colour and stripe direction depend on the label (learnable)."""
    base = np.zeros((size, size, 3), dtype=np.float64)
    base[..., label % 3] = 180.0
    stripes = (np.arange(size) // (2 + label)) % 2 * 60.0
    base += stripes[None, :, None] if label % 2 else stripes[:, None, None]
    base += rng.normal(0, 25, size=base.shape)
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


def make_image_tree(root: Path, n_per_class: int, n_classes: int = 3, seed: int = 0) -> Path:
    """ImageFolder tree root/c{k}/img{i}.png."""
    rng = np.random.default_rng(seed)
    for c in range(n_classes):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            class_image(c, rng).save(root / f"c{c}" / f"img{i:03d}.png")
    return root


def make_voc_tree(root: Path, n_trainval: int = 30, n_test: int = 24, seed: int = 0) -> Path:
    """VOCdevkit/VOC2007 with JPEGImages and ImageSets/Main/<class>_{trainval,test}.txt.

    Image i shows class i % 3 (its label 1); a few images are marked difficult (0) for their
    class; every other (image, class) pair is -1.
    """
    rng = np.random.default_rng(seed)
    voc = root / "VOCdevkit" / "VOC2007"
    (voc / "JPEGImages").mkdir(parents=True)
    (voc / "ImageSets" / "Main").mkdir(parents=True)
    splits = {"trainval": range(n_trainval), "test": range(n_trainval, n_trainval + n_test)}
    for split, ids in splits.items():
        lines = {c: [] for c in VOC_TINY_CLASSES}
        for i in ids:
            img_id = f"{i:06d}"
            label = i % 3
            class_image(label, rng).save(voc / "JPEGImages" / f"{img_id}.jpg", quality=95)
            for c, name in enumerate(VOC_TINY_CLASSES):
                lab = 1 if c == label else -1
                if c == label and i % 7 == 0:
                    lab = 0
                lines[name].append(f"{img_id} {lab:2d}")
        for name, rows in lines.items():
            (voc / "ImageSets" / "Main" / f"{name}_{split}.txt").write_text("\n".join(rows) + "\n")
        (voc / "ImageSets" / "Main" / f"{split}.txt").write_text(
            "\n".join(f"{i:06d}" for i in ids) + "\n"
        )
    return voc


def run_module(module: str, args: list[str], nproc: int = 1, timeout: int = 120) -> str:
    """Run ``python -m module args`` (or torchrun with nproc gloo processes); return stdout."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    if nproc == 1:
        cmd = [sys.executable, "-m", module, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", "-m", module, *args]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout

"""Shared fixtures: the repository root, tiny ImageFolder trees, a tiny exported backbone, a
torchvision ResNet-18 state dict, a tiny IMSVD model after one training step and a frozen
backbone with its dataset.

The builders behind them live in ``helpers.py`` (tests that need a fresh, mutable copy call
them directly on ``tmp_path``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import REPO, make_image_tree, make_weights, tiny_imsvd_model, torchvision_resnet18_sd

from pretrain.data.datasets import build_image_dataset
from pretrain.data.transforms import eval_transform
from pretrain.models.build import model_from_checkpoint
from transfer.eval.features import freeze


@pytest.fixture(scope="session")
def repo() -> Path:
    """The repository root."""
    return REPO


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory) -> Path:
    """A random-init ResNet-18 (3x3 stride-2 stem) exported in this project's backbone format."""
    return make_weights(tmp_path_factory.mktemp("backbone") / "w.pth")


@pytest.fixture(scope="session")
def tiny_trees(tmp_path_factory) -> Path:
    """``root/train`` (8 images per class) and ``root/val`` (4 per class), classes c0, c1, c2.

    Read-only for the tests: copy it before changing files.
    """
    root = tmp_path_factory.mktemp("trees")
    make_image_tree(root / "train", n_per_class=8, seed=0)
    make_image_tree(root / "val", n_per_class=4, seed=1)
    return root


@pytest.fixture(scope="module")
def tv18():
    """A torchvision ResNet-18 state dict with fc, random BN means and num_batches_tracked 7.

    Module-scoped: a test module may change it in place, never across modules.
    """
    return torchvision_resnet18_sd()


@pytest.fixture(scope="module")
def trained():
    """A tiny IMSVD model after one fp16-scaler-style SGD step, with its optimizer and scaler."""
    torch.manual_seed(1)
    model = tiny_imsvd_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    scaler = torch.amp.GradScaler("cpu", init_scale=128.0)
    loss = model(torch.randn(4, 3, 16, 16)).pow(2).mean()
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    return model, opt, scaler


@pytest.fixture(scope="module")
def frozen_tree(tmp_path_factory, tiny_backbone):
    """(root, the frozen :func:`tiny_backbone` model, its metadata, an eval-transformed dataset of
    root/train: 4 images of each of 3 classes)."""
    root = tmp_path_factory.mktemp("feat")
    tree = make_image_tree(root / "train", n_per_class=4)
    model, _, meta = model_from_checkpoint(tiny_backbone)
    model = freeze(model)
    ds = build_image_dataset(str(tree), transform=eval_transform(40, 32))
    return root, model, meta, ds

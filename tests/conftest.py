"""Shared fixtures: the repository root, tiny ImageFolder trees, a tiny exported backbone and a
torchvision ResNet-18 state dict.

The builders behind them live in ``helpers.py`` (tests that need a fresh, mutable copy call
them directly on ``tmp_path``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import REPO, make_image_tree, make_weights, torchvision_resnet18_sd


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

"""The one frozen-feature extractor of the project, with an on-disk features cache.

Every frozen evaluation (VOC07 SVM, kNN, the linear probes' validation pass) gets its features
here, from a backbone the runner (:mod:`transfer.eval.runner`) read through
:func:`pretrain.checkpoint.model_from_checkpoint` and froze with :func:`freeze`. The dataset is
split into contiguous shards, one per process; the shards are gathered so that every process
ends with the features of the WHOLE dataset in dataset order.

Layers:
    pool5: the global-average-pooled res5 output (2048-d for ResNet-50) - the default.
    res5:  res5 average-pooled to 2x2 (8192-d for ResNet-50), the older multi-layer protocol.
    res4:  res4 average-pooled to 3x3 (9216-d for ResNet-50), the older multi-layer protocol.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from pretrain.checkpoint import atomic_write
from pretrain.datasets import collate_readable
from pretrain.dist import all_gather_tensor, barrier, get_rank, get_world_size
from pretrain.log import progress, write_json_atomic

logger = logging.getLogger("imsvd.features")

LAYERS = ("pool5", "res5", "res4")
# output side of the adaptive average pool for the spatially pooled variants
_SPATIAL_POOL = {"res5": 2, "res4": 3}
CACHE_VERSION = 1


class FeatureError(ValueError):
    """Bad feature-extraction request (unknown layer, unusable dataset, broken cache)."""


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode and requires_grad=False on every parameter (BN statistics stay fixed too)."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def feature_dim(model: nn.Module, layer: str = "pool5") -> int:
    """Width of the features :func:`extract_features` returns for ``layer``."""
    check_layer(layer)
    width = int(getattr(model, "num_features", 2048))
    if layer == "pool5":
        return width
    side = _SPATIAL_POOL[layer]
    return (width if layer == "res5" else width // 2) * side * side


def check_layer(layer: str) -> None:
    """Raise FeatureError for an unknown layer name."""
    if layer not in LAYERS:
        raise FeatureError(f"unknown feature layer '{layer}' (choose from {', '.join(LAYERS)})")


def forward_features(model: nn.Module, x: torch.Tensor, layer: str = "pool5") -> torch.Tensor:
    """Features of a torchvision-style ResNet for a batch.

    Args:
        model: backbone with fc = Identity.
        x: (B, 3, H, W) images.
        layer: one of LAYERS.
    Returns:
        (B, feature_dim) float tensor.
    """
    if layer == "pool5":
        return torch.flatten(model(x), 1)
    check_layer(layer)
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    x = model.layer3(model.layer2(model.layer1(x)))
    if layer == "res5":
        x = model.layer4(x)
    return torch.flatten(F.adaptive_avg_pool2d(x, _SPATIAL_POOL[layer]), 1)


def shard_range(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous [start, stop) of ``n`` items for ``rank``; sizes differ by at most one."""
    return (n * rank) // world_size, (n * (rank + 1)) // world_size


@torch.no_grad()
def extract_features(
    model: nn.Module,
    dataset: Dataset,
    batch_size: int = 64,
    layer: str = "pool5",
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    desc: str = "features",
) -> tuple[np.ndarray, np.ndarray]:
    """Features and labels of a whole dataset, sharded over processes, in dataset order.

    Each process extracts one contiguous shard; the shards are all-gathered, so every process
    returns the full arrays. Items the dataset yields as None (unreadable images, see
    :class:`pretrain.datasets.ImageDataset`) are left out, logged and counted: the arrays then have
    ``len(dataset) - unreadable`` rows, each with its own image's label (nothing is replaced).

    Args:
        model: frozen backbone (put in eval mode here as well).
        dataset: yields (image tensor, integer label).
        batch_size: per-process batch size.
        layer: one of LAYERS.
        device: compute device of this process.
        num_workers: DataLoader workers.
        desc: progress-bar label.
    Returns:
        (features float32 (N, D), labels int64 (N,)), N = the number of readable items.
    Raises:
        FeatureError: bad layer or batch size, or no readable item at all.
    """
    check_layer(layer)
    if batch_size <= 0:
        raise FeatureError(f"batch_size must be positive, got {batch_size}")
    model.eval()
    device = torch.device(device)
    rank, world = get_rank(), get_world_size()
    start, stop = shard_range(len(dataset), rank, world)
    loader = DataLoader(
        Subset(dataset, range(start, stop)),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        collate_fn=collate_readable,
    )
    feats, labels = [], []
    dropped = 0
    for images, targets, n_bad in progress(loader, total=len(loader), desc=desc, rank=rank):
        dropped += n_bad
        if images is None:
            continue
        out = forward_features(model, images.to(device, non_blocking=True), layer)
        feats.append(out.float())
        labels.append(torch.as_tensor(targets, dtype=torch.long).to(device))
    dim = feature_dim(model, layer)
    local_f = torch.cat(feats) if feats else torch.zeros((0, dim), device=device)
    local_y = torch.cat(labels) if labels else torch.zeros((0,), dtype=torch.long, device=device)
    all_f = all_gather_tensor(local_f).cpu().numpy()
    all_y = all_gather_tensor(local_y).cpu().numpy()
    dropped = int(all_gather_tensor(torch.tensor([dropped], device=device)).sum())
    if all_f.shape[0] + dropped != len(dataset):
        raise FeatureError(
            f"gathered {all_f.shape[0]} feature rows and {dropped} unreadable items for "
            f"{len(dataset)} samples"
        )
    if all_f.shape[0] == 0:
        raise FeatureError(f"{desc}: none of the {len(dataset)} images could be read")
    if dropped:
        logger.warning("%s: %d of %d images unreadable and left out", desc, dropped, len(dataset))
    return all_f, all_y


def dataset_signature(dataset: Dataset) -> str:
    """Hash of the sample list (paths and labels) when the dataset exposes ``samples``."""
    samples = getattr(dataset, "samples", None)
    h = hashlib.sha256(str(len(dataset)).encode())
    if samples is not None:
        for path, label in samples:
            h.update(f"{path}\0{label}\n".encode())
    return h.hexdigest()


def _save_npy_atomic(arr: np.ndarray, path: Path) -> None:
    atomic_write(path, lambda f: np.save(f, arr))


def cached_features(
    cache_dir: str | os.PathLike,
    split: str,
    model: nn.Module,
    dataset: Dataset,
    weights_sha256: str,
    layer: str = "pool5",
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`extract_features` behind an on-disk cache.

    ``<cache_dir>/<split>_<layer>.{feats.npy,labels.npy,json}``; the JSON holds the weights hash,
    layer, split, transform and sample-list hash. A cache whose metadata matches is reused;
    otherwise the features are extracted again and the cache is rewritten (rank 0, atomically,
    metadata last so a partial write never looks valid).

    Args:
        cache_dir: folder of the cache.
        split: split name (part of the file names and metadata).
        model, dataset, layer, batch_size, device, num_workers: as for extract_features.
        weights_sha256: content hash of the backbone weights (load_backbone's meta["sha256"]).
    Returns:
        (features, labels) as extract_features (unreadable images left out; their number is
        ``len(dataset) - len(labels)``).
    """
    cache_dir = Path(cache_dir)
    stem = cache_dir / f"{split}_{layer}"
    f_path, y_path, m_path = (
        Path(f"{stem}.feats.npy"),
        Path(f"{stem}.labels.npy"),
        Path(f"{stem}.json"),
    )
    meta: dict[str, Any] = {
        "version": CACHE_VERSION,
        "weights_sha256": weights_sha256,
        "layer": layer,
        "split": split,
        "transform": repr(getattr(dataset, "transform", None)),
        "num_samples": len(dataset),
        "samples_sha256": dataset_signature(dataset),
    }
    hit = _read_cache(m_path, f_path, y_path, meta)
    if hit is not None and getattr(dataset, "strict", False) and hit[0].shape[0] < len(dataset):
        hit = None  # rows were dropped when it was written: strict mode must see the bad file
    if hit is not None:
        logger.info("features cache hit: %s (%d x %d)", stem, *hit[0].shape)
        return hit
    logger.info("extracting %s features (%d images, layer %s)", split, len(dataset), layer)
    feats, labels = extract_features(
        model, dataset, batch_size, layer, device, num_workers, desc=f"{split} features"
    )
    if get_rank() == 0:
        cache_dir.mkdir(parents=True, exist_ok=True)
        _save_npy_atomic(feats, f_path)
        _save_npy_atomic(labels, y_path)
        write_json_atomic(dict(meta, shape=list(feats.shape)), m_path)
    barrier()
    return feats, labels


def _read_cache(
    m_path: Path, f_path: Path, y_path: Path, meta: Mapping[str, Any]
) -> tuple[np.ndarray, np.ndarray] | None:
    if not (m_path.is_file() and f_path.is_file() and y_path.is_file()):
        return None
    try:
        stored = json.loads(m_path.read_text(encoding="utf-8"))
        if not isinstance(stored, dict):
            return None
        shape = stored.pop("shape", None)
        if stored != dict(meta):
            logger.info("features cache %s is stale (metadata differs): re-extracting", m_path)
            return None
        feats = np.load(f_path)
        labels = np.load(y_path)
    except (OSError, ValueError) as e:
        logger.warning("features cache %s unreadable (%s): re-extracting", m_path, e)
        return None
    if list(feats.shape) != shape or labels.shape[0] != feats.shape[0]:
        logger.warning("features cache %s has inconsistent shapes: re-extracting", m_path)
        return None
    return feats, labels

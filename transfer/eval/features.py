"""The one frozen-feature extractor of the project (its on-disk cache:
:mod:`transfer.eval.feature_cache`).

Every frozen evaluation (VOC07 SVM, kNN, the linear probes' validation pass) gets its features
here, from a backbone the runner (:mod:`transfer.eval.runner`) read through
:func:`pretrain.models.build.model_from_checkpoint` and froze with :func:`freeze`. The dataset is
split into contiguous shards, one per process; where the rows end up is the caller's choice
(``gather``, :data:`GATHERS`): every process the whole arrays (``all``), rank 0 alone
(``main``: the VOC07 SVM, gathered in bounded chunks), or each process its own rows
(``shard``: the kNN bank, the linear probe's validation pass), so that no process needs to hold
N x D features unless the protocol needs them whole.

Layers:
    pool5: the global-average-pooled res5 output (2048-d for ResNet-50) - the default.
    res5:  res5 average-pooled to 2x2 (8192-d for ResNet-50), the older multi-layer protocol.
    res4:  res4 average-pooled to 3x3 (9216-d for ResNet-50), the older multi-layer protocol.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from pretrain.data.datasets import collate_readable
from pretrain.dist import (
    all_gather_tensor,
    all_reduce_sum,
    gather_batch_sizes,
    gather_rows_to_main,
    get_rank,
    get_world_size,
    known_batch_sizes,
    shard_range,
)
from pretrain.engine.runtime import PRECISIONS, autocast
from pretrain.errors import IMSVDError
from pretrain.progress import progress

logger = logging.getLogger("imsvd.features")

LAYERS = ("pool5", "res5", "res4")
# output side of the adaptive average pool for the spatially pooled variants
_SPATIAL_POOL = {"res5": 2, "res4": 3}
# where extracted rows end up: every rank / rank 0 only / each rank its own contiguous rows
GATHERS = ("all", "main", "shard")


class FeatureError(IMSVDError, ValueError):
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


@torch.no_grad()
def extract_features(
    model: nn.Module,
    dataset: Dataset,
    batch_size: int = 64,
    layer: str = "pool5",
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    desc: str = "features",
    precision: str = "fp32",
    gather: str = "all",
    channels_last: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Features and labels of a dataset, extracted in shards over processes, in dataset order.

    Each process extracts one contiguous shard. Unreadable images (None items) are left out,
    logged and counted: ``len(dataset) - unreadable`` rows in all, each with its own label.

    Args:
        model: frozen backbone (put in eval mode here as well).
        dataset: yields (image tensor, integer label).
        batch_size: per-process batch size.
        layer: one of LAYERS.
        device: compute device of this process.
        num_workers: DataLoader workers.
        desc: progress-bar label.
        precision: "fp32", or "bf16" / "fp16": the forward under autocast; float32 features.
        gather: where the rows end up (one process always gets the whole arrays):
            "all": every process the whole arrays (one all_gather; N x D on every process);
            "main": rank 0 the whole arrays, sent in chunks of bounded size
            (:func:`pretrain.dist.gather_rows_to_main`), the other ranks (0, D) and (0,);
            "shard": every process the rows it extracted (rank 0 the first ones, then rank 1,
            ...), nothing gathered.
        channels_last: the images in channels_last memory format, so that the convolutions
            run in it (GPUs); the model is left as it is; the same features up to float
            rounding (not part of the cache key).
    Returns:
        (features float32 (N, D), labels int64 (N,)), N = the number of readable items (of the
        whole dataset, or of this process's share as ``gather`` says).
    Raises:
        FeatureError: bad layer, batch size, precision or gather, or no readable item at all.
    """
    check_layer(layer)
    check_request(precision, gather)
    if batch_size <= 0:
        raise FeatureError(f"batch_size must be positive, got {batch_size}")
    device = torch.device(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    args = (batch_size, layer, device, num_workers, desc, (precision, fmt))
    try:
        local_f, local_y, dropped = _extract_shard(model, dataset, *args)
        error = None
    except IMSVDError as e:  # e.g. a corrupt image in strict mode: every rank must hear of it
        local_f, local_y, dropped, error = None, None, 0, e
    sizes = _sizes_or_raise(local_f, error, device, desc)
    dropped = int(all_reduce_sum(torch.tensor([dropped], device=device)).sum())
    _check_counts(sum(sizes), dropped, len(dataset), desc)
    return _deliver(local_f, local_y, sizes, gather, device)


def _sizes_or_raise(local_f, error, device, desc: str) -> list[int]:
    """Every rank's row count (one exchange); a rank's extraction error raised on every rank."""
    sizes = gather_batch_sizes(-1 if error is not None else local_f.shape[0], device)
    if error is not None:
        raise error
    if min(sizes) < 0:
        raise FeatureError(
            f"{desc}: rank {sizes.index(min(sizes))} failed to extract (see its error)"
        )
    return sizes


def check_request(precision: str, gather: str) -> None:
    """FeatureError for a precision or gather that is not one of PRECISIONS / GATHERS."""
    if precision not in PRECISIONS:
        raise FeatureError(f"features.precision {precision!r} is not one of {tuple(PRECISIONS)}")
    if gather not in GATHERS:
        raise FeatureError(f"feature gather {gather!r} is not one of {GATHERS}")


def _extract_shard(model, dataset, batch_size, layer, device, num_workers, desc, numerics):
    """(features (n_r, D), labels (n_r,), unreadable count) of this rank's contiguous shard;
    ``numerics`` = (precision, memory format)."""
    precision, fmt = numerics
    model.eval()
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
    feats, labels, dropped = [], [], 0
    for images, targets, n_bad in progress(loader, total=len(loader), desc=desc, rank=rank):
        dropped += n_bad
        if images is None:
            continue
        with autocast(device, precision):
            x = images.to(device, non_blocking=True).contiguous(memory_format=fmt)
            out = forward_features(model, x, layer)
        feats.append(out.float())
        labels.append(torch.as_tensor(targets, dtype=torch.long).to(device))
    if not feats:
        dim = feature_dim(model, layer)
        empty_y = torch.zeros((0,), dtype=torch.long, device=device)
        return torch.zeros((0, dim), device=device), empty_y, dropped
    return torch.cat(feats), torch.cat(labels), dropped


def _check_counts(rows: int, dropped: int, n: int, desc: str) -> None:
    if rows + dropped != n:
        raise FeatureError(
            f"gathered {rows} feature rows and {dropped} unreadable items for {n} samples"
        )
    if rows == 0:
        raise FeatureError(f"{desc}: none of the {n} images could be read")
    if dropped:
        logger.warning("%s: %d of %d images unreadable and left out", desc, dropped, n)


def _deliver(local_f, local_y, sizes, gather: str, device) -> tuple[np.ndarray, np.ndarray]:
    """The extracted shards where ``gather`` says (see :func:`extract_features`)."""
    if gather == "shard" or get_world_size() == 1:
        return local_f.cpu().numpy(), local_y.cpu().numpy()
    if gather == "all":
        with known_batch_sizes(sizes):  # the sizes are known: one collective per array
            return (
                all_gather_tensor(local_f).cpu().numpy(),
                all_gather_tensor(local_y).cpu().numpy(),
            )
    feats = gather_rows_to_main(local_f, sizes, device)
    labels = gather_rows_to_main(local_y, sizes, device)
    if feats is None:  # not rank 0
        return np.zeros((0, local_f.shape[1]), np.float32), np.zeros((0,), np.int64)
    return feats.numpy(), labels.numpy()


def rows_on_main(
    feats: np.ndarray, labels: np.ndarray, device: str | torch.device
) -> tuple[np.ndarray, np.ndarray] | None:
    """Every rank's ``gather="shard"`` rows, whole and in order, on rank 0 (None elsewhere).

    One size exchange, then :func:`pretrain.dist.gather_rows_to_main` in bounded chunks (the
    rows travel from the host through ``device`` one chunk at a time). Every rank must call.
    """
    device = torch.device(device)
    sizes = gather_batch_sizes(feats.shape[0], device)
    f = gather_rows_to_main(torch.from_numpy(np.ascontiguousarray(feats)), sizes, device)
    y = gather_rows_to_main(torch.from_numpy(np.ascontiguousarray(labels)), sizes, device)
    return None if f is None else (f.numpy(), y.numpy())

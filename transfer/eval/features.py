"""The one frozen-feature extractor of the project, with an on-disk features cache.

Every frozen evaluation (VOC07 SVM, kNN, the linear probes' validation pass) gets its features
here, from a backbone the runner (:mod:`transfer.eval.runner`) read through
:func:`pretrain.model.model_from_checkpoint` and froze with :func:`freeze`. The dataset is
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

from pretrain.datasets import collate_readable
from pretrain.dist import (
    all_gather_tensor,
    all_reduce_sum,
    barrier,
    gather_batch_sizes,
    gather_rows_to_main,
    get_rank,
    get_world_size,
    known_batch_sizes,
    main_rank_values,
    shard_range,
)
from pretrain.errors import IMSVDError
from pretrain.fileio import atomic_write, fsync_dir, write_json_atomic
from pretrain.progress import progress
from pretrain.runtime import PRECISIONS, autocast

logger = logging.getLogger("imsvd.features")

LAYERS = ("pool5", "res5", "res4")
# output side of the adaptive average pool for the spatially pooled variants
_SPATIAL_POOL = {"res5": 2, "res4": 3}
CACHE_VERSION = 1
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
) -> tuple[np.ndarray, np.ndarray]:
    """Features and labels of a dataset, extracted in shards over processes, in dataset order.

    Each process extracts one contiguous shard of the dataset. Items the dataset yields as None
    (unreadable images, see :class:`pretrain.datasets.ImageDataset`) are left out, logged and
    counted: the arrays then have ``len(dataset) - unreadable`` rows in all, each with its own
    image's label (nothing is replaced).

    Args:
        model: frozen backbone (put in eval mode here as well).
        dataset: yields (image tensor, integer label).
        batch_size: per-process batch size.
        layer: one of LAYERS.
        device: compute device of this process.
        num_workers: DataLoader workers.
        desc: progress-bar label.
        precision: "fp32", or "bf16" / "fp16": the forward under autocast (half the activation
            memory and, on GPUs, faster), the features returned as float32 all the same.
        gather: where the rows end up (one process always gets the whole arrays):
            "all": every process the whole arrays (one all_gather; N x D on every process);
            "main": rank 0 the whole arrays, sent in chunks of bounded size
            (:func:`pretrain.dist.gather_rows_to_main`), the other ranks (0, D) and (0,);
            "shard": every process the rows it extracted (rank 0 the first ones, then rank 1,
            ...), nothing gathered.
    Returns:
        (features float32 (N, D), labels int64 (N,)), N = the number of readable items (of the
        whole dataset, or of this process's share as ``gather`` says).
    Raises:
        FeatureError: bad layer, batch size, precision or gather, or no readable item at all.
    """
    check_layer(layer)
    if precision not in PRECISIONS:
        raise FeatureError(f"features.precision {precision!r} is not one of {tuple(PRECISIONS)}")
    if gather not in GATHERS:
        raise FeatureError(f"feature gather {gather!r} is not one of {GATHERS}")
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
        with autocast(device, precision):
            out = forward_features(model, images.to(device, non_blocking=True), layer)
        feats.append(out.float())
        labels.append(torch.as_tensor(targets, dtype=torch.long).to(device))
    dim = feature_dim(model, layer)
    local_f = torch.cat(feats) if feats else torch.zeros((0, dim), device=device)
    local_y = torch.cat(labels) if labels else torch.zeros((0,), dtype=torch.long, device=device)
    del feats, labels
    sizes = gather_batch_sizes(local_f.shape[0], device)
    dropped = int(all_reduce_sum(torch.tensor([dropped], device=device)).sum())
    _check_counts(sum(sizes), dropped, len(dataset), desc)
    return _deliver(local_f, local_y, sizes, gather, device)


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


CACHE_CHECKS = ("stat", "content")


def dataset_signature(dataset: Dataset) -> str:
    """Hash of the sample list: each sample's absolute resolved path and label.

    Without ``samples`` (a dataset that is not a list of files) only its length is hashed.
    """
    samples = getattr(dataset, "samples", None)
    h = hashlib.sha256(str(len(dataset)).encode())
    folders: dict[str, str] = {}  # each folder resolved once (symlinks, "..", the cwd)
    if samples is not None:
        for path, label in samples:
            h.update(f"{_resolved(str(path), folders)}\0{label}\n".encode())
    return h.hexdigest()


def _resolved(path: str, folders: dict[str, str]) -> str:
    folder, name = os.path.split(path)
    if folder not in folders:
        folders[folder] = os.path.realpath(folder or ".")
    return os.path.join(folders[folder], name)


def file_sha256(path: str) -> str:
    """Hex sha256 of a file's bytes (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def files_signature(dataset: Dataset, check: str = "stat") -> str:
    """Hash of what the sample files are now: size and mtime_ns of each (``check="stat"``), and
    also the sha256 of its bytes (``check="content"``); a missing file counts as "missing".

    Raises:
        FeatureError: unknown ``check``.
    """
    if check not in CACHE_CHECKS:
        raise FeatureError(f"features.cache_check {check!r} is not one of {CACHE_CHECKS}")
    h = hashlib.sha256(check.encode())
    for path, _ in getattr(dataset, "samples", None) or []:
        try:
            st = os.stat(path)
            ident = f"{st.st_size}:{st.st_mtime_ns}"
            if check == "content":
                ident += ":" + file_sha256(path)
        except OSError:
            ident = "missing"
        h.update(f"{ident}\n".encode())
    return h.hexdigest()


def _save_npy_atomic(arr: np.ndarray, path: Path) -> None:
    atomic_write(path, lambda f: np.save(f, arr))


def cache_meta(
    split: str,
    layer: str,
    dataset: Dataset,
    weights_sha256: str,
    check: str = "stat",
    precision: str = "fp32",
) -> dict[str, Any]:
    """What a cache entry must match to be reused: cache version, weights hash, layer, split,
    transform, sample count, the sample list (:func:`dataset_signature`), the files as they
    are now (:func:`files_signature`) and, when not fp32, the extraction's precision (so fp32
    entries written before the key existed stay valid)."""
    extra = {} if precision == "fp32" else {"precision": precision}
    return {
        **extra,
        "version": CACHE_VERSION,
        "weights_sha256": weights_sha256,
        "layer": layer,
        "split": split,
        "transform": repr(getattr(dataset, "transform", None)),
        "num_samples": len(dataset),
        "samples_sha256": dataset_signature(dataset),
        "files_sha256": files_signature(dataset, check),
        "cache_check": check,
    }


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
    check: str = "stat",
    precision: str = "fp32",
    gather: str = "all",
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`extract_features` behind an on-disk cache.

    ``<cache_dir>/<split>_<layer>.{feats.npy,labels.npy,json}``; the JSON (:func:`cache_meta`)
    holds the weights hash, layer, split, transform, the hash of the samples' absolute resolved
    paths and labels, and the hash of the files' size and mtime_ns (``check="content"``: also
    their bytes). A cache whose metadata matches is reused; otherwise the features are
    extracted again and the entry rewritten by rank 0: the metadata file is removed first, then
    the arrays are written (atomically each) and the metadata last, so an entry is valid as a
    whole or not at all, whenever a writer is killed. The log says why an entry was used or
    rebuilt.

    Rank 0 alone computes the metadata (so a content check hashes the files once) and decides
    hit or miss; the decision reaches every rank (one all-reduce on ``device``), so all ranks
    extract together or none does. On a hit the other ranks read (memory-mapped) the rows
    ``gather`` gives them from the arrays rank 0 checked; when one of them cannot, every rank
    re-extracts. With ``gather="shard"`` a rank's rows are a contiguous slice of the whole
    arrays in rank order, but which slice may differ between an extraction and a hit; on a miss
    the shards reach rank 0 in bounded chunks for writing.

    Args:
        cache_dir: folder of the cache.
        split: split name (part of the file names and metadata).
        model, dataset, layer, batch_size, device, num_workers, precision, gather: as for
            extract_features.
        weights_sha256: content hash of the backbone weights (load_backbone's meta["sha256"]).
        check: "stat" (size + mtime_ns of every file) or "content" (also a sha256 of each).
    Returns:
        (features, labels) as extract_features (unreadable images left out; their number is
        ``len(dataset)`` minus the rows of all ranks).
    Raises:
        FeatureError: unknown ``check``; as extract_features.
    """
    if check not in CACHE_CHECKS:  # on every rank, before any collective
        raise FeatureError(f"features.cache_check {check!r} is not one of {CACHE_CHECKS}")
    if precision not in PRECISIONS:
        raise FeatureError(f"features.precision {precision!r} is not one of {tuple(PRECISIONS)}")
    if gather not in GATHERS:
        raise FeatureError(f"feature gather {gather!r} is not one of {GATHERS}")
    stem = Path(cache_dir) / f"{split}_{layer}"
    paths = (Path(f"{stem}.feats.npy"), Path(f"{stem}.labels.npy"), Path(f"{stem}.json"))
    meta, hit = None, None
    if get_rank() == 0:  # the signature (a hash of every file with check="content") once
        try:
            meta = cache_meta(split, layer, dataset, weights_sha256, check, precision)
            hit = _read_cache(paths[2], paths[0], paths[1], meta)
        except Exception:  # noqa: BLE001 (the other ranks are told, then it is re-raised)
            main_rank_values([_FAILED, 0, 0], device)
            raise
        if hit is not None and getattr(dataset, "strict", False) and len(hit[1]) < len(dataset):
            logger.info(
                "features cache %s was written with unreadable images left out: strict mode "
                "re-extracts",
                stem,
            )
            hit = None
    # rank 0 decides for every rank: all take the same branch (extract_features is collective)
    state, rows, cols = main_rank_values(
        [_MISS if hit is None else _HIT, *(hit[0].shape if hit is not None else (0, 0))], device
    )
    if state == _FAILED:
        raise FeatureError(
            f"features cache {stem}: rank 0 failed to check the entry (see its error)"
        )
    if state == _HIT:
        got = _hit_rows(hit, paths, (rows, cols), gather)
        unread = int(all_reduce_sum(torch.tensor([int(got is None)], device=device)).item())
        if unread == 0:
            logger.info(
                "features cache hit: %s (%d x %d): same weights, layer, transform, sample paths "
                "and file sizes / mtimes (%s check)",
                stem,
                rows,
                cols,
                check,
            )
            return got
        logger.warning(
            "features cache %s could not be read on %d rank(s): re-extracting", stem, unread
        )
    logger.info("extracting %s features (%d images, layer %s)", split, len(dataset), layer)
    feats, labels = extract_features(
        model,
        dataset,
        batch_size,
        layer,
        device,
        num_workers,
        f"{split} features",
        precision,
        gather,
    )
    whole = rows_on_main(feats, labels, device) if gather == "shard" else (feats, labels)
    if get_rank() == 0:
        _write_cache(Path(cache_dir), paths[2], paths[0], paths[1], meta, *whole)
    barrier()
    return feats, labels


_MISS, _HIT, _FAILED = 0, 1, 2


def _hit_rows(hit, paths, shape, gather: str) -> tuple[np.ndarray, np.ndarray] | None:
    """This rank's rows of a valid entry (rank 0's memory-mapped ``hit``, the others read the
    files), copied out of the map; None when this rank cannot read them."""
    rank, world = get_rank(), get_world_size()
    if gather == "main" and rank != 0:
        return np.zeros((0, shape[1]), np.float32), np.zeros((0,), np.int64)
    arrays = hit if rank == 0 else _load_arrays(paths[0], paths[1], shape)
    if arrays is None:
        return None
    lo, hi = shard_range(shape[0], rank, world) if gather == "shard" else (0, shape[0])
    try:
        return np.array(arrays[0][lo:hi]), np.array(arrays[1][lo:hi])
    except OSError as e:  # a mapped page that cannot be read
        logger.warning("features cache %s unreadable on this rank (%s)", paths[0], e)
        return None


def _load_arrays(
    f_path: Path, y_path: Path, shape: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray] | None:
    """The arrays of an entry rank 0 found valid, or None when unreadable or of another shape."""
    try:
        feats, labels = np.load(f_path, mmap_mode="r"), np.load(y_path, mmap_mode="r")
    except (OSError, ValueError) as e:
        logger.warning("features cache %s unreadable on this rank (%s)", f_path, e)
        return None
    if tuple(feats.shape) != tuple(shape) or labels.shape != (shape[0],):
        logger.warning("features cache %s has another shape on this rank", f_path)
        return None
    return feats, labels


def _write_cache(cache_dir, m_path, f_path, y_path, meta, feats, labels) -> None:
    """Invalidate (remove the metadata), write the arrays, then the metadata: never a mix."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    try:
        m_path.unlink()
    except FileNotFoundError:
        pass
    fsync_dir(cache_dir)
    _save_npy_atomic(feats, f_path)
    _save_npy_atomic(labels, y_path)
    write_json_atomic(dict(meta, shape=list(feats.shape)), m_path)


_MEANING = {
    "version": "cache format version",
    "weights_sha256": "weights",
    "layer": "layer",
    "split": "split",
    "transform": "transform",
    "num_samples": "number of samples",
    "samples_sha256": "sample list (absolute paths / labels)",
    "files_sha256": "files (size / mtime_ns / content) under the same paths",
    "cache_check": "cache check",
}


def _read_cache(
    m_path: Path, f_path: Path, y_path: Path, meta: Mapping[str, Any]
) -> tuple[np.ndarray, np.ndarray] | None:
    if not (m_path.is_file() and f_path.is_file() and y_path.is_file()):
        if f_path.exists() or y_path.exists():
            logger.info(
                "features cache %s has no valid metadata (an interrupted write?): re-extracting",
                m_path,
            )
        return None
    try:
        stored = json.loads(m_path.read_text(encoding="utf-8"))
        if not isinstance(stored, dict):
            return None
        shape = stored.pop("shape", None)
        if stored != dict(meta):
            differ = [_MEANING.get(k, k) for k in meta if stored.get(k) != meta[k]]
            differ += [k for k in stored if k not in meta]
            why = ", ".join(differ) or "metadata"
            logger.info("features cache %s is stale (%s changed): re-extracting", m_path, why)
            return None
        feats = np.load(f_path, mmap_mode="r")  # the rows a rank needs are copied out later
        labels = np.load(y_path, mmap_mode="r")
    except (OSError, ValueError) as e:
        logger.warning("features cache %s unreadable (%s): re-extracting", m_path, e)
        return None
    if list(feats.shape) != shape or labels.shape[0] != feats.shape[0]:
        logger.warning("features cache %s has inconsistent shapes: re-extracting", m_path)
        return None
    return feats, labels

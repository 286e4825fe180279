"""The on-disk cache of extracted features, keyed on what the features depend on.

``<cache_dir>/<split>_<layer>.{feats.npy,labels.npy,json}``; the JSON (:func:`cache_meta`)
holds the weights hash, layer, split, transform, the hash of the samples' absolute resolved
paths and labels, and the hash of the files' size and mtime_ns (``check="content"``: also their
bytes). A cache whose metadata matches is reused; otherwise the features are extracted again
and the entry rewritten by rank 0: the metadata file is removed first, then the arrays are
written (atomically each) and the metadata last, so an entry is valid as a whole or not at all,
whenever a writer is killed. The log says why an entry was used or rebuilt.

Several processes: rank 0 alone computes the metadata (so a content check hashes the files
once) and decides hit or miss; the decision reaches every rank (one all-reduce), so all ranks
extract together or none does. On a hit the other ranks read (memory-mapped) the rows
``gather`` gives them from the arrays rank 0 checked; when one of them cannot, every rank
re-extracts. With ``gather="shard"`` a rank's rows are a contiguous slice of the whole arrays in
rank order, but which slice may differ between an extraction and a hit; on a miss the shards
reach rank 0 in bounded chunks for writing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from pretrain.dist import (
    all_reduce_sum,
    get_rank,
    get_world_size,
    main_rank_values,
    run_on_main,
    shard_range,
)
from pretrain.fileio import atomic_write, fsync_dir, write_json_atomic
from transfer.eval.features import FeatureError, check_request, extract_features, rows_on_main

logger = logging.getLogger("imsvd.features")

CACHE_VERSION = 1
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
    channels_last: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`extract_features` behind the on-disk cache of the module docstring.

    Args:
        cache_dir: folder of the cache.
        split: split name (part of the file names and metadata).
        model, dataset, layer, batch_size, device, num_workers, precision, gather,
        channels_last: as for extract_features.
        weights_sha256: content hash of the backbone weights (load_backbone's meta["sha256"]).
        check: "stat" (size + mtime_ns of every file) or "content" (also a sha256 of each).
    Returns:
        (features, labels) as extract_features (unreadable images left out).
    Raises:
        FeatureError: unknown ``check``; as extract_features.
    """
    if check not in CACHE_CHECKS:  # on every rank, before any collective
        raise FeatureError(f"features.cache_check {check!r} is not one of {CACHE_CHECKS}")
    check_request(precision, gather)
    stem = Path(cache_dir) / f"{split}_{layer}"
    paths = tuple(Path(f"{stem}.{ext}") for ext in ("feats.npy", "labels.npy", "json"))
    key = (split, layer, dataset, weights_sha256, check)
    meta, hit = _main_checks(stem, paths, key, precision, device)
    if hit is not None:
        got = _hit_rows(hit, paths, gather)
        unread = int(all_reduce_sum(torch.tensor([int(got is None)], device=device)).item())
        if unread == 0:
            why = "same weights, layer, transform, sample paths and file sizes / mtimes"
            logger.info(
                "features cache hit: %s (%d x %d): %s (%s check)", stem, *hit.shape, why, check
            )
            return got
        logger.warning(
            "features cache %s could not be read on %d rank(s): re-extracting", stem, unread
        )
    logger.info("extracting %s features (%d images, layer %s)", split, len(dataset), layer)
    args = (batch_size, layer, device, num_workers, f"{split} features", precision, gather)
    feats, labels = extract_features(model, dataset, *args, channels_last=channels_last)
    whole = rows_on_main(feats, labels, device) if gather == "shard" else (feats, labels)
    write_args = (Path(cache_dir), paths[2], paths[0], paths[1], meta, *(whole or ()))
    _, error, failed = run_on_main(lambda: _write_cache(*write_args), device, (OSError,))
    if failed:  # the cache only saves time: the features are good, the run goes on
        logger.warning("features cache %s not written (%s)", stem, error or "see rank 0's log")
    return feats, labels


def _main_checks(stem, paths, key, precision, device):
    """Rank 0 signs the entry and decides hit or miss; every rank learns the decision (one
    exchange). Returns (rank 0's metadata or None, the hit: rank 0's memory-mapped arrays, the
    entry's (rows, cols) shape on the others; None on a miss)."""
    split, layer, dataset, weights_sha256, check = key
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
    return meta, None if state == _MISS else _Hit((rows, cols), hit)


@dataclass(frozen=True)
class _Hit:
    """A valid entry: its (rows, cols) shape, and rank 0's memory-mapped arrays (None on the
    other ranks, which read the files themselves)."""

    shape: tuple[int, int]
    arrays: tuple[np.ndarray, np.ndarray] | None


_MISS, _HIT, _FAILED = 0, 1, 2


def _hit_rows(hit: _Hit, paths, gather: str) -> tuple[np.ndarray, np.ndarray] | None:
    """This rank's rows of a valid entry (rank 0's memory-mapped arrays; the other ranks read
    the files), copied out of the map; None when this rank cannot read them."""
    rank, world = get_rank(), get_world_size()
    if gather == "main" and rank != 0:
        return np.zeros((0, hit.shape[1]), np.float32), np.zeros((0,), np.int64)
    arrays = hit.arrays if rank == 0 else _load_arrays(paths[0], paths[1], hit.shape)
    if arrays is None:
        return None
    lo, hi = shard_range(hit.shape[0], rank, world) if gather == "shard" else (0, hit.shape[0])
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
    except (OSError, ValueError, EOFError) as e:  # EOFError: an empty .npy
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
    except (OSError, ValueError, EOFError) as e:  # EOFError: an empty .npy
        logger.warning("features cache %s unreadable (%s): re-extracting", m_path, e)
        return None
    if list(feats.shape) != shape or labels.shape[0] != feats.shape[0]:
        logger.warning("features cache %s has inconsistent shapes: re-extracting", m_path)
        return None
    return feats, labels

"""The two-view pretraining dataset, its epoch sampler and loader.

Samples come from :mod:`pretrain.data.datasets` (an image tree, a list file or synthetic images);
each item is a pair of views whose augmentation parameters are a pure function of
(seed, epoch, index), so any process computes the same views. An unreadable image is replaced
by a deterministic draw from the dataset (non-strict) so that every rank's batches stay full.
Image reading lives in :mod:`pretrain.data.images`, the labelled datasets in
:mod:`pretrain.data.datasets`.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from pretrain.config import ConfigError, complete_section
from pretrain.data.datasets import SyntheticImages, build_image_dataset
from pretrain.data.fast_augment import device_augment, fast_crops, params_to_tensors
from pretrain.data.images import (
    DECODE_ERRORS,
    CorruptImageError,
    DataError,
    check_pixels,
    decode_rgb,
    exif_orientation,
)
from pretrain.data.transforms import AugmentConfig, reference_two_views, sample_two_views

logger = logging.getLogger("imsvd.data")

# --------------------------------------------------------------------------------------------
# Two-view pretraining dataset and loader
# --------------------------------------------------------------------------------------------

# A key the loader takes next to the data section: the engine passes train.channels_last along.
LOADER_EXTRA_KEYS: Dict[str, Any] = {"channels_last": False}


REPLACEMENT_TRIES = 8


class TwoViewDataset(Dataset):
    """Both views of a sample; indexed by (epoch, index) so augmentations are pure functions of
    (seed, epoch, index) whatever process computes them.

    Items are dicts; an unreadable image is replaced by a readable one (non-strict; counted in
    the source's ``num_skipped``), see :meth:`__getitem__`.
    """

    def __init__(self, source: Any, cfg: AugmentConfig, seed: int, pipeline: str) -> None:
        if pipeline not in ("fast", "pil"):
            raise DataError(f"data.pipeline={pipeline!r}: expected 'auto', 'fast' or 'pil'")
        self.source, self.cfg, self.seed, self.pipeline = source, cfg, int(seed), pipeline

    def __len__(self) -> int:
        return len(self.source)

    def _open(self, index: int) -> Tuple[Optional[Image.Image], int]:
        src = self.source
        if isinstance(src, SyntheticImages):
            return src.image(index), src.label(index)
        path, label = src.samples[index]
        try:
            # Lazy open: the fast pipeline may still choose a reduced JPEG decoding scale.
            img = Image.open(path)
            check_pixels(img)
            if self.pipeline == "pil" or img.mode not in ("RGB", "L") or exif_orientation(img) != 1:
                # the fast pipeline decodes lazily (JPEG draft) and converts with PIL, which is
                # right for upright RGB and L only: anything else is decoded now (decode_rgb)
                with img:
                    img = decode_rgb(img)
            return img, label
        except DECODE_ERRORS as exc:
            self._unreadable(index, exc)
            return None, label

    def _unreadable(self, index: int, exc: Exception) -> None:
        """Raise a CorruptImageError naming the file (strict), else count and log it."""
        err = CorruptImageError(f"cannot read image {self.source.samples[index][0]!r}: {exc}")
        if self.source.strict:
            raise err from exc
        self.source.note_bad(index, err)

    def __getitem__(self, key: Tuple[int, int]) -> Optional[Dict[str, Any]]:
        """Both views of sample ``index`` at ``epoch``; an unreadable image is replaced.

        The replacement is a deterministic function of (seed, epoch, index, attempt) drawn from
        the whole dataset (up to REPLACEMENT_TRIES tries), and its views use the augmentation
        parameters of the slot it fills; so every process's batches stay full and all ranks
        take the same steps. None only when every try was unreadable (dropped by the collate).
        """
        epoch, index = key
        item = self._item(epoch, index, index)
        n, failed = len(self.source), 0
        for attempt in range(REPLACEMENT_TRIES if n > 1 else 0):
            if item is not None:
                break
            failed += 1
            rng = np.random.default_rng([self.seed, epoch, index, attempt, 0xBAD])
            item = self._item(epoch, int(rng.integers(n)), index)
        if item is not None:
            item["unreadable"] = failed
        return item

    def _item(self, epoch: int, index: int, slot: int) -> Optional[Dict[str, Any]]:
        img, label = self._open(index)
        if img is None:
            return None
        w, h = img.size
        params = sample_two_views(self.seed, epoch, slot, w, h, self.cfg)
        try:
            if self.pipeline == "pil":
                v1, v2 = reference_two_views(img, params, self.cfg)
            else:
                a1, a2 = fast_crops(img, params, self.cfg)
                v1, v2 = torch.from_numpy(a1.copy()), torch.from_numpy(a2.copy())
        except DECODE_ERRORS as exc:  # truncated data surfaces at decode time
            if isinstance(self.source, SyntheticImages):
                raise
            self._unreadable(index, exc)
            return None
        finally:
            if hasattr(img, "close"):
                img.close()
        return {"view1": v1, "view2": v2, "params": params, "index": index, "label": label}


def collate_two_views(items: List[Optional[Dict[str, Any]]]) -> Dict[str, Any]:
    """Stack the readable items of a batch; ``skipped`` counts the unreadable reads (items
    that stayed unreadable plus the unreadable images that readable replacements stand for).

    Returns:
        dict with view1, view2 (uint8 (N,H,W,3) for the fast pipeline, normalised float
        (N,3,H,W) for the pil one), params1/params2 (device-stage tensors), index, label,
        skipped. N may be 0.
    """
    good = [it for it in items if it is not None]
    replaced = sum(it.get("unreadable", 0) for it in good)
    batch: Dict[str, Any] = {"skipped": len(items) - len(good) + replaced, "size": len(good)}
    if not good:
        return batch
    batch["view1"] = torch.stack([it["view1"] for it in good])
    batch["view2"] = torch.stack([it["view2"] for it in good])
    batch["params1"] = params_to_tensors([it["params"][0] for it in good])
    batch["params2"] = params_to_tensors([it["params"][1] for it in good])
    batch["index"] = torch.tensor([it["index"] for it in good], dtype=torch.int64)
    batch["label"] = torch.tensor([it["label"] for it in good], dtype=torch.int64)
    return batch


class EpochBatchSampler(Sampler):
    """Per-rank batches of (epoch, index) keys for one epoch.

    The epoch's permutation is a pure function of (seed, epoch); it is cut to a multiple of
    world_size * batch_size (drop_last), rank r takes every world_size-th index, and the first
    ``start_iter`` batches are skipped without being touched.
    """

    def __init__(
        self, n: int, batch_size: int, rank: int, world_size: int, seed: int, shuffle: bool = True
    ) -> None:
        self.n, self.batch_size, self.rank, self.world_size = n, batch_size, rank, world_size
        self.seed, self.shuffle = int(seed), shuffle
        self.epoch, self.start_iter = 0, 0

    def __len__(self) -> int:
        return self.n // (self.batch_size * self.world_size) - self.start_iter

    def num_batches(self) -> int:
        """Batches per epoch (full epoch, ignoring start_iter)."""
        return self.n // (self.batch_size * self.world_size)

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        if self.shuffle:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) & (2**63 - 1))
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        per_rank = self.num_batches() * self.batch_size
        mine = order[: per_rank * self.world_size][self.rank :: self.world_size]
        for b in range(self.start_iter, self.num_batches()):
            chunk = mine[b * self.batch_size : (b + 1) * self.batch_size]
            yield [(self.epoch, i) for i in chunk]


class PretrainLoader:
    """Two-view batches for one rank; see :func:`build_pretrain_loader`.

    Attributes:
        skipped: unreadable images met so far (as reported by the batches).
        dataset: the :class:`TwoViewDataset`.
        aug: the :class:`AugmentConfig`.
    """

    def __init__(
        self,
        dataset: TwoViewDataset,
        sampler: EpochBatchSampler,
        num_workers: int,
        pin_memory: bool,
        channels_last: bool,
    ) -> None:
        self.dataset, self.sampler = dataset, sampler
        self.aug = dataset.cfg
        self.num_workers, self.pin_memory, self.channels_last = (
            num_workers,
            pin_memory,
            channels_last,
        )
        self.skipped = 0
        self._since_last = 0

    def set_epoch(self, epoch: int, start_iter: int = 0) -> None:
        """Select the epoch; skip its first ``start_iter`` batches (resume) without decoding."""
        if not 0 <= start_iter <= self.sampler.num_batches():
            raise DataError(
                f"start_iter={start_iter} outside [0, {self.sampler.num_batches()}] batches/epoch"
            )
        self.sampler.epoch, self.sampler.start_iter = int(epoch), int(start_iter)

    def __len__(self) -> int:
        """Batches per (full) epoch, drop_last."""
        return self.sampler.num_batches()

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        loader = DataLoader(
            self.dataset,
            batch_sampler=self.sampler,
            num_workers=self.num_workers,
            collate_fn=collate_two_views,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
        )
        for batch in loader:
            self.skipped += batch["skipped"]
            self._since_last += batch["skipped"]
            if batch["size"] == 0:  # still yielded: in DDP every rank must see every batch
                logger.warning("a batch whose images were all unreadable (it will be skipped)")
            yield batch

    def pop_skipped(self) -> int:
        """Unreadable images since the previous call (for logging)."""
        n, self._since_last = self._since_last, 0
        return n

    def prepare(
        self, batch: Dict[str, Any], device: Union[str, torch.device]
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Finish both views on ``device``: normalised float32 (N, 3, S, S) each.

        Args:
            batch: a batch from iterating this loader.
            device: where the model runs; the fast pipeline's colour ops run there.
        Returns:
            (x1, x2), channels_last if data.channels_last.
        """
        device = torch.device(device)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        if self.dataset.pipeline == "pil":
            return tuple(  # type: ignore[return-value]
                batch[k].to(device, non_blocking=True).contiguous(memory_format=fmt)
                for k in ("view1", "view2")
            )
        out = []
        for k in ("1", "2"):
            views = batch["view" + k].to(device, non_blocking=True)
            out.append(
                device_augment(
                    views, batch["params" + k], self.aug, channels_last=self.channels_last
                )
            )
        return out[0], out[1]


def _pair(cfg: Dict[str, Any], key: str) -> Tuple[float, float]:
    v = cfg[key]
    if not isinstance(v, (list, tuple)) or len(v) != 2:
        raise DataError(f"data.{key}={v!r}: expected a list of two numbers")
    return float(v[0]), float(v[1])


def check_data_paths(cfg: Mapping[str, Any], probe: Mapping[str, Any] | None = None) -> None:
    """The folders and files a run reads, checked before any process starts (``--check``).

    Args:
        cfg: the ``data`` section; probe: the ``eval`` section (its bank / query folders).

    Raises:
        DataError: an unknown ``data.kind``, or a path it needs that is missing, naming the key.
    """
    kind, root = cfg["kind"], cfg["root"]
    if kind not in ("imagefolder", "list", "synthetic"):
        raise DataError(f"data.kind={kind!r}: expected imagefolder, list or synthetic")
    if kind == "list" and not (cfg["list_file"] and os.path.isfile(cfg["list_file"])):
        raise DataError(f"data.list_file={cfg['list_file']!r} (data.kind: list): no such file")
    needs_root = kind == "imagefolder" or (kind == "list" and root is not None)
    if needs_root and not (root and os.path.isdir(root)):
        raise DataError(f"data.root={root!r} does not exist or is not a directory")
    for key in ("bank_root", "query_root"):
        path = (probe or {}).get(key)
        if path and not os.path.isdir(path):
            raise DataError(f"eval.{key}={path!r} does not exist or is not a directory")


def _source(cfg: Mapping[str, Any]) -> Any:
    """The images of ``data.kind``: generated, an ImageFolder tree or a list file."""
    check_data_paths(cfg)  # the kind, and the paths it needs, naming the key
    if cfg["kind"] == "synthetic":
        return SyntheticImages(int(cfg["synthetic_length"]), int(cfg["synthetic_size"]))
    list_file = cfg["list_file"] if cfg["kind"] == "list" else None
    return build_image_dataset(root=cfg["root"], list_file=list_file, strict=bool(cfg["strict"]))


def _augment_config(cfg: Mapping[str, Any]) -> AugmentConfig:
    try:
        return AugmentConfig(
            size=int(cfg["image_size"]),
            scale=_pair(cfg, "crop_scale"),
            interpolation=str(cfg["interpolation"]),
            blur_prob=_pair(cfg, "blur_prob"),
            solarize_prob=_pair(cfg, "solarize_prob"),
        )
    except ConfigError as exc:
        raise DataError(f"data config: {exc}") from exc


def build_pretrain_loader(
    data_cfg: Dict[str, Any],
    *,
    rank: int,
    world_size: int,
    seed: int,
    batch_size_per_rank: int,
    device: Union[str, torch.device] = "cpu",
) -> PretrainLoader:
    """Build the two-view pretraining loader of one rank.

    Args:
        data_cfg: the ``data`` section of a pretraining config (plus ``channels_last``); keys
            it lacks take the defaults of configs/pretrain/base.yaml; an unknown key or a
            wrong type is an error.
        rank, world_size: this process's shard of each epoch.
        seed: global seed; augmentations and shuffling are functions of (seed, epoch, index).
        batch_size_per_rank: images per batch on this rank (drop_last).
        device: training device (kept for symmetry with prepare(); pinning needs CUDA).
    Returns:
        A :class:`PretrainLoader`.
    Raises:
        DataError: unknown key, bad value, missing data.
    """
    try:
        cfg = complete_section(data_cfg, "pretrain", "data", extra=LOADER_EXTRA_KEYS)
    except ConfigError as exc:
        raise DataError(f"unknown data config key or bad value: {exc}") from exc
    source, aug = _source(cfg), _augment_config(cfg)
    if batch_size_per_rank < 1 or not 0 <= rank < world_size:
        raise DataError(f"bad batch_size_per_rank={batch_size_per_rank} / rank={rank}/{world_size}")
    if len(source) < batch_size_per_rank * world_size:
        raise DataError(
            f"dataset has {len(source)} images, fewer than one global batch "
            f"({batch_size_per_rank} x {world_size})"
        )
    pipeline = str(cfg["pipeline"])
    if pipeline == "auto":
        pipeline = "pil" if torch.device(device).type == "cpu" else "fast"
    dataset = TwoViewDataset(source, aug, seed, pipeline)
    sampler = EpochBatchSampler(len(source), batch_size_per_rank, rank, world_size, seed)
    return PretrainLoader(
        dataset,
        sampler,
        num_workers=int(cfg["num_workers"]),
        pin_memory=bool(cfg["pin_memory"]) and torch.device(device).type == "cuda",
        channels_last=bool(cfg["channels_last"]),
    )

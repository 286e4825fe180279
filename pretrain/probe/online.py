"""Online kNN probe: how good the backbone's features are, measured while pretraining runs.

Every ``eval.every_steps`` steps (and at the end) the engine calls :class:`KNNProbe`, which
extracts the pooled backbone features of a fixed labelled *bank* and *query* set in eval mode and
reports weighted kNN top-1 (cosine, T = 0.07; :mod:`pretrain.probe.knn`), as solo-learn and DINO do.
The images are decoded once, resized and centre-cropped to the training size and kept in memory
as uint8 (10k + 2k images at 32 px take 37 MB), so a probe costs one forward pass over them.

The sets come either from two labelled image folders (``eval.bank_root`` / ``eval.query_root``;
query classes are matched to the bank's by name) or, by default, from a seeded split of the
pretraining folder ``data.root`` into two disjoint subsets, so choices can be made on the
training data without looking at a test split.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torchvision.transforms as T
from torch import nn

from pretrain import dist
from pretrain.config import ConfigError
from pretrain.data.datasets import SyntheticImages, build_image_dataset
from pretrain.data.images import CorruptImageError, DataError, load_rgb
from pretrain.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from pretrain.probe.knn import check_temperature, knn_accuracy

logger = logging.getLogger("imsvd.probe")

__all__ = ["KNNProbe", "ProbeSet", "build_probe", "load_probe_set", "first_by_index"]


class ProbeSet:
    """Decoded, resized images (uint8, N x 3 x S x S) with integer labels (N,)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, skipped: int = 0) -> None:
        self.images = images
        self.labels = labels
        self.skipped = skipped

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def _to_uint8(img, size: int) -> torch.Tensor:
    img = T.CenterCrop(size)(T.Resize(size, interpolation=T.InterpolationMode.BILINEAR)(img))
    return T.PILToTensor()(img)


def load_probe_set(paths_labels: Sequence[tuple[str, int]], size: int, where: str) -> ProbeSet:
    """Decode (path, label) samples into a :class:`ProbeSet` (resize + centre crop to ``size``).

    Unreadable images are dropped, counted in ``skipped`` and logged.

    Raises:
        DataError: no image could be read.
    """
    images, labels, skipped = [], [], 0
    for path, label in paths_labels:
        try:
            images.append(_to_uint8(load_rgb(path), size))
        except CorruptImageError as exc:
            skipped += 1
            logger.warning("probe %s: skipping unreadable image: %s", where, exc)
            continue
        labels.append(label)
    if not images:
        if not paths_labels and where == "bank shard":
            return _empty(size)
        raise DataError(f"probe {where}: no readable image")
    return ProbeSet(torch.stack(images), torch.tensor(labels, dtype=torch.long), skipped)


def first_by_index(samples: Sequence[tuple[str, int]], n: int) -> list[tuple[str, int]]:
    """The samples whose file name (without suffix) is an integer below ``n``.

    For image trees exported with each image's index in its source file as its name (the
    Fashion-MNIST tree of tools/demo.py): "the first n images" of the original split.
    """
    out = []
    for path, label in samples:
        stem = Path(path).stem
        if stem.isdigit() and int(stem) < n:
            out.append((path, label))
    return out


def _empty(size: int) -> ProbeSet:
    """No images: the bank shard of a rank past the end of a small bank."""
    return ProbeSet(torch.zeros((0, 3, size, size), dtype=torch.uint8), torch.zeros(0).long())


def _synthetic(source: SyntheticImages, index: np.ndarray, size: int) -> ProbeSet:
    if len(index) == 0:
        return _empty(size)
    images = [_to_uint8(source.image(int(i)), size) for i in index]
    labels = [source.label(int(i)) for i in index]
    return ProbeSet(torch.stack(images), torch.tensor(labels, dtype=torch.long))


class KNNProbe:
    """Weighted kNN top-1 of the pooled backbone features on a fixed bank / query pair.

    Args:
        bank: labelled bank (:class:`ProbeSet`), or with ``shard=True`` this rank's contiguous
            shard of it (rank 0 the first rows; :func:`build_probe` loads only that).
        queries: labelled queries (all of them, on every rank).
        ks: neighbour counts (top-1 is reported for each).
        temperature: vote temperature (0.07); finite and > 0.
        batch_size: images per forward pass.
        shard: the bank is this rank's shard: every rank of the process group must call the
            probe, the ranks' neighbours are merged (:func:`pretrain.probe.knn.knn_classify` with
            ``sharded=True``) and every rank returns the numbers of the whole bank.
        num_classes: label count (default: from the bank's and the queries' labels; give it
            with ``shard=True``, a shard may lack the largest label).

    Calling the probe with a backbone (N x 3 x S x S -> N x C pooled features) returns
    ``{"knn/top1_k20": float (percent), ..., "knn/seconds": float}``; the backbone's train/eval
    mode is restored afterwards.
    """

    def __init__(
        self,
        bank: ProbeSet,
        queries: ProbeSet,
        ks: Sequence[int] = (20,),
        temperature: float = 0.07,
        batch_size: int = 256,
        shard: bool = False,
        num_classes: int | None = None,
    ) -> None:
        if batch_size <= 0:
            raise ConfigError(f"config key 'eval.batch_size': {batch_size} must be positive")
        self.bank, self.queries = bank, queries
        self.ks = tuple(int(k) for k in ks)
        self.temperature = check_temperature(temperature, key="config key 'eval.temperature'")
        self.batch_size = int(batch_size)
        self.shard = bool(shard)
        if num_classes is None:
            labels = torch.cat([bank.labels, queries.labels])
            num_classes = int(labels.max()) + 1
        self.num_classes = int(num_classes)
        self._mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
        self._std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255

    @torch.no_grad()
    def features(self, backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """Pooled features (N x C, fp32, CPU) of uint8 images (N x 3 x S x S)."""
        device = next(backbone.parameters()).device
        out = []
        for start in range(0, images.shape[0], self.batch_size):
            x = images[start : start + self.batch_size].to(device).float()
            x = (x - self._mean.to(device)) / self._std.to(device)
            out.append(torch.flatten(backbone(x), 1).float().cpu())
        return torch.cat(out)

    def __call__(self, backbone: nn.Module) -> dict[str, float]:
        t0 = time.perf_counter()
        sharded = self.shard and dist.get_world_size() > 1
        was_training = backbone.training
        backbone.eval()
        try:
            fq = self.features(backbone, self.queries.images)
            if len(self.bank):
                fb = self.features(backbone, self.bank.images)
            else:  # an empty shard (a bank smaller than the world size)
                fb = fq.new_zeros((0, fq.shape[1]))
        finally:
            backbone.train(was_training)
        acc = knn_accuracy(
            fb,
            self.bank.labels,
            fq,
            self.queries.labels,
            ks=self.ks,
            temperature=self.temperature,
            num_classes=self.num_classes,
            sharded=sharded,
            # NCCL gathers CUDA tensors: the sharded vote runs where the backbone is
            device=next(backbone.parameters()).device if sharded else "cpu",
        )
        out = {f"knn/{k}": v for k, v in acc.items()}
        out["knn/seconds"] = time.perf_counter() - t0
        return out


def build_probe(eval_cfg: Mapping[str, Any], data_cfg: Mapping[str, Any]) -> KNNProbe:
    """Build the probe from the config's ``eval`` and ``data`` sections.

    With ``eval.bank_root`` and ``eval.query_root`` both set, those labelled folders are used
    (the first ``bank_size`` / ``query_size`` images of a seeded permutation of each). Otherwise
    a seeded permutation of the pretraining data (``data.root`` / ``data.list_file``, or the
    synthetic images) is split into a bank of ``eval.bank_size`` and, disjoint from it,
    ``eval.query_size`` queries.

    Raises:
        DataError: missing folders, too few images, classes of the queries unknown to the bank.
    """
    size = int(eval_cfg["image_size"] or data_cfg["image_size"])
    n_bank, n_query = int(eval_cfg["bank_size"]), int(eval_cfg["query_size"])
    if n_bank <= 0 or n_query <= 0:
        raise DataError(
            f"config keys 'eval.bank_size' / 'eval.query_size' must be positive, got "
            f"{n_bank} / {n_query}"
        )
    rng = np.random.default_rng(int(eval_cfg["seed"]))
    t0 = time.perf_counter()
    kw = dict(ks=eval_cfg["ks"], temperature=eval_cfg["temperature"])
    kw["batch_size"] = eval_cfg["batch_size"]
    bank_root, query_root = eval_cfg["bank_root"], eval_cfg["query_root"]
    if bool(bank_root) != bool(query_root):
        raise DataError("config keys 'eval.bank_root' and 'eval.query_root' must be set together")
    # in a process group each rank loads (and embeds) only its contiguous shard of the bank
    world = dist.get_world_size()
    bank, queries, labels, n_bank = _load_sets(
        eval_cfg, data_cfg, rng, (n_bank, n_query), size, "bank shard" if world > 1 else "bank"
    )
    logger.info(
        "kNN probe: bank %d (%s), queries %d images at %d px (%.1f s to load)",
        len(bank),
        f"this rank's shard of {n_bank}" if world > 1 else "all",
        len(queries),
        size,
        time.perf_counter() - t0,
    )
    return KNNProbe(bank, queries, shard=world > 1, num_classes=max(labels) + 1, **kw)


def _shard(items):
    """This rank's contiguous part of ``items`` (all of them for one process)."""
    lo, hi = dist.shard_range(len(items), dist.get_rank(), dist.get_world_size())
    return items[lo:hi]


def _load_sets(eval_cfg, data_cfg, rng, sizes: tuple[int, int], size: int, where: str):
    """(bank shard, queries, labels of the whole bank then the queries, bank size) from the
    probe's folders, the synthetic images or the pretraining data (see :func:`build_probe`)."""
    n_bank, n_query = sizes
    if eval_cfg["bank_root"]:
        bank_ds = build_image_dataset(root=str(eval_cfg["bank_root"]))
        # queries labelled by the bank's class names (an unknown class is an error naming it)
        query_ds = build_image_dataset(
            root=str(eval_cfg["query_root"]), class_names=bank_ds.classes
        )
        bank_items = [bank_ds.samples[i] for i in rng.permutation(len(bank_ds))[:n_bank]]
        qs = [query_ds.samples[i] for i in rng.permutation(len(query_ds))[:n_query]]
        labels = [y for _, y in bank_items + qs]
        bank = load_probe_set(_shard(bank_items), size, where)
        return bank, load_probe_set(qs, size, "queries"), labels, n_bank
    if data_cfg["kind"] == "synthetic":
        source = SyntheticImages(data_cfg["synthetic_length"], data_cfg["synthetic_size"])
        perm = rng.permutation(len(source))
        if n_bank + n_query > len(perm):
            n_bank, n_query = _shrink(n_bank, n_query, len(perm))
        labels = [source.label(int(i)) for i in perm[: n_bank + n_query]]
        bank = _synthetic(source, _shard(perm[:n_bank]), size)
        return bank, _synthetic(source, perm[n_bank : n_bank + n_query], size), labels, n_bank
    ds = build_image_dataset(root=data_cfg["root"], list_file=data_cfg["list_file"])
    perm = rng.permutation(len(ds))
    if n_bank + n_query > len(perm):
        n_bank, n_query = _shrink(n_bank, n_query, len(perm))
    labels = [ds.samples[i][1] for i in perm[: n_bank + n_query]]
    bank = load_probe_set([ds.samples[i] for i in _shard(perm[:n_bank])], size, where)
    qs = [ds.samples[i] for i in perm[n_bank : n_bank + n_query]]
    return bank, load_probe_set(qs, size, "queries"), labels, n_bank


def _shrink(n_bank: int, n_query: int, available: int) -> tuple[int, int]:
    """Scale a bank / query request down to the images available (keeping both non-empty)."""
    if available < 2:
        raise DataError(f"the kNN probe needs at least 2 images, the data has {available}")
    q = max(1, round(available * n_query / (n_bank + n_query)))
    logger.warning(
        "kNN probe: %d + %d images requested, %d available; using %d + %d",
        n_bank,
        n_query,
        available,
        available - q,
        q,
    )
    return available - q, q


def indexed_folder_knn(
    backbone: nn.Module,
    bank_root: str | Path,
    query_root: str | Path,
    n_bank: int,
    n_query: int,
    size: int,
    ks: Sequence[int] = (20, 200),
) -> dict[str, float]:
    """kNN top-1 (percent) of ``backbone`` with the first ``n_bank`` / ``n_query`` images of two
    index-named labelled folders as bank and queries (see :func:`first_by_index`).

    This is the demo's evaluation protocol (bank = the first 10,000 Fashion-MNIST train images,
    queries = the first 2,000 test images); query classes are matched to the bank's by name.

    Returns:
        ``{"top1_k20": ..., "top1_k200": ...}``.
    """
    bank_ds = build_image_dataset(root=str(bank_root))
    # queries labelled by the bank's class names (an unknown class is an error naming it)
    query_ds = build_image_dataset(root=str(query_root), class_names=bank_ds.classes)
    bank = load_probe_set(first_by_index(bank_ds.samples, n_bank), size, "bank")
    qs = first_by_index(query_ds.samples, n_query)
    queries = load_probe_set(qs, size, "queries")
    res = KNNProbe(bank, queries, ks=ks)(backbone)
    return {k[4:]: v for k, v in res.items() if k.startswith("knn/top1")}

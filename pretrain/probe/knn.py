"""Weighted k-nearest-neighbour voting on frozen features (the kNN protocol of Wu et al. 2018,
as used by the IMSVD paper's Table II; docs/PROTOCOLS.md section 3.1).

Features are L2-normalised; each query votes over its k most cosine-similar bank samples with
weights exp(sim / T), T = 0.07. The weights are computed as exp((sim - sim_max) / T) with
sim_max the query's best similarity: the same vote scaled by a positive constant per query (so
the same prediction), without the float32 overflow of exp(sim / T) for T below about 0.0113.
This is the one implementation: the offline evaluation (``transfer.eval.knn``) and the online
probe of pretraining (``pretrain.probe.online``) both call it.

The k neighbours of a query are its k most similar bank rows, ties in similarity broken by the
lower bank index (-0.0 counts below +0.0); the vote of class c is the sum over them of
exp((sim - sim_max) / T), the largest class wins (the lower class index on a tie).

Sharded bank: with ``sharded=True`` in a process group, each rank passes its contiguous shard
of the bank (rank 0 the first rows, then rank 1, ...; shards may differ in size or be empty)
and the same queries. Each rank finds its shard's top-k candidates per query chunk, one
all_gather of (chunk, k) keys and labels merges them, and the merged top-k are voted by
scatter-adding their weights: predictions equal those of one process holding the whole bank,
returned on every rank. Per rank the memory is the shard (not copied: each bank block is
normalised when it is used) plus O(chunk_size x (bank_block + W k)); no N x D array is
gathered. The default bank block of 16,384 rows keeps the temporaries of a 1,024-query chunk
near 0.6 GB (measured no slower than 65,536 on a 131k x 2048 bank).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pretrain import dist
from pretrain.config import ConfigError
from pretrain.data.images import DataError

__all__ = ["knn_classify", "knn_accuracy", "check_temperature", "bank_tensor", "BANK_PRECISIONS"]

# storage of the bank: float32, or normalised rows in half the bytes (similarities stay float32)
BANK_PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_temperature(temperature: float, key: str = "temperature") -> float:
    """``temperature`` as a float when it is a finite number > 0.

    Args:
        temperature: the vote temperature.
        key: the config key named in the error (e.g. ``knn.temperature``).

    Returns:
        The temperature as a float.

    Raises:
        ConfigError: not a number, NaN, infinite or <= 0 (naming ``key`` and the value).
    """
    try:
        t = float(temperature)
    except (TypeError, ValueError):
        raise ConfigError(f"kNN {key} must be a number, got {temperature!r}") from None
    if not math.isfinite(t) or t <= 0:
        raise ConfigError(f"kNN {key} must be a finite number > 0, got {temperature!r}")
    return t


# float32 similarity and bank index in one int64 sort key: similarity descending, then the
# lower bank index first. topk on the keys is deterministic, and shards merge by the same rule.
_LOW = 1 << 32
_PAD = torch.iinfo(torch.int64).min  # a padded candidate: below every real key


def _order_keys(sim: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """int64 keys of float32 ``sim`` (m, b) and int64 bank indices ``index`` (b,) < 2**32."""
    bits = sim.contiguous().view(torch.int32)
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)  # monotone in sim
    return ordered * _LOW + (_LOW - 1 - index)


def _decode_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 similarities, int64 bank indices) of keys made by :func:`_order_keys`."""
    high = torch.div(keys, _LOW, rounding_mode="floor")
    index = _LOW - 1 - (keys - high * _LOW)
    bits = high.to(torch.int32)
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).view(torch.float32), index


def bank_tensor(
    feats: np.ndarray | torch.Tensor,
    precision: str = "fp32",
    device: str | torch.device = "cpu",
    block: int = 65536,
) -> torch.Tensor:
    """The bank as :func:`knn_classify` holds it: float32 as given, or its L2-normalised rows
    stored in bf16 / fp16 (half the bytes; written block by block, so no float32 copy of the
    whole bank is made on ``device``).

    Args:
        feats: (N, D) features.
        precision: a key of :data:`BANK_PRECISIONS`.
        device: where the bank is kept.
        block: rows converted at a time.

    Returns:
        (N, D) tensor of that dtype on ``device``.

    Raises:
        ConfigError: an unknown precision.
    """
    if precision not in BANK_PRECISIONS:
        raise ConfigError(
            f"kNN bank_precision {precision!r} is not one of {', '.join(BANK_PRECISIONS)}"
        )
    if precision == "fp32":
        return torch.as_tensor(feats, dtype=torch.float32, device=device)
    src = torch.as_tensor(feats)
    out = torch.empty(tuple(src.shape), dtype=BANK_PRECISIONS[precision], device=device)
    for lo in range(0, src.shape[0], block):
        part = src[lo : lo + block].to(device=device, dtype=torch.float32)
        out[lo : lo + block] = F.normalize(part, dim=1)
    return out


def _shard_topk(q, bank, offset, kmax, bank_block):
    """Top-``kmax`` keys (m, kmax) of queries ``q`` over this bank shard, rows [offset, ...) of
    the whole bank, one (m, bank_block) similarity block at a time; padded with _PAD."""
    best = torch.full((q.shape[0], kmax), _PAD, dtype=torch.int64, device=q.device)
    for lo in range(0, bank.shape[0], bank_block):
        # normalised block by block: the shard itself is never copied
        block = F.normalize(bank[lo : lo + bank_block].float(), dim=1)
        index = torch.arange(lo, lo + block.shape[0], device=q.device) + offset
        keys = _order_keys(q @ block.T, index)
        keys = keys.topk(min(kmax, keys.shape[1]), dim=1).values
        best = torch.cat([best, keys], dim=1).topk(kmax, dim=1).values
    return best


def _check_inputs(bank, labels, queries, ks, chunk_size, bank_block):
    if int(chunk_size) <= 0:
        raise ValueError(f"kNN chunk_size must be a positive integer, got {chunk_size!r}")
    if int(bank_block) <= 0:
        raise ValueError(f"kNN bank_block must be a positive integer, got {bank_block!r}")
    if bank.ndim != 2 or queries.ndim != 2 or bank.shape[1] != queries.shape[1]:
        raise ValueError(f"kNN: bank {tuple(bank.shape)} and queries {tuple(queries.shape)} differ")
    if labels.shape[0] != bank.shape[0]:
        raise ValueError(f"kNN: {bank.shape[0]} bank rows but {labels.shape[0]} labels")
    if not ks or any(int(k) <= 0 for k in ks):
        raise ValueError(f"kNN: ks must be positive integers, got {list(ks)}")
    for name, feats in (("bank", bank), ("query", queries)):
        # block by block: isfinite of a whole bank would allocate more than the bank itself
        for lo in range(0, feats.shape[0], int(bank_block)):
            if not bool(torch.isfinite(feats[lo : lo + int(bank_block)]).all()):
                raise ValueError(f"kNN: the {name} features contain NaN or infinite values")


def knn_classify(
    train_feats: np.ndarray | torch.Tensor,
    train_labels: np.ndarray | torch.Tensor,
    test_feats: np.ndarray | torch.Tensor,
    ks: Sequence[int] = (20, 200),
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
    device: str | torch.device = "cpu",
    sharded: bool = False,
    bank_block: int = 16384,
) -> dict:
    """Weighted cosine k-NN predictions, on one process or over a bank sharded across ranks
    (the neighbour order, the vote and the sharded merge: see the module docstring).

    Args:
        train_feats: (N, D) bank features, or this rank's (N_r, D) shard, normalised block by
            block; a float32 array or tensor on ``device`` is used without a copy, and so is a
            bf16 / fp16 tensor (:func:`bank_tensor`), its blocks compared in float32.
        train_labels: (N,) or (N_r,) integer labels.
        test_feats: (M, D) query features.
        ks: neighbour counts (each capped at the whole bank's size).
        temperature: vote weight exp(sim / temperature); finite and > 0.
        num_classes: label count (default: max label + 1 over the whole bank).
        chunk_size: query rows per similarity block.
        device: where the products run (the process's device for NCCL).
        sharded: the bank is sharded over the process group's ranks (every rank must call).
        bank_block: bank rows per similarity block (bounds it to chunk_size x bank_block).

    Returns:
        {k: (M,) int64 numpy predictions} for each k in ks.

    Raises:
        ValueError: non-positive k, chunk_size or bank_block, mismatched shapes, non-finite
            features; its subclasses ConfigError: temperature not finite or <= 0, DataError:
            an empty bank.
    """
    world = dist.get_world_size() if sharded else 1
    try:
        temperature = check_temperature(temperature)
        bank, labels, queries = _as_tensors(train_feats, train_labels, test_feats, device)
        _check_inputs(bank, labels, queries, ks, chunk_size, bank_block)
        refused = None
    except ValueError as exc:
        if world == 1:
            raise
        refused = exc  # raised on every rank below: a rank alone would leave the others waiting
    sizes = _shard_sizes(bank.shape[0] if refused is None else 0, refused, world, device)
    offset, total = sum(sizes[: dist.get_rank()]) if world > 1 else 0, sum(sizes)
    if total == 0:
        raise DataError("kNN: 0 bank rows (no readable bank image)")
    n_cls = int(num_classes) if num_classes else _class_count(labels, world)
    kmax = min(max(int(k) for k in ks), total)
    preds: dict[int, list[torch.Tensor]] = {int(k): [] for k in ks}
    for start in range(0, queries.shape[0], int(chunk_size)):
        q = F.normalize(queries[start : start + int(chunk_size)].to(device), dim=1)
        sim, cand = _neighbours(q, bank, labels, offset, kmax, int(bank_block), world)
        for k, pred in _vote(sim, cand, preds, kmax, n_cls, temperature).items():
            preds[k].append(pred)
    return {k: torch.cat(v).numpy() if v else np.zeros(0, np.int64) for k, v in preds.items()}


def _neighbours(q, bank, labels, offset: int, kmax: int, bank_block: int, world: int):
    """(similarities, labels) (m, kmax) of the whole bank's top-k of queries ``q``, sorted:
    this shard's candidates, merged with the other ranks' by the same key order."""
    keys = _shard_topk(q, bank, offset, kmax, bank_block)
    if world > 1:
        keys = torch.cat(dist.all_gather_tensor(keys[None]).unbind(0), dim=1)
        keys = keys.topk(kmax, dim=1).values
    sim, index = _decode_keys(keys)
    return sim, _labels_at(labels, index, offset, world)


def _as_tensors(train_feats, train_labels, test_feats, device):
    """The bank (float32, or a bf16 / fp16 tensor as given) and its labels on ``device``, the
    queries as float32 (moved chunk by chunk)."""
    half = torch.is_tensor(train_feats) and train_feats.dtype in (torch.bfloat16, torch.float16)
    bank = torch.as_tensor(train_feats, dtype=None if half else torch.float32, device=device)
    labels = torch.as_tensor(train_labels, dtype=torch.long, device=device)
    return bank, labels, torch.as_tensor(test_feats, dtype=torch.float32)


def _shard_sizes(local: int, refused, world: int, device) -> list[int]:
    """Every rank's bank rows (one exchange); a rank's refused inputs are raised on every rank
    (a rank raising alone would leave the others waiting in the next collective)."""
    if world == 1:
        return [local]
    sizes = dist.gather_batch_sizes(-1 if refused else local, torch.device(device))
    if refused is not None:
        raise refused
    if min(sizes) < 0:
        raise ValueError(f"kNN: the inputs of rank {sizes.index(min(sizes))} were refused")
    return sizes


def _vote(sim, cand, ks, kmax: int, n_cls: int, temperature: float) -> dict:
    """argmax class (CPU int64) per query for each k of the (m, kmax) sorted neighbours."""
    # exp(sim / T) / exp(sim_max / T): each query's votes scaled by one positive constant, the
    # largest weight exactly 1 (no overflow whatever T; float64 for the division)
    weight = ((sim.double() - sim[:, :1].double()) / temperature).exp().float()
    out = {}
    for k in ks:
        kk = min(k, kmax)
        votes = weight.new_zeros((sim.shape[0], n_cls)).scatter_add_(
            1, cand[:, :kk], weight[:, :kk]
        )
        out[k] = votes.argmax(1).cpu()
    return out


def _class_count(labels: torch.Tensor, world: int) -> int:
    """The largest label over the whole bank (every rank's shard) + 1."""
    top = labels.max() if labels.numel() else labels.new_zeros(())
    return int(_max_over_ranks(top, world)) + 1


def _max_over_ranks(x: torch.Tensor, world: int) -> torch.Tensor:
    """The largest of a scalar over the ranks (the tensor itself for one process)."""
    if world == 1:
        return x
    return dist.all_gather_tensor(x.reshape(1)).max()


def _labels_at(labels, index, offset, world):
    """Labels (m, k) of whole-bank indices: this shard's, then gathered (max) from the others."""
    local = index - offset
    if labels.shape[0] == 0:
        out = torch.full_like(index, -1)
    else:
        mine = (local >= 0) & (local < labels.shape[0])
        out = torch.where(mine, labels[local.clamp(0, labels.shape[0] - 1)], -1)
    if world > 1:  # each candidate's label is known on exactly one rank
        out = dist.all_gather_tensor(out[None]).max(dim=0).values
    return out


def knn_accuracy(
    train_feats, train_labels, test_feats, test_labels, ks=(20, 200), temperature=0.07, **kw
) -> dict:
    """Top-1 accuracy (percent) per k of :func:`knn_classify`.

    Returns:
        {"top1_k20": float, "top1_k200": float, ...} in percent.
    """
    preds = knn_classify(train_feats, train_labels, test_feats, ks, temperature, **kw)
    y = np.asarray(test_labels)
    return {f"top1_k{k}": 100.0 * float((p == y).mean()) for k, p in preds.items()}

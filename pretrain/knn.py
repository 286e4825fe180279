"""Weighted k-nearest-neighbour voting on frozen features (the kNN protocol of Wu et al. 2018,
as used by the IMSVD paper's Table II; docs/PROTOCOLS.md section 3.1).

Features are L2-normalised; each query votes over its k most cosine-similar bank samples with
weights exp(sim / T), T = 0.07. The weights are computed as exp((sim - sim_max) / T) with
sim_max the query's best similarity: the same vote scaled by a positive constant per query (so
the same prediction), without the float32 overflow of exp(sim / T) for T below about 0.0113.
This is the one implementation: the offline evaluation (``transfer.eval.knn``) and the online
probe of pretraining (``pretrain.probe``) both call it.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["knn_classify", "knn_accuracy", "check_temperature"]


def check_temperature(temperature: float, key: str = "temperature") -> float:
    """``temperature`` as a float when it is a finite number > 0.

    Args:
        temperature: the vote temperature.
        key: the config key named in the error (e.g. ``knn.temperature``).

    Returns:
        The temperature as a float.

    Raises:
        ValueError: not a number, NaN, infinite or <= 0 (naming ``key`` and the value).
    """
    try:
        t = float(temperature)
    except (TypeError, ValueError):
        raise ValueError(f"kNN {key} must be a number, got {temperature!r}") from None
    if not math.isfinite(t) or t <= 0:
        raise ValueError(f"kNN {key} must be a finite number > 0, got {temperature!r}")
    return t


def knn_classify(
    train_feats: np.ndarray | torch.Tensor,
    train_labels: np.ndarray | torch.Tensor,
    test_feats: np.ndarray | torch.Tensor,
    ks: Sequence[int] = (20, 200),
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
    device: str | torch.device = "cpu",
) -> dict:
    """Weighted cosine k-NN predictions.

    Args:
        train_feats: (N, D) bank features (normalised here).
        train_labels: (N,) integer labels.
        test_feats: (M, D) query features.
        ks: neighbour counts (each capped at N).
        temperature: vote weight exp(sim / temperature); finite and > 0.
        num_classes: label count (default: max label + 1).
        chunk_size: query rows per similarity block (bounds memory to chunk_size x N).
        device: where the similarity products run.

    Returns:
        {k: (M,) int64 numpy predictions} for each k in ks.

    Raises:
        ValueError: temperature not finite or <= 0, non-positive k or chunk_size, mismatched
            shapes, empty bank, non-finite features.
    """
    temperature = check_temperature(temperature)
    if int(chunk_size) <= 0:
        raise ValueError(f"kNN chunk_size must be a positive integer, got {chunk_size!r}")
    bank = F.normalize(torch.as_tensor(train_feats, dtype=torch.float32, device=device), dim=1)
    labels = torch.as_tensor(train_labels, dtype=torch.long, device=device)
    queries = torch.as_tensor(test_feats, dtype=torch.float32)
    if bank.ndim != 2 or queries.ndim != 2 or bank.shape[1] != queries.shape[1]:
        raise ValueError(f"kNN: bank {tuple(bank.shape)} and queries {tuple(queries.shape)} differ")
    if labels.shape[0] != bank.shape[0] or bank.shape[0] == 0:
        raise ValueError(f"kNN: {bank.shape[0]} bank rows but {labels.shape[0]} labels")
    if not ks or any(int(k) <= 0 for k in ks):
        raise ValueError(f"kNN: ks must be positive integers, got {list(ks)}")
    for name, feats in (("bank", bank), ("query", queries)):
        if not bool(torch.isfinite(feats).all()):
            raise ValueError(f"kNN: the {name} features contain NaN or infinite values")
    n_cls = int(num_classes) if num_classes else int(labels.max()) + 1
    kmax = min(max(int(k) for k in ks), bank.shape[0])
    preds: dict[int, list[torch.Tensor]] = {int(k): [] for k in ks}
    for start in range(0, queries.shape[0], int(chunk_size)):
        q = F.normalize(queries[start : start + int(chunk_size)].to(device), dim=1)
        sim, idx = (q @ bank.T).topk(kmax, dim=1)  # sorted, descending
        # exp(sim / T) / exp(sim_max / T): each query's votes scaled by one positive constant,
        # the largest weight exactly 1 (no overflow whatever T)
        # (float64 for the division: no 0 / 0 even for a T below float32's range)
        weight = ((sim.double() - sim[:, :1].double()) / temperature).exp().float()
        onehot = F.one_hot(labels[idx], n_cls).to(weight.dtype)  # (m, kmax, C)
        for k in preds:
            kk = min(k, kmax)
            votes = (onehot[:, :kk] * weight[:, :kk, None]).sum(1)
            preds[k].append(votes.argmax(1).cpu())
    return {k: torch.cat(v).numpy() if v else np.zeros(0, np.int64) for k, v in preds.items()}


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

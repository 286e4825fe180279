"""The ``knn`` part of :mod:`gpu_check` (see its docstring): :func:`knn_classify` on a synthetic
ImageNet-sized bank, its seconds and peak memory, and its predictions against a plain float64
weighted vote."""

from __future__ import annotations

import gc
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_check_common, also when imported
from gpu_check_common import (  # noqa: E402  (benchmarks/)
    KNN_EXTRA_LIMIT,
    KNN_KS,
    KNN_NOISE,
    KNN_TEMPERATURE,
    ROOT,
    Sizes,
    _error,
    _sync,
)

sys.path.insert(0, str(ROOT))
from pretrain.probe.knn import knn_classify  # noqa: E402


def class_rows(centres: torch.Tensor, n: int, generator: torch.Generator, block: int = 65536):
    """``n`` rows around random ones of ``centres`` (C, D): ((n, D) float32, (n,) int64 labels),
    made in place block by block (noise std :data:`KNN_NOISE`) on the centres' device."""
    labels = torch.randint(0, centres.shape[0], (n,), generator=generator, device=centres.device)
    rows = torch.empty(n, centres.shape[1], device=centres.device)
    for lo in range(0, n, block):
        part = rows[lo : lo + block]
        part.normal_(0.0, KNN_NOISE, generator=generator).add_(centres[labels[lo : lo + block]])
    return rows, labels


def plain_knn(bank, labels, queries, ks, temperature, num_classes, chunk: int = 128) -> dict:
    """Predictions of the plain weighted kNN in float64: cosine similarity of each query to
    every bank row, the k largest, class votes sum exp(sim / T); ``chunk`` queries at a time.

    Args:
        bank: (N, D) features; labels: (N,) int64; queries: (M, D); ks: neighbour counts.

    Returns:
        {k: (M,) int64 numpy predictions}.
    """
    preds: dict[int, list] = {k: [] for k in ks}
    for lo in range(0, queries.shape[0], chunk):
        q = F.normalize(queries[lo : lo + chunk].double(), dim=1)
        sim = torch.cat([q @ F.normalize(b.double(), dim=1).T for b in bank.split(65536)], dim=1)
        top, idx = sim.topk(min(max(ks), bank.shape[0]), dim=1)
        weight = torch.exp(top / temperature)
        for k in ks:
            votes = weight.new_zeros(q.shape[0], num_classes)
            votes.scatter_add_(1, labels[idx[:, :k]], weight[:, :k])
            preds[k].append(votes.argmax(1).cpu())
    return {k: torch.cat(v).numpy() for k, v in preds.items()}


def _peak_memory(device: torch.device, bank_bytes: int) -> dict:
    """The peak allocated device bytes since the reset and the check peak <= bank + 2 GiB."""
    if device.type != "cuda":
        return {
            "peak_bytes": None,
            "peak_within_limit": None,
            "peak_note": "CPU: torch.cuda.max_memory_allocated does not apply",
        }
    peak = torch.cuda.max_memory_allocated(device)
    return {
        "peak_bytes": peak,
        "peak_minus_bank_bytes": peak - bank_bytes,
        "limit_bytes": bank_bytes + KNN_EXTRA_LIMIT,
        "peak_within_limit": peak <= bank_bytes + KNN_EXTRA_LIMIT,
    }


def _reference_check(bank, labels, queries, preds: dict, sizes: Sizes) -> dict:
    """The first ``sizes.knn_check_queries`` predictions against :func:`plain_knn`; run after the
    measurement, so that its failure (an error entry) leaves the figures."""
    n = sizes.knn_check_queries
    try:
        ref = plain_knn(bank, labels, queries[:n], KNN_KS, KNN_TEMPERATURE, sizes.knn_classes)
    except Exception as exc:  # noqa: BLE001
        return {"queries": n, "equal": None, **_error(exc)}
    differing = {str(k): int((preds[k][:n] != ref[k]).sum()) for k in KNN_KS}
    return {"queries": n, "differing": differing, "equal": not any(differing.values())}


def knn_part(sizes: Sizes, device: torch.device) -> dict:
    """Part 2: seconds and peak device memory of the kNN on a synthetic bank (module docstring)."""
    t_part = time.perf_counter()
    gc.collect()  # what the previous part left would count in the peak
    if device.type == "cuda":
        torch.cuda.empty_cache()
    g = torch.Generator(device=device).manual_seed(0)
    centres = torch.randn(sizes.knn_classes, sizes.knn_dim, generator=g, device=device)
    bank, labels = class_rows(centres, sizes.knn_rows, g)
    queries, qlabels = class_rows(centres, sizes.knn_queries, g)
    del centres
    _sync(device)
    res: dict[str, Any] = {
        "status": "ok",
        "device": str(device),
        "bank_rows": sizes.knn_rows,
        "dim": sizes.knn_dim,
        "queries": sizes.knn_queries,
        "classes": sizes.knn_classes,
        "ks": list(KNN_KS),
        "temperature": KNN_TEMPERATURE,
        "knn_classify_kwargs": dict(sizes.knn_kwargs),
        "generate_seconds": time.perf_counter() - t_part,
        "bank_bytes": bank.numel() * bank.element_size(),
    }
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        res["allocated_before_bytes"] = torch.cuda.memory_allocated(device)
    t0 = time.perf_counter()
    preds = knn_classify(
        bank,
        labels,
        queries,
        ks=KNN_KS,
        temperature=KNN_TEMPERATURE,
        num_classes=sizes.knn_classes,
        device=device,
        **sizes.knn_kwargs,
    )
    _sync(device)
    res["seconds"] = time.perf_counter() - t0
    res.update(_peak_memory(device, res["bank_bytes"]))
    y = qlabels.cpu().numpy()
    res["top1"] = {str(k): float((p == y).mean() * 100) for k, p in preds.items()}
    res["reference_check"] = _reference_check(bank, labels, queries, preds, sizes)
    del bank, labels, queries, qlabels, preds
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    res["part_seconds"] = time.perf_counter() - t_part
    return res

#!/usr/bin/env python3
"""One GPU check in under 10 minutes: training images/s, the sharded kNN at ImageNet scale and
the three methods on Fashion-MNIST; figures written as JSON and a markdown table.

Meant for one run on a machine with one CUDA GPU. The parts run one after the other inside the
total budget ``--budget-s`` (default 540 s). Each part has its own wall-time guard: a part that
would not fit in what is left is skipped with the reason recorded, and a part that fails is
recorded as an error entry (the next part still runs), so one run gives as many figures as it
can. Output: ``OUT/gpu_check.json`` and ``OUT/gpu_check.md``, both printed at the end.

1. ``train``: images/s (two-view samples per second; one sample = two 3 x S x S views) of
   (a) a loop with the reference code's structure (github.com/niuchuangnn/IMSVD, ``imsvd.py``:
   SyncBatchNorm, DDP around a module that returns the loss of both views, fp16 autocast +
   GradScaler, LARS with biases and norm parameters excluded from weight decay and adaptation,
   ``cudnn.benchmark = True``), built from this project's model, loss and LARS
   (:class:`ReferenceLoop`); (b) this project's trainer, fp16 (``train.precision=fp16``,
   contiguous memory, as the recipe says for the reference); (c) the trainer with bf16 and
   channels_last. Same batch (64 per step), same synthetic inputs already on the device, same
   initial weights and learning-rate schedule; ResNet-50, 224 px, projector 8192-8160, B = 80.
   Warm-up steps, then rounds of timed steps interleaved over the three; the median round.
   The trainer's timed step is ``Trainer.set_lr()`` + ``Trainer.run_step(batch)`` of a
   :class:`pretrain.engine.trainer.Trainer` built from the resolved recipe ``imsvd_r50_100ep`` (with
   ``data.kind=synthetic``, ``data.pipeline=pil``): it includes the batch-size exchange, the
   loader's ``prepare`` (for tensors already on the device in the trainer's memory format a
   no-op), both forwards under the recipe's autocast, the loss, the per-step non-finite / stop
   all-reduce with its host read, and the GradScaler backward / step / update. It does not
   include data loading or augmentation (the loader is built, never iterated, so the fast
   pipeline's device colour stage does not run), nor the hooks (metrics and code monitors at
   log steps, probe, checkpoints). With one process the trainer trains the bare model (no DDP
   wrapper, no SyncBatchNorm), as it does on one GPU, while the reference-structure loop wraps
   DDP and SyncBatchNorm around a world of 1 (at world size 1 SyncBatchNorm computes plain
   batch statistics; DDP still all-reduces the gradients). Before timing, both loops run one
   fp32 step from the same weights on the same batch (cuDNN deterministic, TF32 off) and the
   two losses before the update are recorded: they must agree within 1e-5 relative, which is
   what makes the comparison one of the same computation.
2. ``knn``: :func:`pretrain.probe.knn.knn_classify` (one process, bank on the GPU, its default query
   chunk and bank block) on a synthetic 1,281,167 x 2048 float32 bank (1,000 class centres plus
   noise, generated on the device block by block from fixed seeds) with 10,000 queries, k = 20
   and 200: seconds, ``torch.cuda.max_memory_allocated`` (bytes; bank, labels and queries
   included) next to the bank's bytes, with the check peak <= bank bytes + 2 GiB; and the
   predictions of the first 1,000 queries against a plain float64 computation (cosine to every
   row, the k largest, vote sum exp(sim / T) per class).
3. ``methods``: ``benchmarks/gpu_methods.py`` (IMSVD, VICReg, Barlow Twins on Fashion-MNIST) as
   a subprocess for ``--methods-epochs`` epochs (default 8: about 4 minutes by that script's
   own estimate of 30 epochs of the three in about 10 minutes), killed when the budget runs
   out; its ``results.json`` is included. Needs ``--data-dir`` with the four Fashion-MNIST idx
   .gz files; without it the part is recorded as "skipped: no data dir".

``--dry`` runs everything on the CPU at toy sizes in well under a minute (ResNet-18 with the
small_s2 stem, 32 px, batch 8, projector 64-80, B = 10, one warm-up and 2 timed steps; a
4096 x 64 bank with 256 queries, every prediction checked against the plain computation; and
``gpu_methods.py --dry-run --batch-size 32`` when the data dir exists), so the whole script is
exercised without a GPU. (The stride-1 small stem would cost ~15 s per fp16 step on a CPU.)

    python benchmarks/gpu_check.py [--out benchmarks/results/gpu_check] [--data-dir DIR]
        [--methods-epochs 8] [--budget-s 540]
    python benchmarks/gpu_check.py --dry --out /tmp/gpu_check

Exit status: 0 when every part ran or was skipped and every check passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_check_train, also when imported

from gpu_check_train import (  # noqa: E402  (benchmarks/)
    DEFAULT_OUT,
    DRY_SIZES,
    GIB,
    GPU_SIZES,
    KNN_EXTRA_LIMIT,
    KNN_KS,
    KNN_NOISE,
    KNN_TEMPERATURE,
    Budget,
    Sizes,
    _error,
    _sync,
    methods_need_s,
    train_part,
)

from pretrain.data.fashion_mnist import is_complete  # noqa: E402
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
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        res.update(
            peak_bytes=peak,
            peak_minus_bank_bytes=peak - res["bank_bytes"],
            limit_bytes=res["bank_bytes"] + KNN_EXTRA_LIMIT,
            peak_within_limit=peak <= res["bank_bytes"] + KNN_EXTRA_LIMIT,
        )
    else:
        res.update(
            peak_bytes=None,
            peak_within_limit=None,
            peak_note="CPU: torch.cuda.max_memory_allocated does not apply",
        )
    y = qlabels.cpu().numpy()
    res["top1"] = {str(k): float((p == y).mean() * 100) for k, p in preds.items()}
    n = sizes.knn_check_queries
    try:  # after the measurement: its failure leaves the figures above
        ref = plain_knn(bank, labels, queries[:n], KNN_KS, KNN_TEMPERATURE, sizes.knn_classes)
        differing = {str(k): int((preds[k][:n] != ref[k]).sum()) for k in KNN_KS}
        res["reference_check"] = {
            "queries": n,
            "differing": differing,
            "equal": not any(differing.values()),
        }
    except Exception as exc:  # noqa: BLE001
        res["reference_check"] = {"queries": n, "equal": None, **_error(exc)}
    del bank, labels, queries, qlabels, preds
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    res["part_seconds"] = time.perf_counter() - t_part
    return res


# --------------------------------------------------------------------- part 3: the methods
def methods_part(data_dir: str | None, out: Path, epochs: int, dry: bool, timeout_s: float) -> dict:
    """Part 3: ``gpu_methods.py`` as a subprocess (its process group is killed at ``timeout_s``).

    Returns:
        {"status", "seconds", "exit", "results" (its results.json)} or a skipped / error entry.
    """
    if not data_dir:
        return {"status": "skipped", "reason": "skipped: no data dir (--data-dir not given)"}
    if not is_complete(Path(data_dir)):
        return {
            "status": "skipped",
            "reason": f"skipped: no data dir ({data_dir} lacks the Fashion-MNIST idx .gz files)",
        }
    run = out / "gpu_methods"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "gpu_methods.py"),
        "--data-dir",
        str(data_dir),
        "--out",
        str(run),
        "--epochs",
        str(epochs),
    ]
    if dry:
        cmd += ["--dry-run", "--batch-size", "32"]
    run.mkdir(parents=True, exist_ok=True)
    log = run / "gpu_methods.log"
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            rc = proc.wait(timeout=max(timeout_s, 1.0))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            return {
                "status": "error",
                "epochs": epochs,
                "log": str(log),
                "seconds": time.perf_counter() - t0,
                "error": f"killed after {timeout_s:.0f} s (the budget left)",
            }
    res: dict[str, Any] = {
        "status": "ok" if rc == 0 else "error",
        "epochs": epochs,
        "dry_run": dry,
        "exit": rc,
        "seconds": time.perf_counter() - t0,
        "log": str(log),
        "command": " ".join(cmd[1:]),
    }
    results = run / "results.json"
    if results.is_file():
        res["results"] = json.loads(results.read_text())
    if rc != 0:
        res["error"] = f"gpu_methods.py exited with {rc}; the end of its log: " + "".join(
            log.read_text(errors="replace").splitlines(keepends=True)[-15:]
        )
    return res


# ------------------------------------------------------------------------------- report
def _fmt(x: Any, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def markdown(report: dict) -> str:
    """The figures of ``report`` as a short markdown table."""
    rows = []
    parts = report["parts"]
    tr = parts.get("train", {})
    if tr.get("status") == "ok":
        s = tr["sizes"]
        what = f"{s['arch']}, {s['image_size']} px, batch {s['batch']}, projector {s['projector']}"
        for name, label in (
            ("reference_fp16", "reference-structure loop, fp16"),
            ("trainer_fp16", "trainer, fp16"),
            ("trainer_bf16_channels_last", "trainer, bf16 + channels_last"),
        ):
            v = tr["variants"][name]
            if v["status"] != "ok":
                rows.append(("train", f"{label} ({what})", v["error"]))
                continue
            ratio = tr.get(f"ratio_{name}_over_reference_fp16")
            extra = f" ({ratio:.2f}x the reference)" if ratio else ""
            rows.append(
                ("train", f"{label} ({what})", f"{_fmt(v['images_per_s'])} images/s{extra}")
            )
        chk = tr["fp32_first_step_loss"]
        if chk.get("status") == "error":
            rows.append(("train", "fp32 first-step loss", chk["error"]))
        else:
            rows.append(
                (
                    "train",
                    "fp32 first-step loss, reference / trainer",
                    f"{chk['reference']:.6f} / {chk['trainer']:.6f} (rel. diff "
                    f"{chk['rel_diff']:.1e}, {'match' if chk['match'] else 'DIFFER'})",
                )
            )
    kn = parts.get("knn", {})
    if kn.get("status") == "ok":
        what = f"{kn['bank_rows']:,} x {kn['dim']} bank, {kn['queries']:,} queries, k=20/200"
        mem = ""
        if kn["peak_bytes"] is not None:
            within = "within" if kn["peak_within_limit"] else "OVER"
            mem = (
                f", peak {kn['peak_bytes'] / GIB:.2f} GiB (bank {kn['bank_bytes'] / GIB:.2f} "
                f"GiB, {within} bank + 2 GiB)"
            )
        rows.append(("knn", what, f"{kn['seconds']:.2f} s{mem}"))
        chk = kn["reference_check"]
        rows.append(
            (
                "knn",
                f"predictions vs plain float64 ({chk['queries']} queries)",
                chk.get("error") or ("equal" if chk["equal"] else f"differing {chk['differing']}"),
            )
        )
    me = parts.get("methods", {})
    if me.get("status") == "ok":
        length = "--dry-run (3 steps)" if me["dry_run"] else f"{me['epochs']} epochs"
        for name, r in me.get("results", {}).items():
            knn = ", ".join(f"{k} {v:.2f}" for k, v in r.get("test_knn", {}).items())
            rows.append(
                (
                    "methods",
                    f"{name}, {length}",
                    f"exit {r['exit']}, {r['seconds']} s{', ' + knn if knn else ''}",
                )
            )
    for name, p in parts.items():
        if p.get("status") in ("skipped", "error") and not (name == "train" and "variants" in p):
            rows.append((name, p["status"], p.get("reason") or p.get("error", "")))
    lines = [
        f"GPU check ({report['mode']}, {report['device_name']}, torch {report['torch']}, "
        f"{report['total_seconds']:.0f} s)",
        "",
        "| part | figure | value |",
        "|---|---|---|",
    ]
    lines += [f"| {a} | {b} | {str(c).replace('|', '/').splitlines()[0]} |" for a, b, c in rows]
    return "\n".join(lines) + "\n"


def checks(parts: dict) -> dict:
    """The pass / fail checks of the run (None: not measured)."""
    tr, kn = parts.get("train", {}), parts.get("knn", {})
    return {
        "fp32_first_step_loss_match": tr.get("fp32_first_step_loss", {}).get("match"),
        "knn_predictions_equal_reference": kn.get("reference_check", {}).get("equal"),
        "knn_peak_within_bank_plus_2GiB": kn.get("peak_within_limit"),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(DEFAULT_OUT), help="folder of gpu_check.json / .md")
    p.add_argument("--dry", action="store_true", help="CPU, toy sizes (< 60 s)")
    p.add_argument("--budget-s", type=float, default=540.0, help="total wall-time budget (s)")
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST idx .gz folder (part 3)")
    p.add_argument("--methods-epochs", type=int, default=8, help="gpu_methods.py --epochs")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    budget = Budget(args.budget_s)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sizes = DRY_SIZES if args.dry else GPU_SIZES
    device = torch.device("cpu") if args.dry else torch.device("cuda", 0)
    report: dict[str, Any] = {
        "script": "benchmarks/gpu_check.py",
        "mode": "dry" if args.dry else "gpu",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "budget_s": args.budget_s,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "device_name": platform.processor() or platform.machine(),
        "parts": {},
    }
    parts = report["parts"]
    no_cuda = not args.dry and not torch.cuda.is_available()
    if no_cuda:
        report["error"] = "no CUDA device (run with --dry for the CPU check)"
    else:
        if device.type == "cuda":
            report["device_name"] = torch.cuda.get_device_name(device)
    plan = [
        ("train", sizes.train_s, lambda: train_part(sizes, device, budget)),
        ("knn", sizes.knn_s, lambda: knn_part(sizes, device)),
        (
            "methods",
            methods_need_s(args.methods_epochs, args.dry),
            lambda: methods_part(
                args.data_dir, out, args.methods_epochs, args.dry, budget.left() - 5.0
            ),
        ),
    ]
    for name, need, run in plan:
        if no_cuda:
            parts[name] = {"status": "error", "error": report["error"]}
            continue
        left = budget.left()
        if left < need and not (name == "train" and left > 0):
            parts[name] = {
                "status": "skipped",
                "reason": f"budget: {left:.0f} s left of {args.budget_s:.0f} s, the "
                f"part needs about {need:.0f} s",
            }
            continue
        print(f"[gpu_check] {name} ({left:.0f} s of the budget left)", flush=True)
        t0 = time.perf_counter()
        try:
            parts[name] = run()
        except Exception as exc:  # noqa: BLE001 - recorded; the next part runs
            parts[name] = _error(exc)
        parts[name].setdefault("seconds", time.perf_counter() - t0)
        took = time.perf_counter() - t0
        print(f"[gpu_check] {name}: {parts[name]['status']} in {took:.1f} s", flush=True)
    report["checks"] = checks(parts)
    report["total_seconds"] = budget.elapsed()
    text = json.dumps(report, indent=1, default=str)
    (out / "gpu_check.json").write_text(text + "\n")
    table = markdown(report)
    (out / "gpu_check.md").write_text(table)
    print(text)
    print(table)
    failed = any(p.get("status") == "error" for p in parts.values()) or any(
        c is False for c in report["checks"].values()
    )
    return 1 if failed or no_cuda else 0


if __name__ == "__main__":
    sys.exit(main())

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

sys.path.insert(0, str(Path(__file__).resolve().parent))  # its parts, also when imported
from gpu_check_common import (  # noqa: E402  (benchmarks/)
    DEFAULT_OUT,
    DRY_SIZES,
    GIB,
    GPU_SIZES,
    ROOT,
    Budget,
    _error,
    methods_need_s,
)
from gpu_check_knn import knn_part  # noqa: E402
from gpu_check_train import train_part  # noqa: E402

sys.path.insert(0, str(ROOT))
from pretrain.data.fashion_mnist import is_complete  # noqa: E402


# --------------------------------------------------------------------- part 3: the methods
def _run_or_kill(cmd: list[str], log: Path, timeout_s: float) -> int | None:
    """Run ``cmd`` in its own process group with its output in ``log``; its exit code, or None
    when it was still running at ``timeout_s`` (its group is then sent SIGTERM, SIGKILL 30 s
    later)."""
    with open(log, "w") as f:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            return proc.wait(timeout=max(timeout_s, 1.0))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            return None


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
    rc = _run_or_kill(cmd, log, timeout_s)
    if rc is None:
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


def _train_rows(tr: dict) -> list[tuple]:
    """The train part's rows: images/s of each variant and the fp32 first-step check."""
    rows: list[tuple] = []
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
        rows.append(("train", f"{label} ({what})", f"{_fmt(v['images_per_s'])} images/s{extra}"))
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
    return rows


def _knn_rows(kn: dict) -> list[tuple]:
    """The knn part's rows: seconds and peak memory, the check against the plain vote."""
    what = f"{kn['bank_rows']:,} x {kn['dim']} bank, {kn['queries']:,} queries, k=20/200"
    mem = ""
    if kn["peak_bytes"] is not None:
        within = "within" if kn["peak_within_limit"] else "OVER"
        mem = (
            f", peak {kn['peak_bytes'] / GIB:.2f} GiB (bank {kn['bank_bytes'] / GIB:.2f} "
            f"GiB, {within} bank + 2 GiB)"
        )
    chk = kn["reference_check"]
    return [
        ("knn", what, f"{kn['seconds']:.2f} s{mem}"),
        (
            "knn",
            f"predictions vs plain float64 ({chk['queries']} queries)",
            chk.get("error") or ("equal" if chk["equal"] else f"differing {chk['differing']}"),
        ),
    ]


def _methods_rows(me: dict) -> list[tuple]:
    """The methods part's rows: each method's exit, seconds and test kNN."""
    rows = []
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
    return rows


def markdown(report: dict) -> str:
    """The figures of ``report`` as a short markdown table."""
    rows = []
    parts = report["parts"]
    for name, make_rows in (("train", _train_rows), ("knn", _knn_rows), ("methods", _methods_rows)):
        if parts.get(name, {}).get("status") == "ok":
            rows += make_rows(parts[name])
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(DEFAULT_OUT), help="folder of gpu_check.json / .md")
    p.add_argument("--dry", action="store_true", help="CPU, toy sizes (< 60 s)")
    p.add_argument("--budget-s", type=float, default=540.0, help="total wall-time budget (s)")
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST idx .gz folder (part 3)")
    p.add_argument("--methods-epochs", type=int, default=8, help="gpu_methods.py --epochs")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    return p.parse_args(argv)


def run_parts(plan: list, parts: dict, budget: Budget, no_cuda: str | None) -> None:
    """Run each ``(name, seconds needed, run)`` of ``plan`` that fits in what is left of
    ``budget`` into ``parts[name]``; a part that does not fit is skipped, a part that raises is
    an error entry, and ``no_cuda`` (the reason) makes every part an error entry."""
    for name, need, run in plan:
        if no_cuda:
            parts[name] = {"status": "error", "error": no_cuda}
            continue
        left = budget.left()
        if left < need and not (name == "train" and left > 0):
            parts[name] = {
                "status": "skipped",
                "reason": f"budget: {left:.0f} s left of {budget.total_s:.0f} s, the "
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
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
    elif device.type == "cuda":
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
    run_parts(plan, parts, budget, report.get("error"))
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

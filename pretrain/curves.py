"""Learning curves of pretraining runs, drawn from their ``metrics.jsonl``.

    python -m pretrain.curves RUN_DIR [RUN_DIR ...] --out curves.png \
        [--labels IMSVD VICReg] [--ref "raw pixels=83.1" --ref "random init=78.2"] \
        [--x step|seconds] [--format png|pdf|svg] [--dpi 200]

The figure has the online kNN probe's top-1 (``knn/top1_k<k>``) against the training step (or
training seconds, probes excluded) for every run, with dashed horizontal reference lines, and
below it one panel per run with its loss terms (``loss_*``: TI / DE / OE for IMSVD, invariance /
variance / covariance for VICReg, on- / off-diagonal for Barlow Twins) against the step.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Sequence

from pretrain.errors import IMSVDError

__all__ = ["read_metrics", "plot_curves", "main"]

FORMATS = ("png", "pdf", "svg")


class CurvesError(IMSVDError, ValueError):
    """A run folder or metrics file cannot be used."""


def read_metrics(path: str | Path) -> list[dict]:
    """Rows of a run's ``metrics.jsonl`` (a run folder or the file itself), in file order.

    Raises:
        CurvesError: missing file, or a line that is not a JSON object (names file and line).
    """
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.jsonl"
    if not p.is_file():
        raise CurvesError(f"{p}: no such metrics file (a pretraining output folder has one)")
    rows = []
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise CurvesError(f"{p}, line {i}: not JSON ({e.msg})") from None
        if not isinstance(row, dict) or "step" not in row:
            raise CurvesError(f"{p}, line {i}: expected an object with a 'step' key")
        rows.append(row)
    return rows


def _series(rows: Sequence[dict], key: str, x: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and math.isfinite(v):
            xv = r.get("step") if x == "step" else r.get("train_seconds")
            if isinstance(xv, (int, float)):
                xs.append(float(xv) if x == "step" else float(xv) / 60.0)
                ys.append(float(v))
    return xs, ys


def _knn_key(rows: Sequence[dict]) -> str | None:
    keys = sorted({k for r in rows for k in r if k.startswith("knn/top1_k")})
    if not keys:
        return None
    return "knn/top1_k20" if "knn/top1_k20" in keys else keys[0]


def plot_curves(
    runs: Sequence[str | Path],
    out: str | Path,
    labels: Sequence[str] | None = None,
    refs: Sequence[tuple[str, float]] = (),
    x: str = "step",
    dpi: int = 200,
    title: str | None = None,
) -> Path:
    """Draw the kNN and loss curves of ``runs`` into ``out`` (format from its suffix).

    Args:
        runs: run folders (or metrics.jsonl files).
        out: output figure path (.png, .pdf or .svg).
        labels: legend names (default: the folder names).
        refs: (label, top-1 percent) horizontal reference lines.
        x: "step" or "seconds" (training minutes, probes excluded) for the kNN panel.
        dpi: raster resolution.
        title: figure title.

    Returns:
        The written path.

    Raises:
        CurvesError: unreadable runs, no probe rows in any run, bad arguments.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    if out.suffix.lstrip(".") not in FORMATS:
        raise CurvesError(f"output {out}: suffix must be one of {', '.join(FORMATS)}")
    if x not in ("step", "seconds"):
        raise CurvesError(f"--x must be 'step' or 'seconds', got {x!r}")
    names = (
        list(labels)
        if labels
        else [Path(r).name if Path(r).is_dir() else Path(r).parent.name for r in runs]
    )
    if len(names) != len(runs):
        raise CurvesError(f"{len(names)} labels for {len(runs)} runs")
    data = [read_metrics(r) for r in runs]
    if not any(_knn_key(rows) for rows in data):
        raise CurvesError("no run has kNN probe rows (set eval.every_steps > 0 when pretraining)")

    n = len(runs)
    fig = plt.figure(figsize=(max(7.0, 3.2 * n), 7.2), constrained_layout=True)
    grid = fig.add_gridspec(2, n, height_ratios=[1.4, 1.0])
    colours = plt.get_cmap("tab10")
    _knn_panel(fig.add_subplot(grid[0, :]), names, data, refs, x, title, colours)
    for i, (name, rows) in enumerate(zip(names, data)):
        _loss_panel(fig.add_subplot(grid[1, i]), name, rows, colours)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out


def _knn_panel(ax, names, data, refs, x: str, title: str | None, colours) -> None:
    """The kNN top-1 curve of every run with a probe, and the reference lines."""
    for i, (name, rows) in enumerate(zip(names, data)):
        key = _knn_key(rows)
        if key is None:
            continue
        xs, ys = _series(rows, key, x)
        ax.plot(xs, ys, marker="o", ms=3.5, lw=1.8, color=colours(i), label=f"{name}")
    for j, (name, value) in enumerate(refs):
        ax.axhline(value, ls="--", lw=1.2, color=str(0.25 + 0.2 * (j % 3)), label=name)
    ax.set_xlabel("training step" if x == "step" else "training time (min, probes excluded)")
    ax.set_ylabel("kNN top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=9, frameon=True)
    ax.set_title(title or "Online kNN probe (weighted, cosine, T = 0.07)", fontsize=11)


def _loss_panel(ax, name: str, rows, colours) -> None:
    """One run's loss terms against the training step."""
    terms = sorted({k for r in rows for k in r if k.startswith("loss_")})
    for t, term in enumerate(terms):
        xs, ys = _series(rows, term, "step")
        marker = "." if len(xs) < 20 else None
        ax.plot(xs, ys, lw=1.4, marker=marker, color=colours(t), label=term[5:])
    ax.set_title(f"{name}: loss terms", fontsize=10)
    ax.set_xlabel("training step")
    ax.grid(alpha=0.3)
    if terms:
        ax.legend(fontsize=8)


def _ref(text: str) -> tuple[str, float]:
    name, sep, value = text.rpartition("=")
    try:
        if not sep or not name:
            raise ValueError
        return name, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--ref {text!r} must look like 'raw pixels=83.1'"
        ) from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="pretraining output folders (or metrics.jsonl files)")
    p.add_argument("--out", required=True, help="figure path; --format sets its suffix")
    p.add_argument("--labels", nargs="*", help="legend names, one per run")
    p.add_argument("--ref", action="append", type=_ref, default=[], help="'label=top1' line")
    p.add_argument("--x", default="step", choices=("step", "seconds"))
    p.add_argument("--format", choices=FORMATS, help="output format (default: from --out)")
    p.add_argument("--dpi", type=int, default=200)
    p.add_argument("--title")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.format:
        out = out.with_suffix("." + args.format)
    try:
        path = plot_curves(args.runs, out, args.labels, args.ref, args.x, args.dpi, args.title)
    except IMSVDError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Rank-aware logging, JSON-lines metrics (+ TensorBoard), meters, progress bars, tables."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

LOGGER_NAME = "imsvd"


def setup_logging(
    output_dir: str | os.PathLike | None = None, rank: int = 0, name: str = LOGGER_NAME
) -> logging.Logger:
    """Configure the project logger: rank 0 prints INFO to stdout; every rank logs to a file.

    Args:
        output_dir: folder for ``log.txt`` (rank 0) / ``log_rank{r}.txt`` (others); None: no file.
        rank: this process's global rank.
        name: logger name.

    Returns:
        The configured logger.
    """
    logger = logging.getLogger(name)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    fmt = logging.Formatter("[%(asctime)s %(levelname)s] %(message)s", datefmt="%H:%M:%S")
    if rank == 0:
        sh = logging.StreamHandler(sys.stdout)
        sh.setFormatter(fmt)
        logger.addHandler(sh)
    if output_dir is not None:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        fname = "log.txt" if rank == 0 else f"log_rank{rank}.txt"
        fh = logging.FileHandler(Path(output_dir) / fname)
        fh.setFormatter(logging.Formatter(f"[%(asctime)s rank{rank} %(levelname)s] %(message)s"))
        logger.addHandler(fh)
    if not logger.handlers:
        logger.addHandler(logging.NullHandler())
    return logger


def get_logger(name: str = LOGGER_NAME) -> logging.Logger:
    """The project logger (configure it once with :func:`setup_logging`)."""
    return logging.getLogger(name)


def _jsonable(v: Any) -> Any:
    if hasattr(v, "item") and callable(v.item):
        try:
            v = v.item()
        except (ValueError, RuntimeError):
            v = v.tolist()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class MetricWriter:
    """Append one JSON object per log step to ``metrics.jsonl`` (rank 0 only), plus TensorBoard."""

    def __init__(
        self, output_dir: str | os.PathLike, rank: int = 0, tensorboard: bool = True
    ) -> None:
        self.enabled = rank == 0
        self.path = Path(output_dir) / "metrics.jsonl"
        self._tb = None
        if not self.enabled:
            return
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(Path(output_dir) / "tb"))
            except ImportError:  # tensorboard is optional at run time
                get_logger().warning("tensorboard not installed: metrics go to JSON lines only")

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Record ``metrics`` at global step ``step``."""
        if not self.enabled:
            return
        row = {"step": int(step)}
        row.update({k: _jsonable(v) for k, v in metrics.items()})
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


class AverageMeter:
    """Running average of a scalar."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sum = 0.0
        self.count = 0

    def update(self, value: float, n: int = 1) -> None:
        self.sum += float(value) * n
        self.count += n

    @property
    def avg(self) -> float:
        return self.sum / max(self.count, 1)


def progress(
    iterable: Iterable,
    total: int | None = None,
    desc: str = "",
    enabled: bool | None = None,
    rank: int = 0,
    initial: int = 0,
):
    """Wrap ``iterable`` in a tqdm bar when attached to a terminal on rank 0.

    Args:
        enabled: force on/off; None means "stdout is a TTY and rank == 0".
    """
    if enabled is None:
        enabled = rank == 0 and sys.stdout.isatty()
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, initial=initial, dynamic_ncols=True)


def write_json_atomic(obj: Any, path: str | os.PathLike) -> None:
    """Write JSON to ``path`` atomically (``pretrain.checkpoint.atomic_write``)."""
    from pretrain.checkpoint import atomic_write

    def write(f) -> None:
        json.dump(obj, f, indent=2, default=_jsonable)
        f.write("\n")

    atomic_write(path, write, mode="w")


def format_table(rows: Sequence[Mapping[str, Any]], title: str = "") -> str:
    """Render rows of dicts (same keys) as a fixed-width text table."""
    if not rows:
        return title
    cols = list(rows[0].keys())

    def fmt(v: Any) -> str:
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    cells = [[fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = "  ".join(c.ljust(w) for c, w in zip(cols, widths))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(([title] if title else []) + [line, sep] + body)


def print_table(rows: Sequence[Mapping[str, Any]], title: str = "") -> None:
    """Print :func:`format_table` to stdout."""
    print(format_table(rows, title), flush=True)

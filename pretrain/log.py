"""Rank-aware logging, JSON-lines metrics (+ TensorBoard, W&B), meters, tables.

The progress of a loop (a tqdm bar or periodic log lines) is :mod:`pretrain.progress`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import uuid
from pathlib import Path
from typing import Any, Mapping, Sequence

from pretrain.config import ConfigError
from pretrain.errors import IMSVDError
from pretrain.fileio import jsonable

LOGGER_NAME = "imsvd"


class _CurrentStdout(logging.StreamHandler):
    """A stream handler for whatever ``sys.stdout`` is when a record is written.

    ``sys.stdout`` may be replaced after the logger is set up (a notebook, a test harness that
    captures output, a wrapper script); a handler bound to the old object would write to a
    closed file and print logging's own traceback instead of the message.
    """

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:  # the base class assigns it; the live sys.stdout wins
        pass


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
        sh = _CurrentStdout()
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


WANDB_MODES = ("offline", "online", "disabled")


def wandb_options(cfg: Mapping[str, Any]) -> dict | None:
    """The Weights & Biases settings of a resolved pretraining config, or None when off.

    Args:
        cfg: the resolved config (keys ``log.wandb``, ``log.wandb_project``, ``log.wandb_mode``).

    Returns:
        ``{"project", "mode", "config"}`` for :class:`MetricWriter`, or None if ``log.wandb`` is
        false (or absent).
    """
    log_cfg = cfg.get("log", {})
    if not log_cfg.get("wandb", False):
        return None
    return {
        "project": log_cfg.get("wandb_project", "imsvd"),
        "mode": log_cfg.get("wandb_mode", "offline"),
        "config": dict(cfg),
    }


class MissingPackageError(IMSVDError, ImportError):
    """An optional package the config asks for (``log.wandb``: wandb) is not installed."""


def _import_wandb():
    try:
        import wandb
    except ImportError:
        raise MissingPackageError(
            "log.wandb is true but the 'wandb' package is not installed: install it with "
            "pip install 'imsvd[wandb]' (or pip install wandb), or set log.wandb=false"
        ) from None
    return wandb


class MetricWriter:
    """One JSON object per log step to ``metrics.jsonl`` (rank 0 only), plus TensorBoard and,
    optionally, Weights & Biases (the same rows).

    Args:
        output_dir: run folder (``metrics.jsonl``, ``tb/``, ``wandb/``).
        rank: global rank; only rank 0 writes.
        tensorboard: also write TensorBoard scalars (skipped with a warning when not installed).
        wandb: None (off) or the settings from :func:`wandb_options`: ``project``, ``mode``
            (``offline``: no network, upload later with ``wandb sync``; ``online``; ``disabled``)
            and ``config`` (recorded with the run). The run id is kept in
            ``OUTPUT_DIR/wandb_run_id.txt`` so that a resumed run continues the same W&B run.

    Raises:
        MissingPackageError: W&B requested and the ``wandb`` package is missing (an
            ImportError).
        ConfigError: unknown W&B mode (names ``log.wandb_mode``).
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        rank: int = 0,
        tensorboard: bool = True,
        wandb: Mapping[str, Any] | None = None,
    ) -> None:
        self.enabled = rank == 0
        self.path = Path(output_dir) / "metrics.jsonl"
        self._tb = None
        self._wandb = None
        if not self.enabled:
            return
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(Path(output_dir) / "tb"))
            except ImportError:  # tensorboard is optional at run time
                get_logger().warning("tensorboard not installed: metrics go to JSON lines only")
        if wandb is not None:
            self._wandb = self._start_wandb(Path(output_dir), wandb)

    @classmethod
    def from_config(
        cls, output_dir: str | os.PathLike, cfg: Mapping[str, Any], rank: int = 0
    ) -> "MetricWriter":
        """The writer a pretraining config asks for (``log.tensorboard``, ``log.wandb*``).

        Args:
            output_dir: run folder.
            cfg: the resolved pretraining config.
            rank: global rank.

        Returns:
            The writer.
        """
        log_cfg = cfg.get("log", {})
        return cls(
            output_dir,
            rank=rank,
            tensorboard=bool(log_cfg.get("tensorboard", True)),
            wandb=wandb_options(cfg),
        )

    @staticmethod
    def _start_wandb(output_dir: Path, options: Mapping[str, Any]):
        mode = options.get("mode", "offline")
        if mode not in WANDB_MODES:
            raise ConfigError(f"log.wandb_mode: {mode!r} is not one of {', '.join(WANDB_MODES)}")
        module = _import_wandb()
        id_file = output_dir / "wandb_run_id.txt"
        if id_file.is_file():
            run_id = id_file.read_text(encoding="utf-8").strip()
        else:
            run_id = uuid.uuid4().hex[:12]
            id_file.write_text(run_id + "\n", encoding="utf-8")
        run = module.init(
            project=options.get("project", "imsvd"),
            mode=mode,
            dir=str(output_dir),
            name=output_dir.name,
            id=run_id,
            resume="allow",
            config=dict(options.get("config") or {}),
        )
        get_logger().info(
            "Weights & Biases run %s (%s mode, project %s)",
            run_id,
            mode,
            options.get("project", "imsvd"),
        )
        return run

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Record ``metrics`` at global step ``step``."""
        if not self.enabled:
            return
        row = {"step": int(step)}
        row.update({k: jsonable(v) for k, v in metrics.items()})
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in row.items() if k != "step"}, step=int(step))

    def close(self) -> None:
        """Flush and close TensorBoard and the W&B run (idempotent)."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


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

"""The progress of a loop: a tqdm bar on a terminal, periodic log lines otherwise (nohup, SLURM).

The lines go through the project logger (:func:`pretrain.log.get_logger`).
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Iterable

from pretrain.log import get_logger


def _clock(seconds: float) -> str:
    """Seconds as ``mm:ss`` (``h:mm:ss`` from one hour)."""
    seconds = max(int(round(seconds)), 0)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class LogProgress:
    """Progress of a loop as periodic log lines, for runs without a terminal (nohup, SLURM).

    Logs ``desc: n/total (x%) rate it/s, ETA mm:ss`` through the project logger every
    ``interval`` seconds, at every further 10% of ``total`` and when the loop completes.
    Iterating counts an item when it is handed out, so a loop that requests the next item after
    each finished step (the pretraining loop) reports exactly the steps done.

    Args:
        iterable: the loop's items.
        total: number of items (default ``len(iterable)`` when it has one).
        desc: label at the start of each line.
        initial: items already done before this loop (a resumed run).
        interval: seconds between time-based lines.
        logger: where to log (default: the project logger).
        clock: time source in seconds (tests pass a fake one).
    """

    def __init__(
        self,
        iterable: Iterable | None = None,
        total: int | None = None,
        desc: str = "",
        initial: int = 0,
        interval: float = 30.0,
        logger: logging.Logger | None = None,
        clock=time.monotonic,
    ) -> None:
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.iterable = iterable
        self.total = total
        self.desc = desc
        self.n = initial
        self.interval = float(interval)
        self.logger = logger or get_logger()
        self._clock = clock
        self._start_n = initial
        self._t0 = clock()
        self._last_t = self._t0
        self._last_decile = self._decile(initial)
        self._logged_n = initial
        self._closed = False

    def _decile(self, n: int) -> int:
        return int(10 * n / self.total) if self.total else 0

    def __len__(self) -> int:
        return self.total if self.total is not None else len(self.iterable)

    def __iter__(self):
        if self.iterable is None:
            raise TypeError("LogProgress has no iterable to iterate over")
        for item in self.iterable:
            self.update(1)
            yield item
        self.close()

    def format(self) -> str:
        """The current progress line."""
        elapsed = self._clock() - self._t0
        done = self.n - self._start_n
        rate = done / elapsed if elapsed > 0 else 0.0
        head = f"{self.desc}: " if self.desc else ""
        if self.total:
            pct = 100.0 * self.n / self.total
            eta = _clock((self.total - self.n) / rate) if rate > 0 else "?"
            return f"{head}{self.n}/{self.total} ({pct:.0f}%) {rate:.2f} it/s, ETA {eta}"
        return f"{head}{self.n} {rate:.2f} it/s, elapsed {_clock(elapsed)}"

    def update(self, n: int = 1) -> None:
        """Count ``n`` more items; log when the interval has passed or a 10% mark is crossed."""
        self.n += n
        now = self._clock()
        decile = self._decile(self.n)
        finished = self.total is not None and self.n >= self.total
        if now - self._last_t >= self.interval or decile > self._last_decile or finished:
            self._emit(now)
            self._last_decile = decile

    def _emit(self, now: float) -> None:
        self.logger.info("%s", self.format())
        self._last_t = now
        self._logged_n = self.n

    def close(self) -> None:
        """Log the final count if it was not logged yet (loop stopped early)."""
        if self._closed:
            return
        self._closed = True
        if self.n != self._logged_n:
            self._emit(self._clock())


def progress(
    iterable: Iterable,
    total: int | None = None,
    desc: str = "",
    enabled: bool | None = None,
    rank: int = 0,
    initial: int = 0,
    interval: float = 30.0,
):
    """Show the progress of a loop: a tqdm bar on a terminal, periodic log lines otherwise.

    Args:
        iterable: the loop's items.
        total: number of items (default: ``len(iterable)``).
        desc: label.
        enabled: True forces the tqdm bar, False shows nothing; None (default) chooses on
            rank 0: a bar when stdout is a terminal, else :class:`LogProgress` lines; other ranks
            show nothing.
        rank: this process's global rank.
        initial: items already done (a resumed run).
        interval: seconds between log lines when there is no terminal.

    Returns:
        An iterable over the same items (with ``close()`` when it reports anything).
    """
    if enabled is None:
        if rank != 0:
            return iterable
        if not sys.stdout.isatty():
            return LogProgress(iterable, total=total, desc=desc, initial=initial, interval=interval)
        enabled = True
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, initial=initial, dynamic_ncols=True)

"""Process-level pieces every training loop of the toolkit shares: mixed precision and
preemption signals (the pretraining engine and the supervised-head trainer use them alike)."""

from __future__ import annotations

import contextlib
import signal
from typing import Any

import torch

__all__ = ["PRECISIONS", "autocast", "grad_scaler", "StopRequest"]

# train.precision values: the autocast dtype (None: full fp32, no autocast)
PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def autocast(device: torch.device, precision: str):
    """The autocast context of ``precision`` (one of :data:`PRECISIONS`) on ``device``.

    Raises:
        KeyError: an unknown precision (the configs' schema and checks name the key first).
    """
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """A GradScaler, enabled for fp16 only (bf16 and fp32 need no loss scaling)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


class StopRequest:
    """Remembers SIGTERM / SIGUSR1 (preemption) so a loop can checkpoint and exit cleanly.

    ``install()`` replaces the handlers (not possible outside the main thread: then nothing is
    installed), ``restore()`` puts the previous ones back; ``signum`` is the signal received, or
    None.
    """

    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for name in self.SIGNALS:
            sig = getattr(signal, name, None)
            if sig is None:
                continue
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. embedded use): no preemption handling
                pass

    def _handle(self, signum, frame) -> None:  # noqa: ARG002 - signal API
        self.signum = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

"""An evaluation's weights input: the checks of ``model.weights`` / ``model.stem`` before the
output folder is made (each tool's ``validate`` calls :func:`check_weights`), and what the log
says after the weights were read (:func:`log_weights_notes`)."""

from __future__ import annotations

import logging
from pathlib import Path

from pretrain.checkpoint import STEM_ASSUMED
from pretrain.config import ConfigError
from pretrain.log import LOGGER_NAME
from pretrain.models.resnet import STEMS

__all__ = ["check_weights", "log_weights_notes"]

logger = logging.getLogger(LOGGER_NAME + ".eval")


def check_weights(cfg: dict) -> None:
    """``model.weights`` names a file and ``model.stem`` a known stem: the tools' ``validate``
    call this before the output folder is touched.

    Raises:
        ConfigError: no weights given, a directory, no such file, or an unknown stem.
    """
    m = cfg["model"]
    if not m["weights"]:
        raise ConfigError("config key 'model.weights' is required (use --weights)")
    weights = Path(m["weights"])
    if weights.is_dir():
        raise ConfigError(
            f"config key 'model.weights' (--weights) {m['weights']!r} is a directory, not a "
            "checkpoint file"
        )
    if not weights.is_file():
        raise ConfigError(f"config key 'model.weights' (--weights) {m['weights']!r}: no such file")
    if m["stem"] and m["stem"] not in STEMS:
        raise ConfigError(f"config key 'model.stem' (--stem): {m['stem']!r} is not one of {STEMS}")


def log_weights_notes(meta: dict, data: dict) -> None:
    """Log the reader's notes on the weights (an assumed 3x3 stem as a warning: it changes
    every number) and a pretraining resolution far from this evaluation's."""
    for note in meta.get("notes", []):
        (logger.warning if note == STEM_ASSUMED else logger.info)("weights: %s", note)
    _warn_resolution(meta, data)


def _warn_resolution(meta: dict, data: dict) -> None:
    """A warning when the weights' recorded pretraining views (``data.image_size`` of their
    config) and this evaluation's ``data.crop`` differ by 2x or more (e.g. a 28 px Fashion-MNIST
    backbone read at ImageNet's 224 px: other features, and much slower)."""
    trained = ((meta.get("config") or {}).get("data") or {}).get("image_size")
    crop = data.get("crop")
    if isinstance(trained, int) and isinstance(crop, int) and trained > 0 and crop > 0:
        if max(crop / trained, trained / crop) >= 2:
            logger.warning(
                "the weights were pretrained on %d px views and are evaluated at %d px "
                "(data.resize=%s, data.crop=%d); set both to match if that is not intended",
                trained,
                crop,
                data.get("resize"),
                crop,
            )

"""What a pretraining run is checked for before it starts: the cross-field rules of its config
(:func:`check_config`, run by every process) and, before any process starts, the data paths too
(:func:`preflight`, ``pretrain.main --check``, which tools/pretrain.sh runs before torchrun)."""

from __future__ import annotations

from typing import Mapping

from pretrain.config import ConfigError
from pretrain.data.loader import check_data_paths
from pretrain.engine.runtime import PRECISIONS
from pretrain.methods import get_method
from pretrain.models.projector import OUT_NORMS, parse_projector_spec

__all__ = ["check_config", "preflight"]


def check_config(cfg: Mapping, world_size: int) -> None:
    """Cross-field checks of a resolved pretraining config (the schema checks single keys).

    Raises:
        ConfigError: naming the config key(s) and the offending value.
    """
    if cfg["train"]["precision"] not in PRECISIONS:
        raise ConfigError(
            f"config key 'train.precision': '{cfg['train']['precision']}' is not one of "
            f"{', '.join(PRECISIONS)}"
        )
    bs = cfg["train"]["batch_size"]
    if bs <= 0 or bs % world_size != 0:
        raise ConfigError(
            f"config key 'train.batch_size': global batch {bs} must be a positive multiple of "
            f"the number of processes ({world_size})"
        )
    parse_projector_spec(cfg["model"]["projector"])  # a malformed projector is a ConfigError
    if cfg["model"]["out_norm"] not in OUT_NORMS:
        raise ConfigError(
            f"config key 'model.out_norm': {cfg['model']['out_norm']!r} is not one of "
            f"{', '.join(OUT_NORMS)}"
        )
    get_method(cfg["loss"]["name"]).check(cfg)  # the method's own cross-field checks


def preflight(cfg: Mapping, world_size: int) -> None:
    """What ``pretrain.main --check`` (and so ``tools/pretrain.sh``, before torchrun) checks:
    :func:`check_config` for ``world_size`` processes and the data paths
    (:func:`pretrain.data.loader.check_data_paths`; the probe's folders when it is on).

    Raises:
        ConfigError / DataError: naming the key and the value.
    """
    check_config(cfg, world_size)
    probe = cfg["eval"] if int(cfg["eval"]["every_steps"]) > 0 else None
    check_data_paths(cfg["data"], probe)

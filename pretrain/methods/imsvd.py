"""IMSVD (Niu et al.): soft variable discretization of the projector output, joint entropy of
the cross-view joint distribution over the global batch plus transform invariance.

Config: the keys at the top of ``loss:`` (``bin_size``, ``temperature``, ``ti_coeff``,
``dia_coeff``, ``off_coeff``, ``ti_mode``, ``impl``, ``shard``); the loss is
:class:`pretrain.losses.imsvd.IMSVDLoss`; the monitors are the code statistics of
:func:`pretrain.losses.monitors.code_monitors` (``train.monitors``).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from pretrain.config import ConfigError
from pretrain.losses.imsvd import IMSVDLoss
from pretrain.losses.monitors import code_monitors
from pretrain.methods.base import Method
from pretrain.models.projector import parse_projector_spec

__all__ = ["METHOD"]


def _build(loss_cfg: Mapping[str, Any]) -> IMSVDLoss:
    return IMSVDLoss(
        bin_size=loss_cfg["bin_size"],
        temperature=loss_cfg["temperature"],
        ti_coeff=loss_cfg["ti_coeff"],
        dia_coeff=loss_cfg["dia_coeff"],
        off_coeff=loss_cfg["off_coeff"],
        ti_mode=loss_cfg["ti_mode"],
        impl=loss_cfg["impl"],
        shard=loss_cfg["shard"],
    )


def _check(cfg: Mapping[str, Any]) -> None:
    """The projector's output width D must split into M = D / bin_size variables."""
    d = parse_projector_spec(cfg["model"]["projector"])[-1]
    if d % cfg["loss"]["bin_size"] != 0:
        raise ConfigError(
            f"config keys 'model.projector' / 'loss.bin_size': output width {d} is not a multiple "
            f"of bin_size {cfg['loss']['bin_size']}"
        )


def _monitors(z1: torch.Tensor, z2: torch.Tensor, cfg: Mapping[str, Any], step: int) -> dict:
    if not cfg["train"]["monitors"]:
        return {}
    return code_monitors(z1, z2, cfg["loss"]["bin_size"], cfg["loss"]["temperature"], step=step)


METHOD = Method(
    name="imsvd",
    paper="Niu et al., Information-Maximized Soft Variable Discretization (IMSVD)",
    section="loss",
    paper_projector="8192-8160",
    build=_build,
    check=_check,
    monitors=_monitors,
)

"""Barlow Twins (Zbontar et al., ICML 2021) in the same trainer: config ``loss.barlowtwins``
(``lambd``), the loss :class:`pretrain.losses.barlowtwins.BarlowTwinsLoss`."""

from __future__ import annotations

from typing import Any, Mapping

from pretrain.losses.barlowtwins import BarlowTwinsLoss
from pretrain.losses.imsvd import LossConfigError
from pretrain.methods.base import Method, min_global_batch

__all__ = ["METHOD"]


def _build(loss_cfg: Mapping[str, Any]) -> BarlowTwinsLoss:
    try:
        return BarlowTwinsLoss(loss_cfg["barlowtwins"]["lambd"])
    except ValueError as e:
        raise LossConfigError(f"config section 'loss.barlowtwins': {e}") from None


METHOD = Method(
    name="barlowtwins",
    paper="Zbontar et al., Barlow Twins, ICML 2021",
    section="loss.barlowtwins",
    paper_projector="8192-8192-8192",
    build=_build,
    check=lambda cfg: min_global_batch(cfg, 2, "barlowtwins"),  # batch normalisation of z
)

"""VICReg (Bardes et al., ICLR 2022) in the same trainer: config ``loss.vicreg`` (``sim_coeff``,
``std_coeff``, ``cov_coeff``), the loss :class:`pretrain.losses.vicreg.VICRegLoss`."""

from __future__ import annotations

from typing import Any, Mapping

from pretrain.losses.imsvd import LossConfigError
from pretrain.losses.vicreg import VICRegLoss
from pretrain.methods.base import Method, min_global_batch

__all__ = ["METHOD"]


def _build(loss_cfg: Mapping[str, Any]) -> VICRegLoss:
    c = loss_cfg["vicreg"]
    try:
        return VICRegLoss(c["sim_coeff"], c["std_coeff"], c["cov_coeff"])
    except ValueError as e:
        raise LossConfigError(f"config section 'loss.vicreg': {e}") from None


METHOD = Method(
    name="vicreg",
    paper="Bardes et al., VICReg, ICLR 2022",
    section="loss.vicreg",
    paper_projector="8192-8192-8192",
    build=_build,
    check=lambda cfg: min_global_batch(cfg, 2, "vicreg"),  # the variance term needs 2 samples
)

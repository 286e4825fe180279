"""The declaration every pretraining method makes (:class:`Method`) and checks they share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import torch
from torch import nn

from pretrain.config import ConfigError

__all__ = ["Method", "min_global_batch"]


@dataclass(frozen=True)
class Method:
    """What the trainer needs to know about one pretraining method.

    Attributes:
        name: the value of ``loss.name``.
        paper: the paper the loss follows.
        section: the config keys the method reads (``loss`` = the keys at the top of ``loss:``
            other than ``name`` and the baselines' sections; ``loss.vicreg`` = that section).
        paper_projector: the projector of the paper's ResNet-50 recipe (``model.projector``;
            the method's ``*_r50_100ep.yaml`` recipe uses it).
        build: the loss module from the resolved ``loss`` section; forward(z1, z2) returns a
            dict with "loss" and its weighted terms. Raises LossConfigError naming the key.
        check: cross-field checks of the resolved config (the schema checks single keys);
            raises ConfigError naming the key(s) and the value.
        monitors: optional extra metrics at log steps from the detached embeddings (z1, z2) of
            the last step, the resolved config and the step; a dict of floats.
    """

    name: str
    paper: str
    section: str
    paper_projector: str
    build: Callable[[Mapping[str, Any]], nn.Module]
    check: Callable[[Mapping[str, Any]], None]
    monitors: Optional[Callable[[torch.Tensor, torch.Tensor, Mapping[str, Any], int], dict]] = None


def min_global_batch(cfg: Mapping[str, Any], least: int, method: str) -> None:
    """ConfigError unless ``train.batch_size`` is at least ``least`` (methods whose statistics
    need several samples)."""
    bs = cfg["train"]["batch_size"]
    if bs < least:
        raise ConfigError(
            f"config key 'train.batch_size': {method} needs a global batch of at least {least} "
            f"images, got {bs}"
        )

"""The pretraining methods and their registry: one module per method, each declaring what the
trainer needs to know about it, so the engine and the hooks never branch on a method's name.

A :class:`Method` says which config section it reads, its cross-field checks, the projector its
paper uses, how to build its loss, and its monitors (extra metrics of the two views' embeddings
at log steps). ``loss.name`` selects one: :data:`METHODS` holds ``imsvd``
(:mod:`pretrain.methods.imsvd`), ``vicreg`` (:mod:`pretrain.methods.vicreg`) and
``barlowtwins`` (:mod:`pretrain.methods.barlowtwins`). The losses themselves are
:mod:`pretrain.losses` (one module per loss).

Config layout: the IMSVD keys sit at the top of ``loss:`` (the toolkit's own method, and the
keys every IMSVD recipe and stored run config already spell that way), each baseline's under
``loss.<name>``; :attr:`Method.section` names the keys of each.
"""

from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from pretrain.losses.imsvd import LossConfigError
from pretrain.methods import barlowtwins, imsvd, vicreg
from pretrain.methods.base import Method

__all__ = ["Method", "METHODS", "get_method", "build_loss"]

METHODS: dict[str, Method] = {m.name: m for m in (imsvd.METHOD, vicreg.METHOD, barlowtwins.METHOD)}


def get_method(name: str) -> Method:
    """The method registered under ``name``.

    Raises:
        LossConfigError: an unknown name (naming ``loss.name`` and the choices).
    """
    if name not in METHODS:
        raise LossConfigError(
            f"config key 'loss.name': {name!r} is not one of {', '.join(METHODS)}"
        )
    return METHODS[name]


def build_loss(loss_cfg: Mapping[str, Any]) -> nn.Module:
    """The loss of the method ``loss_cfg["name"]`` (see :attr:`Method.build`).

    Raises:
        LossConfigError: an unknown name or an invalid setting, naming its key.
    """
    return get_method(loss_cfg["name"]).build(loss_cfg)

"""The shared command-line options of every tool that reads a weights file."""

from __future__ import annotations

import argparse
from typing import Any

from pretrain.models.resnet import STEMS

from .readers import accepted_inputs


def add_weights_args(
    parser: argparse.ArgumentParser, layout_options: bool = True
) -> argparse.ArgumentParser:
    """Add ``--allow-unsafe`` (and ``--checkpoint-key`` / ``--prefix`` / ``--stem``) to a parser.

    Pass the parsed values on with :func:`weights_kwargs`; errors of the loaders name these
    flags, and :func:`with_accepted_inputs` appends the accepted formats to a message.

    Args:
        parser: the tool's argparse parser.
        layout_options: also add ``--checkpoint-key`` / ``--prefix`` / ``--stem`` (for tools
            that read backbones through ``load_backbone``; not for Detectron2's own weights).

    Returns:
        The same parser.
    """
    group = parser.add_argument_group(
        "weights file", "accepted layouts, detected by content: " + "; ".join(accepted_inputs())
    )
    group.add_argument(
        "--allow-unsafe",
        action="store_true",
        help="fully unpickle a TRUSTED weights file that the safe readers refuse (it can run "
        "code stored in the file)",
    )
    if not layout_options:
        return parser
    group.add_argument(
        "--checkpoint-key",
        metavar="KEY",
        default=None,
        help="read the weights from this top-level entry of the file (e.g. 'teacher')",
    )
    group.add_argument(
        "--prefix",
        metavar="PREFIX",
        default=None,
        help="keep only keys starting with PREFIX and remove it (e.g. 'module.backbone.')",
    )
    group.add_argument(
        "--stem",
        choices=STEMS,
        default=None,
        help="the ResNet stem of a file that does not record it (a bare state dict): a 3x3 "
        "conv1 is read as 'small' (stride 1, no max-pool) unless this says 'small_s2'",
    )
    return parser


def weights_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments for ``load_backbone`` / ``pretrain.models.build.model_from_checkpoint``.

    Args:
        args: a namespace parsed by a parser that went through :func:`add_weights_args`.

    Returns:
        ``{"allow_unsafe", "checkpoint_key", "prefix", "stem"}``.
    """
    return {
        "allow_unsafe": bool(getattr(args, "allow_unsafe", False)),
        "checkpoint_key": getattr(args, "checkpoint_key", None),
        "prefix": getattr(args, "prefix", None),
        "stem": getattr(args, "stem", None),
    }


def with_accepted_inputs(exc: BaseException) -> str:
    """An error message that ends with the accepted weight formats (added if absent).

    Args:
        exc: the error of a loader.

    Returns:
        ``str(exc)``, followed by the list of accepted inputs when ``exc`` is a
        :class:`CheckpointError` about the file's content (not a missing file or an existing
        output) and the message does not hold the list already.
    """
    msg = str(exc)
    if "Accepted inputs" in msg or not getattr(exc, "about_content", False):
        return msg  # the list helps only when the file's content was not understood
    return msg + "\nAccepted inputs:\n  - " + "\n  - ".join(accepted_inputs())

"""The shared command-line options of every tool that reads a weights file."""

from __future__ import annotations

import argparse
from typing import Any

from .readers import accepted_inputs


def add_weights_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--allow-unsafe``, ``--checkpoint-key`` and ``--prefix`` to a parser.

    Pass the parsed values on with :func:`weights_kwargs`; errors of the loaders name these
    flags and list the accepted formats.

    Args:
        parser: the tool's argparse parser (or an argument group's parser).

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
    return parser


def weights_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments for ``load_backbone`` / ``model_from_checkpoint`` from parsed args.

    Args:
        args: a namespace parsed by a parser that went through :func:`add_weights_args`.

    Returns:
        ``{"allow_unsafe", "checkpoint_key", "prefix"}``.
    """
    return {
        "allow_unsafe": bool(getattr(args, "allow_unsafe", False)),
        "checkpoint_key": getattr(args, "checkpoint_key", None),
        "prefix": getattr(args, "prefix", None),
    }

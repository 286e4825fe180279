"""What the two weight converters share: the conversion command and the text it prints.

The Detectron2 converter (``transfer.detection.d2``: ``weights``, ``convert``) and the
MMDetection one (``transfer.detection.mmdet``: ``weights``, ``convert``) differ in the file they
write and the line that describes the source; the command around them is written here once.
Neither framework is imported.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Type

from pretrain.checkpoint import (
    add_weights_args,
    load_backbone,
    weights_kwargs,
    with_accepted_inputs,
)
from pretrain.errors import IMSVDError

__all__ = [
    "load_standard_backbone",
    "conversion_summary",
    "conversion_main",
]


def load_standard_backbone(
    input_path: str,
    output_path: str,
    force: bool,
    error: Type[Exception],
    needs: str,
    allow_unsafe: bool = False,
    checkpoint_key: Optional[str] = None,
    prefix: Optional[str] = None,
) -> Tuple[Dict[str, Any], Dict[str, Any], str]:
    """Load the backbone to convert; refuse an existing output first and any stem but 7x7.

    Args:
        input_path: checkpoint accepted by ``pretrain.checkpoint.load_backbone``.
        output_path: the file to write.
        force: overwrite an existing output.
        error: the converter's error class.
        needs: who needs the standard stem, for the message ("Detectron2 needs").
        allow_unsafe: let load_backbone fully unpickle a trusted file the safe readers refuse.
        checkpoint_key: entry of INPUT holding the weights (other layouts).
        prefix: key prefix of the ResNet weights inside that entry.

    Returns:
        ``(state_dict, meta, stem)`` from load_backbone.

    Raises:
        error: existing output, or a stem other than "standard" (a 7x7/2 conv + max-pool);
            CheckpointError: unreadable input.
    """
    if os.path.exists(output_path) and not force:
        raise error(f"output {output_path!r} already exists (pass --force)")
    state_dict, meta = load_backbone(
        input_path, allow_unsafe=allow_unsafe, checkpoint_key=checkpoint_key, prefix=prefix
    )
    stem = meta.get("stem", "standard")
    if stem != "standard":
        raise error(f"{input_path}: backbone stem is {stem!r}; {needs} the 'standard' stem")
    return state_dict, meta, stem


def conversion_summary(
    input_path: str, output_path: str, meta: Mapping[str, Any], details: str, report: Any
) -> str:
    """What the conversion command prints.

    Args:
        input_path: the source checkpoint.
        output_path: the written file.
        meta: load_backbone's metadata (``source_format``, ``notes``).
        details: the converter's line on the source (arch, stem, epoch, sha256, ...).
        report: the converter's report (its ``summary()`` ends the text).

    Returns:
        The text; its first line names the format that was read.
    """
    lines = [f"read {input_path} as {meta['source_format']}", f"{input_path} -> {output_path}"]
    lines += [details] + [f"note: {n}" for n in meta.get("notes", [])]
    return "\n".join(lines) + "\n" + report.summary()


def conversion_main(
    argv: Optional[Sequence[str]],
    convert: Callable[..., str],
    *,
    prog: Optional[str],
    description: str,
    output_help: str,
    error_prefix: str,
    options: Sequence[Tuple[str, Dict[str, Any]]] = (),
) -> int:
    """The conversion command: INPUT OUTPUT [--force] [options] [weights options].

    Args:
        argv: arguments (defaults to sys.argv[1:]).
        convert: the converter's ``convert(input, output, force=..., **options, **weights)``.
        prog: the program name in --help (None: from argv[0]).
        description: the --help description.
        output_help: the help of OUTPUT.
        error_prefix: starts the one ``error:`` line.
        options: the converter's own options, ``(flag, add_argument keywords)``; passed to
            ``convert`` by their dest.

    Returns:
        Exit code: 0 on success, 2 on a bad input or output.
    """
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("input", help="backbone checkpoint (.pth)")
    parser.add_argument("output", help=output_help)
    parser.add_argument("--force", action="store_true", help="overwrite an existing output")
    own = [parser.add_argument(flag, **kwargs) for flag, kwargs in options]
    add_weights_args(parser)
    args = parser.parse_args(argv)
    kwargs = {action.dest: getattr(args, action.dest) for action in own}
    try:
        print(convert(args.input, args.output, force=args.force, **kwargs, **weights_kwargs(args)))
    except IMSVDError as exc:
        print(f"{error_prefix}: error: {with_accepted_inputs(exc)}", file=sys.stderr)
        return 2
    return 0

"""Export the backbone of any accepted checkpoint as this project's format or a bare state_dict.

INPUT is anything ``pretrain.checkpoint.load_backbone`` reads. ``--format imsvd`` (default)
writes an ``imsvd-backbone`` file (metadata + content hash); ``--format torchvision`` writes the
bare torchvision state_dict without ``fc``, the only layout that scripts loading with
``load_state_dict(..., strict=False)`` (e.g. the reference IMSVD evaluations) read correctly.
Example::

    imsvd-export-backbone outputs/run/backbone_final.pth r50_tv.pth --format torchvision
    python tools/export_backbone.py ...   (the same command)
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from pretrain.checkpoint import (
    CheckpointError,
    CheckpointPathError,
    add_weights_args,
    export_backbone,
    export_torchvision_state_dict,
    load_backbone,
    weights_kwargs,
    with_accepted_inputs,
)
from pretrain.errors import IMSVDError

FORMATS = ("imsvd", "torchvision")


def export(
    input_path: str,
    output_path: str,
    fmt: str = "imsvd",
    force: bool = False,
    **load_kwargs,
) -> str:
    """Read a backbone and write it in the chosen format.

    Args:
        input_path: checkpoint accepted by ``load_backbone``.
        output_path: destination file.
        fmt: "imsvd" or "torchvision".
        force: overwrite an existing output.
        **load_kwargs: allow_unsafe / checkpoint_key / prefix for ``load_backbone``.

    Returns:
        The summary that main() prints (first line: the format that was read).

    Raises:
        CheckpointError: unreadable input, unknown format or an existing output.
    """
    if fmt not in FORMATS:
        raise CheckpointError(f"--format must be one of {FORMATS}, got {fmt!r}")
    if os.path.exists(output_path) and not force:
        raise CheckpointPathError(f"output {output_path!r} already exists (pass --force)")
    sd, meta = load_backbone(input_path, **load_kwargs)
    lines = [f"read {input_path} as {meta['source_format']}"]
    if fmt == "imsvd":
        epoch = meta.get("epoch")
        if epoch is None:
            lines.append("note: the input does not record its epoch; written as 0")
        digest = export_backbone(
            output_path,
            sd,
            arch=meta["arch"],
            stem=meta["stem"],
            epoch=int(epoch or 0),
            config=meta.get("config"),
        )
    else:
        digest = export_torchvision_state_dict(output_path, sd)
        if meta["stem"] != "standard":
            lines.append(
                f"note: stem '{meta['stem']}' is not recorded in a bare state_dict; the reader "
                f"must build the same conv1 / max-pool (this toolkit's tools: --stem {meta['stem']}"
                f", model.stem={meta['stem']} in evaluations)"
            )
    lines.append(
        f"wrote {output_path} ({fmt}): arch {meta['arch']}, stem {meta['stem']}, "
        f"{len(sd)} tensors, sha256 {digest}"
    )
    lines += [f"note: {n}" for n in meta.get("notes", [])]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point.

    Args:
        argv: arguments (defaults to sys.argv[1:]).

    Returns:
        Exit code: 0 on success, 2 on a bad input or output.
    """
    parser = argparse.ArgumentParser(
        prog="imsvd-export-backbone", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("input", help="backbone checkpoint")
    parser.add_argument("output", help="file to write")
    parser.add_argument("--format", choices=FORMATS, default="imsvd", help="output layout")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output")
    add_weights_args(parser)
    args = parser.parse_args(argv)
    try:
        print(export(args.input, args.output, args.format, args.force, **weights_kwargs(args)))
    except IMSVDError as exc:
        print(f"export_backbone: error: {with_accepted_inputs(exc)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

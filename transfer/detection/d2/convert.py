"""Convert a backbone checkpoint to Detectron2's weight pickle.

INPUT is anything ``pretrain.checkpoint.load_backbone`` reads (this project's exported backbone
or training checkpoint, the reference IMSVD model.pth / model_final.pth, a bare torchvision
resnet50.pth, MoCo v1/v2/v3, SwAV, DINO checkpoints; ``--checkpoint-key`` / ``--prefix`` for
other layouts). The output records the backbone's arch and stem, which ``train_net.py`` checks
against the config. Example::

    imsvd-convert-d2 exported_backbone.pth imsvd_r50.pkl   (or: python tools/convert_to_d2.py)
    imsvd-d2-train --config mask_rcnn_C4_1x.yaml MODEL.WEIGHTS imsvd_r50.pkl
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from pretrain.checkpoint import (
    add_weights_args,
    load_backbone,
    weights_kwargs,
    with_accepted_inputs,
)
from pretrain.errors import IMSVDError
from transfer.detection.d2.weights import (
    D2ConversionError,
    convert_torchvision_to_d2,
    write_d2_pickle,
)


def convert(
    input_path: str,
    output_path: str,
    force: bool = False,
    allow_unsafe: bool = False,
    checkpoint_key: Optional[str] = None,
    prefix: Optional[str] = None,
) -> str:
    """Load a backbone, rename it for Detectron2 and write the pickle.

    Args:
        input_path: checkpoint accepted by ``pretrain.checkpoint.load_backbone``.
        output_path: destination ``.pkl``.
        force: overwrite an existing output.
        allow_unsafe: let load_backbone fully unpickle a trusted file the safe readers refuse.
        checkpoint_key: entry of INPUT holding the weights (other layouts).
        prefix: key prefix of the ResNet weights inside that entry.

    Returns:
        The summary text that main() prints (first line: the format that was read).

    Raises:
        ValueError: (CheckpointError / D2ConversionError) on unreadable or unmappable input.
    """
    if os.path.exists(output_path) and not force:
        raise D2ConversionError(f"output {output_path!r} already exists (pass --force)")
    state_dict, meta = load_backbone(
        input_path, allow_unsafe=allow_unsafe, checkpoint_key=checkpoint_key, prefix=prefix
    )
    stem = meta.get("stem", "standard")
    if stem != "standard":
        # Detectron2's ResNet stem is a 7x7/2 conv + max-pool; other stems cannot be loaded.
        raise D2ConversionError(
            f"{input_path}: backbone stem is {stem!r}; Detectron2 needs the 'standard' stem"
        )
    blobs, report = convert_torchvision_to_d2(state_dict)
    extra = {
        "arch": meta["arch"],
        "stem": stem,
        "source_format": meta["source_format"],
        "source_sha256": meta["sha256"],
    }
    write_d2_pickle(blobs, output_path, force=force, extra=extra)
    lines = [
        f"read {input_path} as {meta['source_format']}",
        f"{input_path} -> {output_path}",
        f"arch {meta['arch']}, stem {stem}, epoch {meta.get('epoch')}, "
        f"sha256 {meta['sha256'][:16]} (arch and stem recorded in the output)",
    ]
    lines += [f"note: {n}" for n in meta.get("notes", [])]
    return "\n".join(lines) + "\n" + report.summary()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point.

    Args:
        argv: arguments (defaults to sys.argv[1:]).

    Returns:
        Exit code: 0 on success, 2 on a bad input or output.
    """
    parser = argparse.ArgumentParser(prog="imsvd-convert-d2", description=__doc__.split("\n\n")[0])
    parser.add_argument("input", help="backbone checkpoint (.pth)")
    parser.add_argument("output", help="Detectron2 weights to write (.pkl)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output")
    add_weights_args(parser)
    args = parser.parse_args(argv)
    try:
        print(convert(args.input, args.output, force=args.force, **weights_kwargs(args)))
    except IMSVDError as exc:
        print(f"convert_to_d2: error: {with_accepted_inputs(exc)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Convert a backbone checkpoint to Detectron2's weight pickle.

INPUT is anything ``pretrain.checkpoint.load_backbone`` reads (this project's exported backbone
or training checkpoint, the reference IMSVD model.pth / model_final.pth, a bare torchvision
resnet50.pth, MoCo checkpoints). Example::

    python tools/convert_to_d2.py exported_backbone.pth imsvd_r50.pkl
    python transfer/train_net.py --config mask_rcnn_C4_1x.yaml MODEL.WEIGHTS imsvd_r50.pkl
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from transfer.d2_weights import D2ConversionError, convert_torchvision_to_d2, write_d2_pickle


def convert(
    input_path: str, output_path: str, force: bool = False, allow_unsafe: bool = False
) -> str:
    """Load a backbone, rename it for Detectron2 and write the pickle.

    Args:
        input_path: checkpoint accepted by ``pretrain.checkpoint.load_backbone``.
        output_path: destination ``.pkl``.
        force: overwrite an existing output.
        allow_unsafe: let load_backbone fully unpickle a trusted file that holds Python objects.

    Returns:
        The summary text that main() prints.

    Raises:
        ValueError: (CheckpointError / D2ConversionError) on unreadable or unmappable input.
    """
    from pretrain.checkpoint import load_backbone

    if os.path.exists(output_path) and not force:
        raise D2ConversionError(f"output {output_path!r} already exists (pass --force)")
    state_dict, meta = load_backbone(input_path, allow_unsafe=allow_unsafe)
    stem = meta.get("stem", "standard")
    if stem != "standard":
        # Detectron2's ResNet stem is a 7x7/2 conv + max-pool; other stems cannot be loaded.
        raise D2ConversionError(
            f"{input_path}: backbone stem is {stem!r}; Detectron2 needs the 'standard' stem"
        )
    blobs, report = convert_torchvision_to_d2(state_dict)
    write_d2_pickle(blobs, output_path, force=force)
    lines = [
        f"{input_path} -> {output_path}",
        f"source {meta['source_format']}, arch {meta['arch']}, stem {stem}, "
        f"epoch {meta.get('epoch')}, sha256 {meta.get('sha256', '?')[:16]}",
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
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input", help="backbone checkpoint (.pth)")
    parser.add_argument("output", help="Detectron2 weights to write (.pkl)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output")
    parser.add_argument(
        "--allow-unsafe",
        action="store_true",
        help="fully unpickle a trusted INPUT that holds Python objects (e.g. argparse.Namespace)",
    )
    args = parser.parse_args(argv)
    try:
        print(convert(args.input, args.output, force=args.force, allow_unsafe=args.allow_unsafe))
    except ValueError as exc:
        print(f"convert_to_d2: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

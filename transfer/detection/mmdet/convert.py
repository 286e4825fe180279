"""Convert a backbone checkpoint to MMDetection weights (Mask / Faster R-CNN R50-C4 layout).

INPUT is anything ``pretrain.checkpoint.load_backbone`` reads (this project's exported backbone
or training checkpoint, the reference IMSVD model.pth / model_final.pth, a bare torchvision
resnet50.pth, MoCo checkpoints). Example::

    python tools/convert_to_mmdet.py exported_backbone.pth imsvd_r50_mmdet.pth
    imsvd-mmdet-train mask_rcnn_C4_1x.py --weights imsvd_r50_mmdet.pth
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
from transfer.detection.mmdet.weights import (
    FORMAT,
    FORMAT_VERSION,
    LAYOUTS,
    MMDetWeightsError,
    convert_torchvision_to_mmdet,
    depth_of_arch,
    write_mmdet_checkpoint,
)


def convert(
    input_path: str,
    output_path: str,
    force: bool = False,
    allow_unsafe: bool = False,
    layout: str = "c4",
    checkpoint_key: Optional[str] = None,
    prefix: Optional[str] = None,
) -> str:
    """Load a backbone, place it under MMDetection's names and write the checkpoint.

    Args:
        input_path: checkpoint accepted by ``pretrain.checkpoint.load_backbone``.
        output_path: destination ``.pth``.
        force: overwrite an existing output.
        allow_unsafe: let load_backbone fully unpickle a trusted file the safe readers refuse.
        layout: "c4" (layer4 -> roi_head.shared_head) or "backbone" (all stages in backbone).
        checkpoint_key: entry of INPUT holding the weights (other layouts).
        prefix: key prefix of the ResNet weights inside that entry.

    Returns:
        The summary text that main() prints.

    Raises:
        ValueError: (CheckpointError / MMDetWeightsError) on unreadable or unmappable input.
    """
    if os.path.exists(output_path) and not force:
        raise MMDetWeightsError(f"output {output_path!r} already exists (pass --force)")
    state_dict, meta = load_backbone(
        input_path, allow_unsafe=allow_unsafe, checkpoint_key=checkpoint_key, prefix=prefix
    )
    stem = meta.get("stem", "standard")
    if stem != "standard":
        # MMDetection's ResNet stem is a 7x7/2 conv + max-pool; other stems cannot be loaded.
        raise MMDetWeightsError(
            f"{input_path}: backbone stem is {stem!r}; MMDetection's ResNet needs the "
            "'standard' stem"
        )
    tensors, report = convert_torchvision_to_mmdet(state_dict, layout=layout)
    out_meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "arch": str(meta["arch"]),
        "depth": depth_of_arch(str(meta["arch"])),
        "stem": stem,
        "layout": layout,
        "source": os.path.basename(input_path),
        "source_format": str(meta.get("source_format")),
        "source_sha256": str(meta.get("sha256")),
        "epoch": meta.get("epoch") if isinstance(meta.get("epoch"), int) else None,
    }
    write_mmdet_checkpoint(tensors, out_meta, output_path, force=force)
    lines = [
        f"read {input_path} as {meta['source_format']}",
        f"{input_path} -> {output_path}",
        f"source {meta['source_format']}, arch {meta['arch']}, stem {stem}, layout {layout}, "
        f"epoch {meta.get('epoch')}, sha256 {str(meta.get('sha256', '?'))[:16]}",
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
    parser.add_argument("output", help="MMDetection weights to write (.pth)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output")
    parser.add_argument(
        "--layout",
        choices=sorted(LAYOUTS),
        default="c4",
        help="c4: layer4 goes to roi_head.shared_head (R50-C4 detectors, default); backbone: "
        "all four stages under backbone. (FPN detectors)",
    )
    add_weights_args(parser)
    args = parser.parse_args(argv)
    try:
        print(
            convert(
                args.input, args.output, force=args.force, layout=args.layout,
                **weights_kwargs(args),
            )
        )  # fmt: skip
    except IMSVDError as exc:
        print(f"convert_to_mmdet: error: {with_accepted_inputs(exc)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Convert a backbone checkpoint to MMDetection weights (Mask / Faster R-CNN R50-C4 layout).

INPUT is anything ``pretrain.checkpoint.load_backbone`` reads (this project's exported backbone
or training checkpoint, the reference IMSVD model.pth / model_final.pth, a bare torchvision
resnet50.pth, MoCo checkpoints). Example::

    python tools/convert_to_mmdet.py exported_backbone.pth imsvd_r50_mmdet.pth
    imsvd-mmdet-train mask_rcnn_C4_1x.py --weights imsvd_r50_mmdet.pth
"""

from __future__ import annotations

import os
import sys
from typing import Optional

from transfer.detection.conversion import (
    conversion_command,
    conversion_summary,
    load_standard_backbone,
)
from transfer.detection.mmdet.weights import (
    FORMAT,
    FORMAT_VERSION,
    LAYOUTS,
    MMDetWeightsError,
    convert_torchvision_to_mmdet,
    depth_of_arch,
    write_mmdet_checkpoint,
)

LAYOUT_HELP = (
    "c4: layer4 goes to roi_head.shared_head (R50-C4 detectors, default); backbone: all four "
    "stages under backbone. (FPN detectors)"
)


def convert(
    input_path: str,
    output_path: str,
    force: bool = False,
    allow_unsafe: bool = False,
    layout: str = "c4",
    checkpoint_key: Optional[str] = None,
    prefix: Optional[str] = None,
    stem: Optional[str] = None,
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
        stem: the stem of a file that does not record it (see ``load_backbone``).

    Returns:
        The summary text that main() prints.

    Raises:
        ValueError: (CheckpointError / MMDetWeightsError) on unreadable or unmappable input.
    """
    # MMDetection's ResNet stem is a 7x7/2 conv + max-pool; other stems cannot be loaded.
    state_dict, meta, stem = load_standard_backbone(
        input_path,
        output_path,
        force,
        MMDetWeightsError,
        "MMDetection's ResNet needs",
        allow_unsafe=allow_unsafe,
        checkpoint_key=checkpoint_key,
        prefix=prefix,
        stem=stem,
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
    details = (
        f"source {meta['source_format']}, arch {meta['arch']}, stem {stem}, layout {layout}, "
        f"epoch {meta.get('epoch')}, sha256 {str(meta.get('sha256', '?'))[:16]}"
    )
    return conversion_summary(input_path, output_path, meta, details, report)


main = conversion_command(
    convert,
    prog=None,
    description=__doc__.split("\n\n")[0],
    output_help="MMDetection weights to write (.pth)",
    error_prefix="convert_to_mmdet",
    options=[("--layout", dict(choices=sorted(LAYOUTS), default="c4", help=LAYOUT_HELP))],
)


if __name__ == "__main__":
    sys.exit(main())

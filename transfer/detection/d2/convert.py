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

import sys
from typing import Optional

from transfer.detection.conversion import (
    conversion_command,
    conversion_summary,
    load_standard_backbone,
)
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
    stem: Optional[str] = None,
) -> str:
    """Load a backbone, rename it for Detectron2 and write the pickle.

    Args:
        input_path: checkpoint accepted by ``pretrain.checkpoint.load_backbone``.
        output_path: destination ``.pkl``.
        force: overwrite an existing output.
        allow_unsafe: let load_backbone fully unpickle a trusted file the safe readers refuse.
        checkpoint_key: entry of INPUT holding the weights (other layouts).
        prefix: key prefix of the ResNet weights inside that entry.
        stem: the stem of a file that does not record it (see ``load_backbone``).

    Returns:
        The summary text that main() prints (first line: the format that was read).

    Raises:
        ValueError: (CheckpointError / D2ConversionError) on unreadable or unmappable input.
    """
    # Detectron2's ResNet stem is a 7x7/2 conv + max-pool; other stems cannot be loaded.
    state_dict, meta, stem = load_standard_backbone(
        input_path,
        output_path,
        force,
        D2ConversionError,
        "Detectron2 needs",
        allow_unsafe=allow_unsafe,
        checkpoint_key=checkpoint_key,
        prefix=prefix,
        stem=stem,
    )
    blobs, report = convert_torchvision_to_d2(state_dict)
    extra = {
        "arch": meta["arch"],
        "stem": stem,
        "source_format": meta["source_format"],
        "source_sha256": meta["sha256"],
    }
    write_d2_pickle(blobs, output_path, force=force, extra=extra)
    details = (
        f"arch {meta['arch']}, stem {stem}, epoch {meta.get('epoch')}, "
        f"sha256 {meta['sha256'][:16]} (arch and stem recorded in the output)"
    )
    return conversion_summary(input_path, output_path, meta, details, report)


main = conversion_command(
    convert,
    prog="imsvd-convert-d2",
    description=__doc__.split("\n\n")[0],
    output_help="Detectron2 weights to write (.pkl)",
    error_prefix="convert_to_d2",
)


if __name__ == "__main__":
    sys.exit(main())

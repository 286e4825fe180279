"""Fine-tune a converted backbone with Detectron2 (Mask R-CNN / Faster R-CNN R50-C4).

Examples::

    python tools/convert_to_d2.py backbone.pth imsvd_r50.pkl
    python transfer/train_net.py --config mask_rcnn_C4_1x.yaml --num-gpus 8 \\
        MODEL.WEIGHTS imsvd_r50.pkl
    python transfer/train_net.py --config mask_rcnn_C4_1x.yaml --eval-only \\
        MODEL.WEIGHTS output/mask_rcnn_C4_1x/model_final.pth

A bare config name resolves inside transfer/configs/; a path works too. Trailing ``KEY VALUE``
pairs override the config as in Detectron2's own tools.

One's own COCO-format data (a json with images, annotations and categories, plus the image
folder) replaces DATASETS.TRAIN / DATASETS.TEST with ``--train-json J --train-images DIR`` and
``--test-json J --test-images DIR``; they are registered as ``imsvd_coco_train`` and
``imsvd_coco_test``::

    python transfer/train_net.py --config mask_rcnn_C4_instant_test.yaml \
        --train-json ann/train.json --train-images images/ \
        --test-json ann/val.json --test-images images/ MODEL.WEIGHTS imsvd_r50.pkl

MODEL.WEIGHTS (and the checkpoint of ``--resume``) is read without executing code from the file
(``--allow-unsafe`` lifts that for trusted files); converted weights must match
MODEL.RESNETS.DEPTH, and a weights file that leaves a backbone tensor unloaded or has a shape
mismatch is an error, not a warning.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from pretrain.checkpoint import add_weights_args
from transfer.detection.stacks import DATASET_NAMES, detectron2_base_parser, require


def build_parser() -> argparse.ArgumentParser:
    """Detectron2's argument parser, with ``--config`` as the documented spelling.

    Built without importing Detectron2 when it is not installed (``--help`` works; a run
    stops with one line saying how to install it).

    Returns:
        The parser (--config/--config-file, --num-gpus, --num-machines, --machine-rank,
        --dist-url, --resume, --eval-only, --allow-unsafe, --train-json/--train-images,
        --test-json/--test-images, trailing KEY VALUE opts).
    """
    parser = detectron2_base_parser()
    add_weights_args(parser, layout_options=False)
    parser.add_argument(
        "--config",
        dest="config_file",
        metavar="FILE",
        help="config name in transfer/configs/ (e.g. mask_rcnn_C4_1x.yaml) or a path",
    )
    data = parser.add_argument_group(
        "own COCO-format data",
        f"registered as {DATASET_NAMES['train']} / {DATASET_NAMES['test']}; they replace "
        "DATASETS.TRAIN / DATASETS.TEST",
    )
    for split in ("train", "test"):
        data.add_argument(
            f"--{split}-json", metavar="JSON", help=f"COCO instances json of the {split} set"
        )
        data.add_argument(
            f"--{split}-images",
            metavar="DIR",
            help=f"folder that the file_name entries of --{split}-json are relative to",
        )
    return parser


def cli(argv: Optional[list] = None) -> int:
    """Parse arguments; if Detectron2 imports, run (:func:`transfer.detection.d2.trainer.run`).

    Args:
        argv: arguments (defaults to sys.argv[1:]).

    Returns:
        Exit code: 0 on success, 2 on a bad config or weights file or without Detectron2.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.config_file:
        parser.error("--config is required")
    if not require("detectron2", "train_net"):
        return 2
    from transfer.detection.d2.trainer import run

    return run(args)


if __name__ == "__main__":
    sys.exit(cli())

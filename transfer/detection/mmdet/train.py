"""Fine-tune a converted backbone with MMDetection (Mask R-CNN / Faster R-CNN R50-C4).

Examples::

    python tools/convert_to_mmdet.py backbone.pth imsvd_r50_mmdet.pth
    imsvd-mmdet-train mask_rcnn_C4_1x.py --weights imsvd_r50_mmdet.pth
    torchrun --nproc_per_node 8 -m transfer.detection.mmdet.train mask_rcnn_C4_1x.py \\
        --launcher pytorch --weights imsvd_r50_mmdet.pth
    imsvd-mmdet-train mask_rcnn_C4_1x.py --eval-only \\
        --weights output/mmdet/mask_rcnn_C4_1x/iter_90000.pth

A bare config name resolves inside transfer/configs/mmdet/; a path works too. A thin wrapper over
mmengine's Runner, as MMDetection's own tools/train.py: ``--cfg-options k=v`` overrides the
config, ``--resume`` continues from the last checkpoint in the work dir. Weights are read with
``torch.load(weights_only=True)`` only; the recorded arch must match the config's depth.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from transfer.detection.stacks import CfgOptionsAction, require


def build_parser() -> argparse.ArgumentParser:
    """The command line (MMDetection's tools/train.py options plus weights and eval-only).

    Built without importing MMDetection, so ``--help`` works where it is not installed.

    Returns:
        The parser.
    """
    parser = argparse.ArgumentParser(prog="imsvd-mmdet-train", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="config name in transfer/configs/mmdet/ or a path")
    parser.add_argument("--work-dir", help="output folder (default: the config's work_dir)")
    parser.add_argument(
        "--weights",
        help="converted backbone (.pth, tools/convert_to_mmdet.py); with "
        "--eval-only: a trained checkpoint",
    )
    parser.add_argument(
        "--no-weights",
        action="store_true",
        help="train from random initialisation on purpose (otherwise weights are required)",
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue from the last checkpoint in the work dir"
    )
    parser.add_argument("--eval-only", action="store_true", help="evaluate --weights only")
    parser.add_argument(
        "--cfg-options",
        nargs="+",
        action=CfgOptionsAction,
        help="override config entries: key=value (e.g. optim_wrapper.optimizer.lr=0.02)",
    )
    parser.add_argument(
        "--launcher", choices=["none", "pytorch", "slurm"], default="none", help="job launcher"
    )
    # torch.distributed.launch passes --local-rank; torchrun sets LOCAL_RANK instead.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=0, help=argparse.SUPPRESS)
    return parser


def cli(argv: Optional[Sequence[str]] = None) -> int:
    """Parse arguments; if MMDetection imports, run (:func:`transfer.detection.mmdet.trainer.run`).

    Args:
        argv: arguments (defaults to sys.argv[1:]).

    Returns:
        Exit code: 0 on success, 2 on a bad config or weights file or without MMDetection.
    """
    args = build_parser().parse_args(argv)
    if args.weights and args.no_weights:
        print("mmdet_train: error: --weights and --no-weights exclude each other", file=sys.stderr)
        return 2
    if not require("mmdet", "mmdet_train"):
        return 2
    from transfer.detection.mmdet.trainer import run

    return run(args)


if __name__ == "__main__":
    sys.exit(cli())

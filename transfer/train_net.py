#!/usr/bin/env python
"""Fine-tune a converted backbone with Detectron2, e.g. ``python transfer/train_net.py --config
mask_rcnn_C4_1x.yaml MODEL.WEIGHTS imsvd_r50.pkl`` (the same command as ``imsvd-d2-train``).

The command line and its documentation are in :mod:`transfer.detection.d2.train`.
"""

import sys

from transfer.detection.d2.train import cli

if __name__ == "__main__":
    sys.exit(cli())

#!/usr/bin/env python
"""Convert a backbone checkpoint to MMDetection weights (``transfer.detection.mmdet.convert``)."""

import sys

from transfer.detection.mmdet.convert import convert, main  # noqa: F401  (convert: library call)

if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Convert a backbone checkpoint to Detectron2's weights (``transfer.detection.d2.convert``)."""

import sys

from transfer.detection.d2.convert import convert, main  # noqa: F401  (convert: library call)

if __name__ == "__main__":
    sys.exit(main())

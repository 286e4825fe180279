#!/usr/bin/env python
"""Convert a backbone checkpoint to MMDetection weights (``transfer.convert_mmdet``)."""

import sys

from transfer.convert_mmdet import convert, main  # noqa: F401  (convert: the library call)

if __name__ == "__main__":
    sys.exit(main())

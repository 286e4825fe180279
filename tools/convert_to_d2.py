#!/usr/bin/env python
"""Convert a backbone checkpoint to Detectron2's weight pickle (``transfer.convert_d2``)."""

import sys

from transfer.convert_d2 import convert, main  # noqa: F401  (convert: the library call)

if __name__ == "__main__":
    sys.exit(main())

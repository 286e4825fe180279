#!/usr/bin/env python
"""Export a backbone as this project's format or a bare state_dict (``pretrain.export``)."""

import sys

from pretrain.export import export, main  # noqa: F401  (export: the library call, for scripts)

if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Print, space-separated, ``name==version`` of every locked package installed at another version.

Usage: ``python tools/lock_check.py constraints.txt`` (run by the target venv's Python;
tools/setup_env.sh reinstalls what it prints). Packages of the lock that are not installed are
left alone (a set-up without MMDetection does not install its dependencies). Standard library
only.
"""

from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, version
from typing import List


def off_lock(lock_text: str) -> List[str]:
    """The ``name==version`` lines of ``lock_text`` whose package is installed at another version.

    A version with a local label (``2.14.1+cpu``) counts as ``2.14.1`` against a pin without one
    (PEP 440's rule for ``==``, so pip would not reinstall it either).

    Args:
        lock_text: a pip constraints file of ``name==version`` lines and ``#`` comments.

    Returns:
        The pins to reinstall, in the lock's order.
    """
    out = []
    for line in lock_text.splitlines():
        spec = line.split("#")[0].strip()
        if "==" not in spec:
            continue
        name, want = (part.strip() for part in spec.split("==", 1))
        try:
            got = version(name)
        except PackageNotFoundError:
            continue
        # a local label ("2.14.1+cpu") satisfies a pin without one, as it does for pip
        if got != want and not ("+" not in want and got.split("+", 1)[0] == want):
            out.append(f"{name}=={want}")
    return out


if __name__ == "__main__":
    with open(sys.argv[1], encoding="utf-8") as f:
        print(" ".join(off_lock(f.read())))

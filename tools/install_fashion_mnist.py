#!/usr/bin/env python
"""Install Fashion-MNIST (the Debian package ``dataset-fashion-mnist``) for the demo.

Runs ``apt-get install`` as root or with password-less sudo; otherwise it prints the command to
run. The reading and export of the idx files live in ``pretrain.data.fashion_mnist``.

    python tools/install_fashion_mnist.py [--data-dir /usr/share/datasets/fashion-mnist]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pretrain.data.fashion_mnist import DEFAULT_DIR, is_complete  # noqa: E402
from pretrain.errors import IMSVDError  # noqa: E402

APT_PACKAGE = "dataset-fashion-mnist"


class DatasetMissingError(IMSVDError, RuntimeError):
    """Fashion-MNIST is not installed and could not be installed here."""


def install_command() -> str:
    """The command a user runs to install the dataset package."""
    prefix = "" if hasattr(os, "geteuid") and os.geteuid() == 0 else "sudo "
    return f"{prefix}apt-get install -y {APT_PACKAGE}"


def ensure_installed(data_dir: Path = DEFAULT_DIR, allow_install: bool = True) -> Path:
    """Return the folder of the idx files, installing the Debian package when possible.

    Args:
        data_dir: where the package puts the files.
        allow_install: try ``apt-get install`` (as root, or with password-less sudo).

    Raises:
        DatasetMissingError: with the exact command to run when installation is not possible.
    """
    if is_complete(data_dir):
        return data_dir
    if allow_install and shutil.which("apt-get"):
        if os.geteuid() == 0:
            cmd = ["apt-get", "install", "-y", APT_PACKAGE]
        elif (
            shutil.which("sudo")
            and subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode == 0
        ):
            cmd = ["sudo", "-n", "apt-get", "install", "-y", APT_PACKAGE]
        else:
            cmd = None
        if cmd is not None:
            print(f"installing Fashion-MNIST: {' '.join(cmd)}", flush=True)
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:  # stale package lists: refresh once and retry
                subprocess.run(cmd[:-3] + ["update"], capture_output=True)
                res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode == 0 and is_complete(data_dir):
                return data_dir
    raise DatasetMissingError(
        f"Fashion-MNIST not found in {data_dir}. Install it with:\n    {install_command()}"
    )


def main(argv: list[str] | None = None) -> int:
    """Install when missing; print where the files are. Returns the exit code."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=str(DEFAULT_DIR), help="where the package puts the files")
    args = p.parse_args(argv)
    try:
        print(ensure_installed(Path(args.data_dir)))
    except DatasetMissingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Fashion-MNIST, the demo's built-in dataset: locate (or install) it and export an image tree.

The Debian package ``dataset-fashion-mnist`` installs the original idx files under
/usr/share/datasets/fashion-mnist. The demo exports them once to a class-folder tree of PNGs
(``<out>/train/<class>/<index>.png``, ``<out>/test/...``) that the ordinary ImageFolder readers
of pretraining and evaluation consume.
"""

from __future__ import annotations

import gzip
import os
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
from PIL import Image

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
APT_PACKAGE = "dataset-fashion-mnist"
CLASSES = (
    "t-shirt_top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle_boot",
)
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_MARKER = ".export_complete"


class DatasetMissingError(RuntimeError):
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
    if all((data_dir / f).is_file() for pair in FILES.values() for f in pair):
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
            if res.returncode == 0 and all(
                (data_dir / f).is_file() for pair in FILES.values() for f in pair
            ):
                return data_dir
    raise DatasetMissingError(
        f"Fashion-MNIST not found in {data_dir}. Install it with:\n    {install_command()}"
    )


def read_idx(path: Path) -> np.ndarray:
    """Read a gzipped idx file (images: N x 28 x 28 uint8; labels: N uint8)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    (magic,) = struct.unpack(">I", data[:4])
    ndim = magic & 0xFF
    if magic >> 8 != 0x08 or ndim not in (1, 3):
        raise ValueError(f"{path}: not an idx uint8 file (magic {magic:#x})")
    dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise ValueError(f"{path}: truncated ({arr.size} bytes for shape {dims})")
    return arr.reshape(dims)


def load_split(split: str, data_dir: Path = DEFAULT_DIR) -> tuple[np.ndarray, np.ndarray]:
    """Images (N x 28 x 28 uint8) and labels (N,) of ``split`` ("train" or "test")."""
    img_file, lbl_file = FILES[split]
    return read_idx(data_dir / img_file), read_idx(data_dir / lbl_file).astype(np.int64)


def class_folders() -> list[str]:
    """Folder names "<label>_<name>": sorted order equals the label order."""
    return [f"{i}_{name}" for i, name in enumerate(CLASSES)]


def export_image_tree(out_dir: Path, data_dir: Path = DEFAULT_DIR) -> Path:
    """Write ``out_dir/{train,test}/<class>/<index>.png`` once (a marker file makes it idempotent).

    Returns:
        ``out_dir``.
    """
    out_dir = Path(out_dir)
    if (out_dir / _MARKER).is_file():
        return out_dir
    for split in FILES:
        images, labels = load_split(split, data_dir)
        split_dir = out_dir / split
        names = class_folders()
        for name in names:
            (split_dir / name).mkdir(parents=True, exist_ok=True)
        for i, (img, lbl) in enumerate(zip(images, labels)):
            Image.fromarray(img).save(split_dir / names[lbl] / f"{i:05d}.png")
    (out_dir / _MARKER).write_text("ok\n")
    return out_dir

"""Fashion-MNIST, the demo's built-in dataset: read its idx files and export an image tree.

The Debian package ``dataset-fashion-mnist`` installs the original idx files under
/usr/share/datasets/fashion-mnist (``tools/install_fashion_mnist.py`` installs it; the library
never runs a package manager). The demo exports them once to a class-folder tree of PNGs
(``<out>/train/<class>/<index>.png``, ``<out>/test/...``) that the ordinary ImageFolder readers
of pretraining and evaluation consume.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
from PIL import Image

from pretrain.data.images import DataError

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
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


def is_complete(data_dir: Path = DEFAULT_DIR) -> bool:
    """True when ``data_dir`` holds the four idx files of both splits."""
    return all((Path(data_dir) / f).is_file() for pair in FILES.values() for f in pair)


def read_idx(path: Path) -> np.ndarray:
    """Read a gzipped idx file (images: N x 28 x 28 uint8; labels: N uint8).

    Raises:
        DataError: unreadable or not gzip, not an idx uint8 file, or truncated.
    """
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:  # missing, unreadable, not gzip, truncated stream
        raise DataError(f"{path}: cannot read the gzipped idx file: {exc}") from None
    (magic,) = struct.unpack(">I", data[:4].rjust(4, b"\0"))
    ndim = magic & 0xFF
    if magic >> 8 != 0x08 or ndim not in (1, 3):
        raise DataError(f"{path}: not an idx uint8 file (magic {magic:#x})")
    if len(data) < 4 + 4 * ndim:
        raise DataError(f"{path}: truncated ({len(data)} bytes, no complete idx header)")
    dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise DataError(f"{path}: truncated ({arr.size} bytes for shape {dims})")
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

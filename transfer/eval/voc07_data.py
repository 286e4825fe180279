"""The PASCAL VOC2007 tree of the VOC07 SVM evaluation (docs/PROTOCOLS.md section 3.2): the
folder, its classes, the label files of a split and the images they list.

Labels come from ``ImageSets/Main/<class>_<split>.txt``: 1 positive, -1 negative, 0
("difficult"); images from ``JPEGImages/<id>.jpg``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pretrain.data.datasets import ImageDataset
from pretrain.errors import IMSVDError

logger = logging.getLogger("imsvd.voc07")

VOC_CLASSES = (
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)


class VOCError(IMSVDError, ValueError):
    """The VOC tree is missing files or holds malformed lines."""


def find_voc2007(root: str | Path) -> Path:
    """Accept ``VOCdevkit/VOC2007`` or its ``VOCdevkit`` parent; return the VOC2007 folder."""
    root = Path(root)
    for cand in (root, root / "VOC2007"):
        if (cand / "ImageSets" / "Main").is_dir() and (cand / "JPEGImages").is_dir():
            return cand
    raise VOCError(
        f"{root} is not a VOC2007 folder: expected ImageSets/Main and JPEGImages in it "
        "(or in its VOC2007 subfolder)"
    )


def discover_classes(voc_dir: Path, split: str) -> list[str]:
    """Classes with an ImageSets/Main/<class>_<split>.txt file, in the standard VOC order."""
    main = voc_dir / "ImageSets" / "Main"
    found = {p.name[: -len(f"_{split}.txt")] for p in main.glob(f"*_{split}.txt")}
    if not found:
        raise VOCError(f"no ImageSets/Main/<class>_{split}.txt files in {voc_dir}")
    standard = [c for c in VOC_CLASSES if c in found]
    return standard + sorted(found - set(standard))


def _read_label_file(path: Path) -> dict[str, int]:
    """{image id: label (1 / -1 / 0)} of one ``<class>_<split>.txt`` file, in file order.

    Raises:
        VOCError: a missing file, a malformed line, or an image listed twice with different
            labels (naming the image id, file and both lines). An image listed twice with the
            same label is kept once, with a warning.
    """
    if not path.is_file():
        raise VOCError(f"missing label file {path}")
    col: dict[str, int] = {}
    line_of: dict[str, int] = {}
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or parts[1] not in ("1", "-1", "0"):
            raise VOCError(f"{path}:{lineno}: expected '<image id> <1|-1|0>', got {line!r}")
        img, lab = parts[0], int(parts[1])
        if img in col:
            if col[img] != lab:
                raise VOCError(
                    f"{path}:{lineno}: image {img} is listed again with label {lab}; line "
                    f"{line_of[img]} gives it {col[img]}"
                )
            logger.warning("%s:%d: image %s listed twice (same label)", path, lineno, img)
            continue
        col[img], line_of[img] = lab, lineno
    return col


def read_split(voc_dir: Path, split: str, classes: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Image ids and the (n, K) label matrix (1 / -1 / 0) of one split.

    Args:
        voc_dir: the VOC2007 folder.
        split: "trainval" or "test".
        classes: class names (one file each).
    Returns:
        (ids in the order of the first class file, labels int8 (n, K)).
    Raises:
        VOCError: a missing file, a malformed line, an image listed twice with different labels
            in one file (naming the image id, file and both lines), files that list different
            images, or a class without any positive (1) image in this split (its AP would be
            undefined; naming the class and file). An image listed twice with the same label is
            kept once, with a warning.
    """
    ids: list[str] = []
    index: dict[str, int] = {}
    columns = []
    for ci, cls in enumerate(classes):
        path = voc_dir / "ImageSets" / "Main" / f"{cls}_{split}.txt"
        col = _read_label_file(path)
        if not any(v == 1 for v in col.values()):
            raise VOCError(
                f"{path}: class '{cls}' has no positive (1) image in split '{split}': an SVM "
                "cannot be trained / its AP is undefined"
            )
        if ci == 0:
            ids = list(col)
            index = {i: n for n, i in enumerate(ids)}
        elif set(col) != set(index):
            only_here = sorted(set(col) - set(index))[:3]
            only_first = sorted(set(index) - set(col))[:3]
            raise VOCError(
                f"{path} lists different images than {classes[0]}_{split}.txt (only in {path.name}:"
                f" {only_here}; only in {classes[0]}_{split}.txt: {only_first})"
            )
        columns.append(col)
    labels = np.zeros((len(ids), len(classes)), dtype=np.int8)
    for ci, col in enumerate(columns):
        for img, lab in col.items():
            labels[index[img], ci] = lab
    return ids, labels


def voc_dataset(voc_dir: Path, ids: Sequence[str], transform: Any, strict: bool = True):
    """Dataset of (image, row index) over JPEGImages/<id>.jpg.

    An unreadable image is left out (its row index never appears in the extracted labels) and
    counted, or, with ``strict``, raises naming the file; it is never replaced by another one.
    """
    samples = []
    for n, img in enumerate(ids):
        path = voc_dir / "JPEGImages" / f"{img}.jpg"
        if not path.is_file():
            raise VOCError(f"image {path} listed in ImageSets is missing")
        samples.append((str(path), n))
    return ImageDataset(samples, transform=transform, strict=strict)


def require_positives(labels: np.ndarray, classes: Sequence[str], where: str) -> None:
    """Raise VOCError naming every class without a positive (1) row in ``labels`` (n, K)."""
    missing = [c for j, c in enumerate(classes) if not (np.asarray(labels)[:, j] == 1).any()]
    if missing:
        raise VOCError(
            f"{where}: class(es) {missing} have no positive (1) image: an SVM cannot be trained "
            "/ the AP is undefined"
        )

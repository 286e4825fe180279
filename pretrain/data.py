"""Datasets and the pretraining loader.

Two on-disk layouts are supported:

* an ImageFolder tree (ImageNet ``train/`` layout): ``root/<class>/<image>``; classes are the
  sorted sub-folder names and labels their position in that order;
* a list file of ``path label`` lines (the official Places205 CSV style; ``path,label`` is also
  accepted), paths relative to ``root`` (or absolute). Blank lines and ``#`` comments are ignored.

Unreadable or corrupt images never crash an epoch: in the default mode they are logged once,
counted and skipped; with ``strict=True`` the first one raises :class:`CorruptImageError`
naming the file.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any, Callable, List, Optional, Sequence, Tuple

from PIL import Image
from torch.utils.data import Dataset

logger = logging.getLogger("imsvd.data")

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# How many consecutive unreadable files a map-style dataset walks over before it gives up: a
# whole directory of broken files is a configuration problem, not a few corrupt images.
_MAX_CONSECUTIVE_BAD = 64

# A list-file line: a path, then a separator (whitespace or one comma), then an integer label.
_LIST_LINE = re.compile(r"^(?P<path>.+?)\s*(?:,|\s)\s*(?P<label>[+-]?\d+)$")


class DataError(ValueError):
    """Bad data configuration: missing root, empty tree, malformed list file, unknown key."""


class CorruptImageError(DataError):
    """An image file that cannot be decoded (raised only in strict mode)."""


# Exceptions PIL raises for unreadable / truncated / non-image files.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def load_rgb(path: str) -> Image.Image:
    """Open and fully decode an image as RGB.

    Args:
        path: image file.
    Returns:
        A loaded RGB PIL image.
    Raises:
        CorruptImageError: the file is missing, truncated or not an image.
    """
    try:
        with Image.open(path) as img:
            img.load()  # decode now so truncation errors surface here, not in a transform
            return img.convert("RGB")
    except _DECODE_ERRORS as exc:
        raise CorruptImageError(f"cannot read image {path!r}: {exc}") from exc


def scan_image_folder(root: str) -> Tuple[List[Tuple[str, int]], List[str]]:
    """List ``root/<class>/**/<image>`` samples, classes sorted by name.

    Args:
        root: dataset root with one sub-folder per class.
    Returns:
        (samples as (path, label) sorted by class then path, class names).
    Raises:
        DataError: root missing, no class folders, or no images at all.
    """
    if not os.path.isdir(root):
        raise DataError(f"data root {root!r} does not exist or is not a directory")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DataError(f"data root {root!r} has no class sub-folders (expected root/<class>/img)")
    samples: List[Tuple[str, int]] = []
    for label, cls in enumerate(classes):
        cls_dir = os.path.join(root, cls)
        files = []
        for dirpath, dirnames, filenames in os.walk(cls_dir, followlinks=True):
            dirnames.sort()
            for name in filenames:
                if name.lower().endswith(IMG_EXTENSIONS):
                    files.append(os.path.join(dirpath, name))
        samples.extend((p, label) for p in sorted(files))
    if not samples:
        raise DataError(
            f"data root {root!r} has {len(classes)} class folders but no images with extensions "
            f"{', '.join(IMG_EXTENSIONS)}"
        )
    return samples, classes


def parse_list_file(list_file: str, root: Optional[str] = None) -> List[Tuple[str, int]]:
    """Parse a ``path label`` (or ``path,label``) list file.

    Args:
        list_file: text file, one sample per line.
        root: directory relative paths are resolved against (default: the list file's folder).
    Returns:
        Samples as (path, label) in file order.
    Raises:
        DataError: file missing, a malformed line (names file and line number), negative label,
            or no samples.
    """
    if not os.path.isfile(list_file):
        raise DataError(f"list file {list_file!r} does not exist")
    if root is None:
        root = os.path.dirname(os.path.abspath(list_file))
    elif not os.path.isdir(root):
        raise DataError(f"data root {root!r} (for list file {list_file!r}) is not a directory")
    samples: List[Tuple[str, int]] = []
    with open(list_file, "r", encoding="utf-8") as f:
        for lineno, raw in enumerate(f, start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            m = _LIST_LINE.match(line)
            if m is None:
                raise DataError(
                    f"{list_file}:{lineno}: malformed line {line!r} "
                    "(expected 'relative/path.jpg <integer label>')"
                )
            label = int(m.group("label"))
            if label < 0:
                raise DataError(f"{list_file}:{lineno}: negative label {label} in line {line!r}")
            path = m.group("path").strip()
            samples.append((path if os.path.isabs(path) else os.path.join(root, path), label))
    if not samples:
        raise DataError(f"list file {list_file!r} contains no samples")
    return samples


class ImageDataset(Dataset):
    """(image, label) samples from a list of files, robust to corrupt images.

    Map-style datasets must return something for every index, so in non-strict mode a sample
    whose file cannot be decoded is replaced by the next readable one (index + 1, wrapping); the
    bad file is logged once per process and counted in ``num_skipped``. The pretraining loader
    uses :meth:`try_load` instead, which drops bad files from the batch.

    Attributes:
        samples: list of (path, label).
        classes: class names (ImageFolder) or None (list file).
        transform: applied to the RGB PIL image.
        strict: raise CorruptImageError instead of skipping.
        num_skipped: unreadable files met by this process.
    """

    def __init__(
        self,
        samples: Sequence[Tuple[str, int]],
        transform: Optional[Callable[[Image.Image], Any]] = None,
        strict: bool = False,
        classes: Optional[List[str]] = None,
    ) -> None:
        self.samples = list(samples)
        self.targets = [label for _, label in self.samples]
        self.transform = transform
        self.strict = strict
        self.classes = classes
        self.num_skipped = 0
        self._bad: set = set()

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def num_classes(self) -> int:
        """Number of classes (class folders, or max label + 1 for list files)."""
        if self.classes is not None:
            return len(self.classes)
        return max(self.targets) + 1

    def note_bad(self, index: int, exc: Exception) -> None:
        """Count and log (once per file) an unreadable sample."""
        self.num_skipped += 1
        if index not in self._bad:
            self._bad.add(index)
            logger.warning(
                "skipping unreadable image (%d so far in this process): %s", self.num_skipped, exc
            )

    def try_load(self, index: int) -> Optional[Image.Image]:
        """Decode sample ``index`` as RGB; None (counted, logged) if unreadable and not strict."""
        path = self.samples[index][0]
        try:
            return load_rgb(path)
        except CorruptImageError as exc:
            if self.strict:
                raise
            self.note_bad(index, exc)
            return None

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        n = len(self.samples)
        for step in range(min(n, _MAX_CONSECUTIVE_BAD)):
            i = (index + step) % n
            img = self.try_load(i)
            if img is not None:
                if self.transform is not None:
                    img = self.transform(img)
                return img, self.samples[i][1]
        raise DataError(
            f"{min(n, _MAX_CONSECUTIVE_BAD)} consecutive unreadable images starting at "
            f"{self.samples[index][0]!r}: check the data root"
        )


def build_image_dataset(
    root: Optional[str] = None,
    list_file: Optional[str] = None,
    transform: Optional[Callable[[Image.Image], Any]] = None,
    strict: bool = False,
) -> ImageDataset:
    """Build an (image, label) dataset from an ImageFolder tree or a list file.

    Args:
        root: ImageFolder root, or the directory list-file paths are relative to.
        list_file: optional ``path label`` file; when given, ``root`` is only the path prefix
            (default: the list file's directory).
        transform: callable applied to each RGB PIL image.
        strict: raise CorruptImageError on the first unreadable image instead of skipping it.
    Returns:
        An :class:`ImageDataset`.
    Raises:
        DataError: neither root nor list_file, missing paths, empty tree, malformed list line.
    """
    if list_file:
        samples = parse_list_file(str(list_file), None if root is None else str(root))
        return ImageDataset(samples, transform=transform, strict=strict)
    if not root:
        raise DataError("build_image_dataset needs data root (ImageFolder tree) or a list_file")
    samples, classes = scan_image_folder(str(root))
    return ImageDataset(samples, transform=transform, strict=strict, classes=classes)

"""Labelled image datasets: ImageFolder trees, "path label" list files, synthetic images.

Two on-disk layouts are supported:

* an ImageFolder tree (ImageNet ``train/`` layout): ``root/<class>/<image>``; classes are the
  sorted sub-folder names and labels their position in that order;
* a list file of ``path label`` lines (the official Places205 CSV style; ``path,label`` is also
  accepted), paths relative to ``root`` (or absolute). Blank lines and ``#`` comments are ignored.

Unreadable or corrupt images never crash an epoch, and :class:`ImageDataset` never replaces
them by another sample: in the default mode they are logged once, counted and dropped from their
batch (the dataset yields None and :func:`collate_readable` leaves it out); with ``strict=True``
the first one raises :class:`CorruptImageError` naming the file. (The two-view pretraining loader
of :mod:`pretrain.data.loader` does replace them, to keep every rank's batches full.)

Every image is decoded by :func:`pretrain.data.images.load_rgb` (any PIL mode to 8-bit RGB by its
meaning).

Directory symlinks below a class folder are not followed (a link back to an ancestor would list
the same images forever); they are logged as skipped. A class folder that is itself a symlink is
read (a common way to assemble a tree from several disks).
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any, Callable, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from torch.utils.data import Dataset, default_collate

from pretrain.data.images import IMG_EXTENSIONS, CorruptImageError, DataError, load_rgb

logger = logging.getLogger("imsvd.data")

# A list-file line: a path, then a separator (whitespace or one comma), then an integer label.
_LIST_LINE = re.compile(r"^(?P<path>.+?)\s*(?:,|\s)\s*(?P<label>[+-]?\d+)$")


def scan_image_folder(
    root: str, class_names: Optional[Sequence[str]] = None
) -> Tuple[List[Tuple[str, int]], List[str]]:
    """List ``root/<class>/**/<image>`` samples.

    Without ``class_names`` the classes are the sorted sub-folder names and a label is the
    position in that order. With ``class_names`` (the classes of a training split) each folder
    is labelled by the position of its NAME in that list, so a split that lacks some classes
    still agrees with the training labels; a folder that is not in the list is an error.

    Directory symlinks inside a class folder are not followed (logged as skipped); a class folder
    that is a symlink is read, unless it points at ``root`` or one of its ancestors.

    Args:
        root: dataset root with one sub-folder per class.
        class_names: optional class list to label by (e.g. the train split's ``classes``).
    Returns:
        (samples as (path, label) sorted by class folder then path, class names: ``class_names``
        when given, else the folders found).
    Raises:
        DataError: root missing, no class folders, a folder not in ``class_names``, or no images.
    """
    if not os.path.isdir(root):
        raise DataError(f"data root {root!r} does not exist or is not a directory")
    folders = _class_folders(root)
    classes = folders if class_names is None else _known_classes(root, folders, class_names)
    index = {name: i for i, name in enumerate(classes)}
    samples: List[Tuple[str, int]] = []
    links: List[str] = []
    for name in folders:
        files = _images_under(os.path.join(root, name), links)
        samples.extend((p, index[name]) for p in sorted(files))
    if links:
        logger.warning(
            "%s: %d symlinked director%s inside class folders not followed: %s",
            root,
            len(links),
            "y" if len(links) == 1 else "ies",
            _preview(links),
        )
    if not samples:
        raise DataError(
            f"data root {root!r} has {len(folders)} class folders but no images with extensions "
            f"{', '.join(IMG_EXTENSIONS)}"
        )
    return samples, classes


def _class_folders(root: str) -> List[str]:
    """The sorted class sub-folders of ``root`` (a link to ``root`` or above it is skipped)."""
    root_real = os.path.realpath(root)
    folders = []
    for e in sorted(os.scandir(root), key=lambda e: e.name):
        if e.name.startswith(".") or not e.is_dir():
            continue
        real = os.path.realpath(e.path)
        if e.is_symlink() and (real == root_real or root_real.startswith(real + os.sep)):
            logger.warning(
                "%s: class folder %r links to the root or above it; skipped", root, e.name
            )
            continue
        folders.append(e.name)
    if not folders:
        raise DataError(f"data root {root!r} has no class sub-folders (expected root/<class>/img)")
    return folders


def _known_classes(root: str, folders: List[str], class_names: Sequence[str]) -> List[str]:
    """``class_names`` as a list, after checking every folder is one of them."""
    classes = list(class_names)
    unknown = [f for f in folders if f not in classes]
    if unknown:
        raise DataError(
            f"data root {root!r}: class folder(s) {unknown} are not classes of the training "
            f"split ({len(classes)} classes: {_preview(classes)})"
        )
    missing = sorted(set(classes) - set(folders))
    if missing:
        logger.info(
            "%s has %d of the %d training classes (absent: %s)",
            root,
            len(folders),
            len(classes),
            _preview(missing),
        )
    return classes


def _images_under(folder: str, links: List[str]) -> List[str]:
    """Image files below ``folder`` (directory links not followed: appended to ``links``)."""
    files = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames.sort()
        links += [
            os.path.join(dirpath, d) for d in dirnames if os.path.islink(os.path.join(dirpath, d))
        ]
        files += [os.path.join(dirpath, f) for f in filenames if f.lower().endswith(IMG_EXTENSIONS)]
    return files


def _preview(items: Sequence[Any], n: int = 5) -> str:
    shown = ", ".join(str(x) for x in list(items)[:n])
    return shown + (f", ... ({len(items)} in all)" if len(items) > n else "")


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
    """(image, label) samples from a list of files; an unreadable file is dropped, never replaced.

    In non-strict mode an item whose file cannot be decoded is ``None`` (logged once per file
    and counted in ``num_skipped`` of the process that met it); batch such items with
    :func:`collate_readable`, which leaves them out and reports how many it left out. With
    ``strict=True`` the first unreadable file raises :class:`CorruptImageError` naming it.

    Attributes:
        samples: list of (path, label).
        classes: class names (ImageFolder) or None (list file).
        transform: applied to the RGB PIL image.
        strict: raise CorruptImageError instead of dropping.
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
        """Number of classes (class names, or max label + 1 for list files)."""
        if self.classes is not None:
            return len(self.classes)
        return max(self.targets) + 1

    def note_bad(self, index: int, exc: Exception) -> None:
        """Count and log (once per file) an unreadable sample."""
        self.num_skipped += 1
        if index not in self._bad:
            self._bad.add(index)
            logger.warning(
                "dropping unreadable image (%d so far in this process): %s", self.num_skipped, exc
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

    def __getitem__(self, index: int) -> Optional[Tuple[Any, int]]:
        img = self.try_load(index)
        if img is None:
            return None
        if self.transform is not None:
            img = self.transform(img)
        return img, self.samples[index][1]


def collate_readable(items: Sequence[Any]) -> Tuple[Any, Any, int]:
    """Batch the readable items of a batch of (input, label) items.

    Args:
        items: dataset items; ``None`` marks an unreadable sample (see :class:`ImageDataset`).
    Returns:
        (inputs, labels, dropped): the default-collated readable items (both None when no item
        was readable) and the number of None items left out.
    """
    good = [it for it in items if it is not None]
    dropped = len(items) - len(good)
    if not good:
        return None, None, dropped
    inputs, labels = default_collate(good)
    return inputs, labels, dropped


def build_image_dataset(
    root: Optional[str] = None,
    list_file: Optional[str] = None,
    transform: Optional[Callable[[Image.Image], Any]] = None,
    strict: bool = False,
    class_names: Optional[Sequence[str]] = None,
) -> ImageDataset:
    """Build an (image, label) dataset from an ImageFolder tree or a list file.

    Args:
        root: ImageFolder root, or the directory list-file paths are relative to.
        list_file: optional ``path label`` file; when given, ``root`` is only the path prefix
            (default: the list file's directory).
        transform: callable applied to each RGB PIL image.
        strict: raise CorruptImageError on the first unreadable image instead of dropping it.
        class_names: ImageFolder only: label folders by their position in this list (the
            training split's classes) instead of their own sorted order.
    Returns:
        An :class:`ImageDataset`.
    Raises:
        DataError: neither root nor list_file, missing paths, empty tree, malformed list line,
            a class folder not in ``class_names``.
    """
    if list_file:
        samples = parse_list_file(str(list_file), None if root is None else str(root))
        return ImageDataset(samples, transform=transform, strict=strict)
    if not root:
        raise DataError("build_image_dataset needs data root (ImageFolder tree) or a list_file")
    samples, classes = scan_image_folder(str(root), class_names)
    return ImageDataset(samples, transform=transform, strict=strict, classes=classes)


def build_train_val_datasets(
    train_root: Optional[str],
    train_list: Optional[str],
    val_root: Optional[str],
    val_list: Optional[str],
    train_transform: Optional[Callable[[Image.Image], Any]] = None,
    val_transform: Optional[Callable[[Image.Image], Any]] = None,
    strict: bool = False,
) -> Tuple[ImageDataset, ImageDataset]:
    """A train/val pair whose labels mean the same classes.

    Labels come from the TRAIN split: a val ImageFolder is labelled by the train split's class
    names (a val tree missing some classes keeps the train labels of the others); a val class
    the train split lacks is an error naming it. List files carry integer labels: every val
    label must occur in the train split (a train ImageFolder's labels are 0..classes-1).

    Args:
        train_root, train_list, val_root, val_list: as ``root`` / ``list_file`` of
            :func:`build_image_dataset` for each split (empty values count as absent).
        train_transform, val_transform: per-split transforms.
        strict: raise on the first unreadable image instead of dropping it.
    Returns:
        (train, val) datasets; ``val.classes`` is the train class list for ImageFolder pairs.
    Raises:
        DataError: a split is missing, a val class or label absent from train, or a val tree
            paired with a train list file (folder names cannot be matched to integer labels).
    """
    if not (train_root or train_list):
        raise DataError("the train split needs data.train_root (ImageFolder) or data.train_list")
    if not (val_root or val_list):
        raise DataError("the val split needs data.val_root (ImageFolder) or data.val_list")
    train = build_image_dataset(train_root or None, train_list or None, train_transform, strict)
    if not val_list:
        if train.classes is None:
            raise DataError(
                f"val ImageFolder {val_root!r} cannot be labelled like the train list file "
                f"{train_list!r} (folder names vs integer labels): give data.val_list too"
            )
        val = build_image_dataset(val_root, None, val_transform, strict, train.classes)
        return train, val
    val = build_image_dataset(val_root or None, val_list, val_transform, strict)
    extra = sorted(set(val.targets) - set(train.targets))
    if extra:
        where = f"{train_list!r}" if train_list else f"train root {train_root!r}"
        raise DataError(
            f"val list {val_list!r} has label(s) {_preview(extra)} that the train split "
            f"({where}) does not have"
        )
    if train.classes is not None:
        val.classes = train.classes
    return train, val


# --------------------------------------------------------------------------------------------
# Synthetic images (smoke runs, throughput benchmarks)
# --------------------------------------------------------------------------------------------


class SyntheticImages:
    """Random textured RGB images, a pure function of the index (labels: index % num_classes).

    Args:
        length: number of samples.
        size: side of the square images.
        num_classes: number of labels.
    """

    def __init__(self, length: int = 1024, size: int = 64, num_classes: int = 10) -> None:
        if length < 1 or size < 1:
            raise DataError(f"synthetic data needs length >= 1 and size >= 1, got {length}, {size}")
        self.length, self.size, self.num_classes = int(length), int(size), int(num_classes)

    def __len__(self) -> int:
        return self.length

    def label(self, index: int) -> int:
        """Label of sample ``index``."""
        return index % self.num_classes

    def image(self, index: int) -> Image.Image:
        """The RGB image of sample ``index``."""
        rng = np.random.default_rng([index, 0x5E7])
        coarse = max(2, self.size // 8)
        base = Image.fromarray(rng.integers(0, 256, (coarse, coarse, 3), dtype=np.uint8))
        img = np.asarray(base.resize((self.size, self.size), Image.BILINEAR), dtype=np.int16)
        noise = rng.integers(-24, 25, img.shape, dtype=np.int16)
        return Image.fromarray(np.clip(img + noise, 0, 255).astype(np.uint8))

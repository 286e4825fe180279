"""Datasets and the pretraining loader.

Two on-disk layouts are supported:

* an ImageFolder tree (ImageNet ``train/`` layout): ``root/<class>/<image>``; classes are the
  sorted sub-folder names and labels their position in that order;
* a list file of ``path label`` lines (the official Places205 CSV style; ``path,label`` is also
  accepted), paths relative to ``root`` (or absolute). Blank lines and ``#`` comments are ignored.

Unreadable or corrupt images never crash an epoch and are never replaced by another sample: in
the default mode they are logged once, counted and dropped from their batch (the dataset yields
None and :func:`collate_readable` / the two-view collate leave it out); with ``strict=True`` the
first one raises :class:`CorruptImageError` naming the file.

Every image goes through one decoder, :func:`load_rgb`, which turns any PIL mode into 8-bit RGB
by its meaning (16-bit and float data rescaled, transparency composited over white), not by
PIL's saturating ``convert("RGB")``.

Directory symlinks below a class folder are not followed (a link back to an ancestor would list
the same images forever); they are logged as skipped. A class folder that is itself a symlink is
read (a common way to assemble a tree from several disks).
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from pretrain.config import ConfigError, complete_section
from pretrain.transforms import (
    AugmentConfig,
    device_augment,
    fast_crops,
    params_to_tensors,
    reference_two_views,
    sample_two_views,
)

logger = logging.getLogger("imsvd.data")

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# A list-file line: a path, then a separator (whitespace or one comma), then an integer label.
_LIST_LINE = re.compile(r"^(?P<path>.+?)\s*(?:,|\s)\s*(?P<label>[+-]?\d+)$")


class DataError(ValueError):
    """Bad data configuration: missing root, empty tree, malformed list file, unknown key."""


class CorruptImageError(DataError):
    """An image file that cannot be decoded (raised only in strict mode)."""


# Exceptions PIL raises for unreadable / truncated / non-image files.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)

# Composited behind transparent pixels: transparent regions of web images and icons are meant to
# be seen on a light page, and a fixed colour keeps the result a pure function of the file.
ALPHA_BACKGROUND = (255, 255, 255)
# Integer modes whose values span 0..65535 (16-bit PNG / TIFF grey levels).
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
# Modes PIL converts to RGB by their meaning already (no range or alpha question).
_DIRECT_MODES = ("1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "HSV")


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in img.info


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert a decoded image of any PIL mode to 8-bit RGB by what its values mean.

    * ``I;16`` / ``I;16L`` / ``I;16B`` / ``I;16N`` / ``I`` (16-bit grey, ``I`` clipped to
      0..65535): v -> round(v / 257), so 65535 is 255 and mid-grey stays mid-grey (PIL's own
      conversion saturates every value above 255 to white).
    * ``F`` (float grey): taken as 0..1 (the convention of float image arrays), clipped,
      v -> round(255 v).
    * alpha (``RGBA``, ``LA``, ``PA``, ``RGBa``, ``La``, a ``P``/``L``/``RGB`` image with a
      transparency entry): composited over :data:`ALPHA_BACKGROUND` (white) with PIL's exact
      ``alpha_composite``, instead of exposing whatever colour hides under transparent pixels.
    * ``1``, ``L``, ``P``, ``CMYK``, ``YCbCr``, ``RGBX``, ``HSV``: PIL's conversion (CMYK as
      R = (255 - C)(255 - K) / 255, rounded); ``LAB`` through an sRGB colour transform.

    Args:
        img: a loaded PIL image.
    Returns:
        A new RGB image of the same size.
    Raises:
        CorruptImageError: a mode with no defined conversion to RGB (the message names it).
    """
    mode = img.mode
    if mode in _SIXTEEN_BIT_MODES or mode == "F":
        a = np.asarray(img)
        if mode == "F":
            a8 = np.rint(np.clip(np.nan_to_num(a.astype(np.float64)), 0.0, 1.0) * 255.0)
        else:
            # round(v / 257) in integers: 257 is odd, so v / 257 is never exactly x.5
            a8 = (2 * np.clip(a.astype(np.int64), 0, 65535) + 257) // 514
        return Image.fromarray(a8.astype(np.uint8), "L").convert("RGB")
    try:
        if _has_alpha(img):
            rgba = img.convert("RGBA")
            background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
            return Image.alpha_composite(background, rgba).convert("RGB")
        if mode in _DIRECT_MODES:
            return img.convert("RGB")
        if mode == "LAB":  # convert("RGB") would copy the L, a, b bytes as if they were R, G, B
            from PIL import ImageCms

            lab, srgb = ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB")
            return ImageCms.applyTransform(img, ImageCms.buildTransform(lab, srgb, "LAB", "RGB"))
    except (ValueError, OSError) as exc:
        raise CorruptImageError(f"image mode {mode!r} has no conversion to RGB: {exc}") from exc
    raise CorruptImageError(f"image mode {mode!r} has no defined conversion to RGB")


def load_rgb(path: str) -> Image.Image:
    """Open and fully decode an image as 8-bit RGB (any mode, see :func:`to_rgb`).

    Args:
        path: image file.
    Returns:
        A loaded RGB PIL image.
    Raises:
        CorruptImageError: the file is missing, truncated, not an image, or of a mode with no
            RGB meaning; the message names the file.
    """
    try:
        with Image.open(path) as img:
            img.load()  # decode now so truncation errors surface here, not in a transform
            return to_rgb(img)
    except CorruptImageError as exc:
        raise CorruptImageError(f"cannot read image {path!r}: {exc}") from exc
    except _DECODE_ERRORS as exc:
        raise CorruptImageError(f"cannot read image {path!r}: {exc}") from exc


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
    if class_names is None:
        classes = folders
    else:
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
                root, len(folders), len(classes), _preview(missing),
            )  # fmt: skip
    index = {name: i for i, name in enumerate(classes)}
    samples: List[Tuple[str, int]] = []
    links: List[str] = []
    for name in folders:
        files = []
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, name), followlinks=False):
            dirnames.sort()
            links += [
                os.path.join(dirpath, d)
                for d in dirnames
                if os.path.islink(os.path.join(dirpath, d))
            ]
            files += [
                os.path.join(dirpath, f) for f in filenames if f.lower().endswith(IMG_EXTENSIONS)
            ]
        samples.extend((p, index[name]) for p in sorted(files))
    if links:
        logger.warning(
            "%s: %d symlinked director%s inside class folders not followed: %s",
            root, len(links), "y" if len(links) == 1 else "ies", _preview(links),
        )  # fmt: skip
    if not samples:
        raise DataError(
            f"data root {root!r} has {len(folders)} class folders but no images with extensions "
            f"{', '.join(IMG_EXTENSIONS)}"
        )
    return samples, classes


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


# --------------------------------------------------------------------------------------------
# Two-view pretraining dataset and loader
# --------------------------------------------------------------------------------------------

# A key the loader takes next to the data section: the engine passes train.channels_last along.
LOADER_EXTRA_KEYS: Dict[str, Any] = {"channels_last": False}


REPLACEMENT_TRIES = 8


class TwoViewDataset(Dataset):
    """Both views of a sample; indexed by (epoch, index) so augmentations are pure functions of
    (seed, epoch, index) whatever process computes them.

    Items are dicts; an unreadable image is replaced by a readable one (non-strict; counted in
    the source's ``num_skipped``), see :meth:`__getitem__`.
    """

    def __init__(self, source: Any, cfg: AugmentConfig, seed: int, pipeline: str) -> None:
        if pipeline not in ("fast", "pil"):
            raise DataError(f"data.pipeline={pipeline!r}: expected 'auto', 'fast' or 'pil'")
        self.source, self.cfg, self.seed, self.pipeline = source, cfg, int(seed), pipeline

    def __len__(self) -> int:
        return len(self.source)

    def _open(self, index: int) -> Tuple[Optional[Image.Image], int]:
        src = self.source
        if isinstance(src, SyntheticImages):
            return src.image(index), src.label(index)
        path, label = src.samples[index]
        try:
            # Lazy open: the fast pipeline may still choose a reduced JPEG decoding scale.
            img = Image.open(path)
            if self.pipeline == "pil" or img.mode not in ("RGB", "L"):
                # the fast pipeline decodes lazily (JPEG draft) and converts with PIL, which is
                # right for RGB and L only: any other mode is decoded now through to_rgb
                with img:
                    img = _load_opened(img)
            return img, label
        except _DECODE_ERRORS as exc:
            err = CorruptImageError(f"cannot read image {path!r}: {exc}")
            if src.strict:
                raise err from exc
            src.note_bad(index, err)
            return None, label

    def __getitem__(self, key: Tuple[int, int]) -> Optional[Dict[str, Any]]:
        """Both views of sample ``index`` at ``epoch``; an unreadable image is replaced.

        The replacement is a deterministic function of (seed, epoch, index, attempt) drawn from
        the whole dataset (up to REPLACEMENT_TRIES tries), and its views use the augmentation
        parameters of the slot it fills; so every process's batches stay full and all ranks
        take the same steps. None only when every try was unreadable (dropped by the collate).
        """
        epoch, index = key
        item = self._item(epoch, index, index)
        n, failed = len(self.source), 0
        for attempt in range(REPLACEMENT_TRIES if n > 1 else 0):
            if item is not None:
                break
            failed += 1
            rng = np.random.default_rng([self.seed, epoch, index, attempt, 0xBAD])
            item = self._item(epoch, int(rng.integers(n)), index)
        if item is not None:
            item["unreadable"] = failed
        return item

    def _item(self, epoch: int, index: int, slot: int) -> Optional[Dict[str, Any]]:
        img, label = self._open(index)
        if img is None:
            return None
        w, h = img.size
        params = sample_two_views(self.seed, epoch, slot, w, h, self.cfg)
        try:
            if self.pipeline == "pil":
                v1, v2 = reference_two_views(img, params, self.cfg)
            else:
                a1, a2 = fast_crops(img, params, self.cfg)
                v1, v2 = torch.from_numpy(a1.copy()), torch.from_numpy(a2.copy())
        except _DECODE_ERRORS as exc:  # truncated data surfaces at decode time
            if isinstance(self.source, SyntheticImages):
                raise
            path = self.source.samples[index][0]
            err = CorruptImageError(f"cannot read image {path!r}: {exc}")
            if self.source.strict:
                raise err from exc
            self.source.note_bad(index, err)
            return None
        finally:
            if hasattr(img, "close"):
                img.close()
        return {"view1": v1, "view2": v2, "params": params, "index": index, "label": label}


def _load_opened(img: Image.Image) -> Image.Image:
    img.load()
    return to_rgb(img)


def collate_two_views(items: List[Optional[Dict[str, Any]]]) -> Dict[str, Any]:
    """Stack the readable items of a batch; ``skipped`` counts the unreadable reads (items
    that stayed unreadable plus the unreadable images that readable replacements stand for).

    Returns:
        dict with view1, view2 (uint8 (N,H,W,3) for the fast pipeline, normalised float
        (N,3,H,W) for the pil one), params1/params2 (device-stage tensors), index, label,
        skipped. N may be 0.
    """
    good = [it for it in items if it is not None]
    replaced = sum(it.get("unreadable", 0) for it in good)
    batch: Dict[str, Any] = {"skipped": len(items) - len(good) + replaced, "size": len(good)}
    if not good:
        return batch
    batch["view1"] = torch.stack([it["view1"] for it in good])
    batch["view2"] = torch.stack([it["view2"] for it in good])
    batch["params1"] = params_to_tensors([it["params"][0] for it in good])
    batch["params2"] = params_to_tensors([it["params"][1] for it in good])
    batch["index"] = torch.tensor([it["index"] for it in good], dtype=torch.int64)
    batch["label"] = torch.tensor([it["label"] for it in good], dtype=torch.int64)
    return batch


class EpochBatchSampler(Sampler):
    """Per-rank batches of (epoch, index) keys for one epoch.

    The epoch's permutation is a pure function of (seed, epoch); it is cut to a multiple of
    world_size * batch_size (drop_last), rank r takes every world_size-th index, and the first
    ``start_iter`` batches are skipped without being touched.
    """

    def __init__(
        self, n: int, batch_size: int, rank: int, world_size: int, seed: int, shuffle: bool = True
    ) -> None:
        self.n, self.batch_size, self.rank, self.world_size = n, batch_size, rank, world_size
        self.seed, self.shuffle = int(seed), shuffle
        self.epoch, self.start_iter = 0, 0

    def __len__(self) -> int:
        return self.n // (self.batch_size * self.world_size) - self.start_iter

    def num_batches(self) -> int:
        """Batches per epoch (full epoch, ignoring start_iter)."""
        return self.n // (self.batch_size * self.world_size)

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        if self.shuffle:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) & (2**63 - 1))
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        per_rank = self.num_batches() * self.batch_size
        mine = order[: per_rank * self.world_size][self.rank :: self.world_size]
        for b in range(self.start_iter, self.num_batches()):
            chunk = mine[b * self.batch_size : (b + 1) * self.batch_size]
            yield [(self.epoch, i) for i in chunk]


class PretrainLoader:
    """Two-view batches for one rank; see :func:`build_pretrain_loader`.

    Attributes:
        skipped: unreadable images met so far (as reported by the batches).
        dataset: the :class:`TwoViewDataset`.
        aug: the :class:`AugmentConfig`.
    """

    def __init__(
        self,
        dataset: TwoViewDataset,
        sampler: EpochBatchSampler,
        num_workers: int,
        pin_memory: bool,
        channels_last: bool,
    ) -> None:
        self.dataset, self.sampler = dataset, sampler
        self.aug = dataset.cfg
        self.num_workers, self.pin_memory, self.channels_last = (
            num_workers,
            pin_memory,
            channels_last,
        )
        self.skipped = 0
        self._since_last = 0

    def set_epoch(self, epoch: int, start_iter: int = 0) -> None:
        """Select the epoch; skip its first ``start_iter`` batches (resume) without decoding."""
        if not 0 <= start_iter <= self.sampler.num_batches():
            raise DataError(
                f"start_iter={start_iter} outside [0, {self.sampler.num_batches()}] batches/epoch"
            )
        self.sampler.epoch, self.sampler.start_iter = int(epoch), int(start_iter)

    def __len__(self) -> int:
        """Batches per (full) epoch, drop_last."""
        return self.sampler.num_batches()

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        loader = DataLoader(
            self.dataset,
            batch_sampler=self.sampler,
            num_workers=self.num_workers,
            collate_fn=collate_two_views,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
        )
        for batch in loader:
            self.skipped += batch["skipped"]
            self._since_last += batch["skipped"]
            if batch["size"] == 0:  # still yielded: in DDP every rank must see every batch
                logger.warning("a batch whose images were all unreadable (it will be skipped)")
            yield batch

    def pop_skipped(self) -> int:
        """Unreadable images since the previous call (for logging)."""
        n, self._since_last = self._since_last, 0
        return n

    def prepare(
        self, batch: Dict[str, Any], device: Union[str, torch.device]
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Finish both views on ``device``: normalised float32 (N, 3, S, S) each.

        Args:
            batch: a batch from iterating this loader.
            device: where the model runs; the fast pipeline's colour ops run there.
        Returns:
            (x1, x2), channels_last if data.channels_last.
        """
        device = torch.device(device)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        if self.dataset.pipeline == "pil":
            return tuple(  # type: ignore[return-value]
                batch[k].to(device, non_blocking=True).contiguous(memory_format=fmt)
                for k in ("view1", "view2")
            )
        out = []
        for k in ("1", "2"):
            views = batch["view" + k].to(device, non_blocking=True)
            out.append(
                device_augment(
                    views, batch["params" + k], self.aug, channels_last=self.channels_last
                )
            )
        return out[0], out[1]


def _pair(cfg: Dict[str, Any], key: str) -> Tuple[float, float]:
    v = cfg[key]
    if not isinstance(v, (list, tuple)) or len(v) != 2:
        raise DataError(f"data.{key}={v!r}: expected a list of two numbers")
    return float(v[0]), float(v[1])


def build_pretrain_loader(
    data_cfg: Dict[str, Any],
    *,
    rank: int,
    world_size: int,
    seed: int,
    batch_size_per_rank: int,
    device: Union[str, torch.device] = "cpu",
) -> PretrainLoader:
    """Build the two-view pretraining loader of one rank.

    Args:
        data_cfg: the ``data`` section of a pretraining config (plus ``channels_last``); keys
            it lacks take the defaults of configs/pretrain/base.yaml; an unknown key or a
            wrong type is an error.
        rank, world_size: this process's shard of each epoch.
        seed: global seed; augmentations and shuffling are functions of (seed, epoch, index).
        batch_size_per_rank: images per batch on this rank (drop_last).
        device: training device (kept for symmetry with prepare(); pinning needs CUDA).
    Returns:
        A :class:`PretrainLoader`.
    Raises:
        DataError: unknown key, bad value, missing data.
    """
    try:
        cfg = complete_section(data_cfg, "pretrain", "data", extra=LOADER_EXTRA_KEYS)
    except ConfigError as exc:
        raise DataError(f"unknown data config key or bad value: {exc}") from exc
    kind = cfg["kind"]
    if kind == "synthetic":
        source: Any = SyntheticImages(int(cfg["synthetic_length"]), int(cfg["synthetic_size"]))
    elif kind == "imagefolder":
        source = build_image_dataset(root=cfg["root"], strict=bool(cfg["strict"]))
    elif kind == "list":
        if not cfg["list_file"]:
            raise DataError("data.kind='list' needs data.list_file")
        source = build_image_dataset(
            root=cfg["root"], list_file=cfg["list_file"], strict=bool(cfg["strict"])
        )
    else:
        raise DataError(f"data.kind={kind!r}: expected imagefolder, list or synthetic")
    try:
        aug = AugmentConfig(
            size=int(cfg["image_size"]),
            scale=_pair(cfg, "crop_scale"),
            interpolation=str(cfg["interpolation"]),
            blur_prob=_pair(cfg, "blur_prob"),
            solarize_prob=_pair(cfg, "solarize_prob"),
        )
    except ValueError as exc:
        raise DataError(f"data config: {exc}") from exc
    if batch_size_per_rank < 1 or not 0 <= rank < world_size:
        raise DataError(f"bad batch_size_per_rank={batch_size_per_rank} / rank={rank}/{world_size}")
    if len(source) < batch_size_per_rank * world_size:
        raise DataError(
            f"dataset has {len(source)} images, fewer than one global batch "
            f"({batch_size_per_rank} x {world_size})"
        )
    pipeline = str(cfg["pipeline"])
    if pipeline == "auto":
        pipeline = "pil" if torch.device(device).type == "cpu" else "fast"
    dataset = TwoViewDataset(source, aug, seed, pipeline)
    sampler = EpochBatchSampler(len(source), batch_size_per_rank, rank, world_size, seed)
    return PretrainLoader(
        dataset,
        sampler,
        num_workers=int(cfg["num_workers"]),
        pin_memory=bool(cfg["pin_memory"]) and torch.device(device).type == "cuda",
        channels_last=bool(cfg["channels_last"]),
    )

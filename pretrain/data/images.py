"""Reading image files as 8-bit RGB, and the errors of the data layer.

Every image goes through one decoder, :func:`load_rgb` (or :func:`decode_rgb` for a file opened
lazily), which turns any PIL mode into 8-bit RGB by its meaning (16-bit and float data rescaled,
transparency composited over white), not by PIL's saturating ``convert("RGB")``.

The project's rule for EXIF orientation is the camera's: an image whose EXIF orientation tag is
not 1 is rotated / flipped upright when decoded (as Detectron2's reader does), so a 40 x 20
sensor image tagged "rotate 90" is read as 20 x 40 everywhere. An image of more than
:func:`max_image_pixels` pixels (default 89,478,485, PIL's own warning threshold; set
``IMSVD_MAX_IMAGE_PIXELS`` to change it) is refused before it is decoded, naming its size:
a few KB of compressed data can otherwise ask for gigabytes. The variable is read when this
module is imported (a raised limit is given to PIL then, before any image is opened) and
checked again by every reader; a malformed value is one :class:`PixelLimitError`, never a
reason to count images as unreadable.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageOps

from pretrain.errors import IMSVDError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class DataError(IMSVDError, ValueError):
    """Bad data configuration: missing root, empty tree, malformed list file, unknown key."""


class CorruptImageError(DataError):
    """An image file that cannot be decoded (a dataset raises it only in strict mode)."""


class PixelLimitError(IMSVDError, RuntimeError):
    """``IMSVD_MAX_IMAGE_PIXELS`` is not a positive integer: an error of the whole run.

    Deliberately not a ValueError (unlike :class:`DataError`): the readers catch
    :data:`DECODE_ERRORS`, ValueError among them, to count one image as unreadable, and a bad
    setting must stop the run with this message instead of making every image "unreadable".
    """


# Exceptions PIL raises for unreadable / truncated / non-image files.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)

# Composited behind transparent pixels: transparent regions of web images and icons are meant to
# be seen on a light page, and a fixed colour keeps the result a pure function of the file.
ALPHA_BACKGROUND = (255, 255, 255)
# Integer modes whose values span 0..65535 (16-bit PNG / TIFF grey levels).
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
# Modes PIL converts to RGB by their meaning already (no range or alpha question).
_DIRECT_MODES = ("1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "HSV")


MAX_PIXELS_ENV = "IMSVD_MAX_IMAGE_PIXELS"
DEFAULT_MAX_PIXELS = 89_478_485  # PIL's DecompressionBombWarning threshold
_EXIF_ORIENTATION = 0x0112


_PIXELS_SETTING: tuple[str, int] | None = None  # (the variable's text, its limit) last read


def max_image_pixels() -> int:
    """The largest image (width x height) decoded: ``$IMSVD_MAX_IMAGE_PIXELS`` or 89,478,485.

    The value is validated once per text of the variable; a limit above PIL's own
    ``Image.MAX_IMAGE_PIXELS`` raises PIL's, so that ``Image.open`` (which refuses twice PIL's
    limit before :func:`check_pixels` can run) does not refuse what is allowed.

    Raises:
        PixelLimitError: the variable is not a positive integer (naming it and its value).
    """
    global _PIXELS_SETTING
    raw = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if _PIXELS_SETTING is not None and _PIXELS_SETTING[0] == raw:
        limit = _PIXELS_SETTING[1]
    else:
        limit = _parse_limit(raw)
        _PIXELS_SETTING = (raw, limit)
    if Image.MAX_IMAGE_PIXELS is not None and limit > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = limit  # PIL's own bomb check must not refuse what is allowed
    return limit


def _parse_limit(raw: str) -> int:
    if not raw:
        return DEFAULT_MAX_PIXELS
    try:
        limit = int(raw)
    except ValueError:
        limit = 0
    if limit <= 0:
        raise PixelLimitError(
            f"environment variable {MAX_PIXELS_ENV}={raw!r} must be a positive integer "
            f"(pixels, e.g. {DEFAULT_MAX_PIXELS})"
        )
    return limit


try:  # give PIL a raised limit before any image is opened (readers that open, then check)
    max_image_pixels()
except PixelLimitError:
    pass  # raised by the first reader, outside its decode error handling


def check_pixels(img: Image.Image) -> None:
    """Refuse an opened (not yet decoded) image larger than :func:`max_image_pixels`.

    Raises:
        CorruptImageError: naming the size, the limit and ``IMSVD_MAX_IMAGE_PIXELS``.
        PixelLimitError: the variable is malformed (not one of :data:`DECODE_ERRORS`).
    """
    w, h = img.size
    limit = max_image_pixels()
    if w * h > limit:
        raise CorruptImageError(
            f"image of {w} x {h} = {w * h:,} pixels is over the limit of {limit:,} pixels "
            f"(set {MAX_PIXELS_ENV} to allow larger images)"
        )


def exif_orientation(img: Image.Image) -> int:
    """The EXIF orientation tag of an opened image (1, upright, when absent or unreadable)."""
    try:
        value = img.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 (a malformed EXIF block is read as "no orientation")
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


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
        PixelLimitError: ``IMSVD_MAX_IMAGE_PIXELS`` is malformed.
    """
    max_image_pixels()  # outside the decode errors: a bad setting is not a bad image
    try:
        with Image.open(path) as img:
            return decode_rgb(img)
    except DECODE_ERRORS as exc:  # includes CorruptImageError (a ValueError) from to_rgb
        raise CorruptImageError(f"cannot read image {path!r}: {exc}") from exc


def decode_rgb(img: Image.Image) -> Image.Image:
    """Decode an opened image now (truncation errors surface here, not in a transform) as RGB,
    upright by its EXIF orientation.

    Raises:
        One of :data:`DECODE_ERRORS` for unreadable data or a mode with no RGB meaning;
        CorruptImageError for an image over :func:`max_image_pixels`; PixelLimitError for a
        malformed ``IMSVD_MAX_IMAGE_PIXELS``.
    """
    check_pixels(img)
    img.load()
    if exif_orientation(img) != 1:
        img = ImageOps.exif_transpose(img)
    return to_rgb(img)

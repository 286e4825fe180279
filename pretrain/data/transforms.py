"""Image transforms: evaluation transforms and the two-view IMSVD augmentations.

The evaluation transforms are the standard frozen-feature protocol ones
(docs/PROTOCOLS.md section 3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Tuple

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms as T
from torchvision.transforms import functional as F

from pretrain.config import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def eval_transform(resize: int = 256, crop: int = 224) -> T.Compose:
    """Resize (short side) + CenterCrop + ToTensor + ImageNet normalisation.

    Args:
        resize: short-side size before cropping.
        crop: square crop size.
    Returns:
        A torchvision transform mapping an RGB PIL image to a normalised float tensor (3, crop,
        crop).
    """
    if crop > resize:
        raise ConfigError(f"eval_transform: crop={crop} larger than resize={resize}")
    return T.Compose(
        [
            T.Resize(resize, interpolation=T.InterpolationMode.BILINEAR),
            T.CenterCrop(crop),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def train_linear_transform(crop: int = 224, scale: Tuple[float, float] = (0.2, 1.0)) -> T.Compose:
    """RandomResizedCrop + horizontal flip + ToTensor + normalisation (linear-probe training).

    Args:
        crop: output size.
        scale: area fraction range of RandomResizedCrop.
    Returns:
        A torchvision transform mapping an RGB PIL image to a normalised float tensor.
    """
    lo, hi = float(scale[0]), float(scale[1])
    if not 0.0 < lo <= hi <= 1.0:
        raise ConfigError(f"train_linear_transform: scale={scale} must satisfy 0 < lo <= hi <= 1")
    return T.Compose(
        [
            T.RandomResizedCrop(crop, scale=(lo, hi)),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


# --------------------------------------------------------------------------------------------
# Two-view IMSVD augmentations (docs/PROTOCOLS.md section 2)
#
# Randomness is drawn by `sample_view_params` from a per-sample generator seeded with
# (seed, epoch, index), so a view is a pure function of those three numbers: results do not
# depend on the worker count, and a resumed run reproduces an uninterrupted one. Both pipelines
# below consume the same parameters, so they share the augmentation distribution by
# construction; they differ only in how the pixels are computed:
#
# * the reference pipeline applies each op to a PIL image, as the reference training code does
#   with torchvision on PIL images;
# * the fast pipeline decodes once (at reduced JPEG scale when both crops allow it), crops and
#   resizes both views in the worker, ships uint8 tensors, and applies colour jitter, grayscale,
#   blur, solarize and normalisation batched on the device after collation.
# --------------------------------------------------------------------------------------------

INTERPOLATIONS = {
    "bicubic": (Image.BICUBIC, T.InterpolationMode.BICUBIC),
    "bilinear": (Image.BILINEAR, T.InterpolationMode.BILINEAR),
}

JITTER_OPS = ("brightness", "contrast", "saturation", "hue")


@dataclass(frozen=True)
class AugmentConfig:
    """Parameters of the two asymmetric views; defaults are the paper recipe.

    Attributes:
        size: output side of RandomResizedCrop.
        scale: crop area fraction range.
        ratio: crop aspect ratio range.
        interpolation: "bicubic" (the reference code) or "bilinear".
        hflip_prob: horizontal flip probability.
        jitter: (brightness, contrast, saturation, hue) strengths of ColorJitter.
        jitter_prob: probability of applying ColorJitter.
        gray_prob: RandomGrayscale probability.
        blur_prob: GaussianBlur probability for (view 1, view 2).
        blur_sigma: sigma range of GaussianBlur.
        solarize_prob: Solarize probability for (view 1, view 2).
        mean, std: normalisation.
    """

    size: int = 224
    scale: Tuple[float, float] = (0.08, 1.0)
    ratio: Tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    interpolation: str = "bicubic"
    hflip_prob: float = 0.5
    jitter: Tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    jitter_prob: float = 0.8
    gray_prob: float = 0.2
    blur_prob: Tuple[float, float] = (1.0, 0.1)
    blur_sigma: Tuple[float, float] = (0.1, 2.0)
    solarize_prob: Tuple[float, float] = (0.0, 0.2)
    mean: Tuple[float, float, float] = IMAGENET_MEAN
    std: Tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.interpolation not in INTERPOLATIONS:
            raise ConfigError(
                f"interpolation={self.interpolation!r}: expected one of {sorted(INTERPOLATIONS)}"
            )
        if self.size < 1:
            raise ConfigError(f"image size must be positive, got {self.size}")
        lo, hi = self.scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ConfigError(f"crop scale={self.scale} must satisfy 0 < lo <= hi <= 1")
        for name in ("hflip_prob", "jitter_prob", "gray_prob"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ConfigError(f"{name}={p} is not a probability")
        for name in ("blur_prob", "solarize_prob"):
            ps = getattr(self, name)
            if len(ps) != 2 or not all(0.0 <= p <= 1.0 for p in ps):
                raise ConfigError(f"{name}={ps} must be two probabilities (view 1, view 2)")


@dataclass
class ViewParams:
    """All random choices of one view (crop box in original image pixels)."""

    crop: Tuple[int, int, int, int]  # top, left, height, width
    flip: bool
    jitter: bool
    factors: Tuple[float, float, float, float]  # brightness, contrast, saturation, hue
    order: Tuple[int, int, int, int]  # application order of JITTER_OPS
    gray: bool
    blur: bool
    sigma: float
    solarize: bool


def sample_generator(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The per-sample generator: a pure function of (seed, epoch, index)."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), int(index), 0x1A5D])


def sample_crop(
    rng: np.random.Generator,
    width: int,
    height: int,
    scale: Tuple[float, float],
    ratio: Tuple[float, float],
) -> Tuple[int, int, int, int]:
    """RandomResizedCrop box with torchvision's algorithm (10 tries, then a centre crop).

    Returns:
        (top, left, height, width) in pixels.
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def sample_view_params(
    rng: np.random.Generator, width: int, height: int, cfg: AugmentConfig, view: int
) -> ViewParams:
    """Draw every random choice of one view.

    Args:
        rng: the per-sample generator (shared by both views, view 1 drawn first).
        width, height: size of the decoded image.
        cfg: augmentation config.
        view: 0 or 1 (selects the asymmetric blur / solarize probabilities).
    Returns:
        The view's parameters.
    """
    crop = sample_crop(rng, width, height, cfg.scale, cfg.ratio)
    flip = bool(rng.random() < cfg.hflip_prob)
    jitter = bool(rng.random() < cfg.jitter_prob)
    b, c, s, h = cfg.jitter
    factors = (
        float(rng.uniform(max(0.0, 1 - b), 1 + b)),
        float(rng.uniform(max(0.0, 1 - c), 1 + c)),
        float(rng.uniform(max(0.0, 1 - s), 1 + s)),
        float(rng.uniform(-h, h)),
    )
    order = tuple(int(k) for k in rng.permutation(4))
    gray = bool(rng.random() < cfg.gray_prob)
    blur = bool(rng.random() < cfg.blur_prob[view])
    sigma = float(rng.uniform(cfg.blur_sigma[0], cfg.blur_sigma[1]))
    solarize = bool(rng.random() < cfg.solarize_prob[view])
    return ViewParams(crop, flip, jitter, factors, order, gray, blur, sigma, solarize)


def sample_two_views(
    seed: int, epoch: int, index: int, width: int, height: int, cfg: AugmentConfig
) -> Tuple[ViewParams, ViewParams]:
    """Parameters of both views of sample ``index`` at ``epoch``."""
    rng = sample_generator(seed, epoch, index)
    return (
        sample_view_params(rng, width, height, cfg, 0),
        sample_view_params(rng, width, height, cfg, 1),
    )


# ---------------------------------------------------------------- reference (PIL) pipeline


def reference_view(img: Image.Image, p: ViewParams, cfg: AugmentConfig) -> torch.Tensor:
    """One view computed op by op on a PIL image (the straightforward pipeline).

    Args:
        img: decoded RGB image.
        p: the view's parameters.
        cfg: augmentation config.
    Returns:
        Normalised float tensor (3, size, size).
    """
    top, left, h, w = p.crop
    out = F.resized_crop(
        img,
        top,
        left,
        h,
        w,
        [cfg.size, cfg.size],
        interpolation=INTERPOLATIONS[cfg.interpolation][1],
    )
    if p.flip:
        out = F.hflip(out)
    if p.jitter:
        for k in p.order:
            if k == 0:
                out = F.adjust_brightness(out, p.factors[0])
            elif k == 1:
                out = F.adjust_contrast(out, p.factors[1])
            elif k == 2:
                out = F.adjust_saturation(out, p.factors[2])
            else:
                out = F.adjust_hue(out, p.factors[3])
    if p.gray:
        out = F.rgb_to_grayscale(out, num_output_channels=3)
    if p.blur:
        out = out.filter(ImageFilter.GaussianBlur(radius=p.sigma))
    if p.solarize:
        out = ImageOps.solarize(out, threshold=128)
    return F.normalize(F.to_tensor(out), cfg.mean, cfg.std)


def reference_two_views(
    img: Image.Image, params: Tuple[ViewParams, ViewParams], cfg: AugmentConfig
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Both views with the reference pipeline."""
    return reference_view(img, params[0], cfg), reference_view(img, params[1], cfg)

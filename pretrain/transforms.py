"""Image transforms: evaluation transforms and the two-view IMSVD augmentations.

The evaluation transforms are the standard frozen-feature protocol ones
(docs/PROTOCOLS.md section 3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

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

_INTERP = {
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
        if self.interpolation not in _INTERP:
            raise ConfigError(
                f"interpolation={self.interpolation!r}: expected one of {sorted(_INTERP)}"
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
        img, top, left, h, w, [cfg.size, cfg.size], interpolation=_INTERP[cfg.interpolation][1]
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


# ---------------------------------------------------------------- fast pipeline, worker side


def draft_factor(img: Image.Image, params: Sequence[ViewParams], size: int) -> int:
    """Largest JPEG DCT reduction (1, 2, 4, 8) that still downsamples every crop.

    Decoding at 1/k of the resolution is only used when each crop's shorter side is at least
    k * size, so no view is upsampled more than the reference would have done.
    """
    if img.format != "JPEG":
        return 1
    shortest = min(min(p.crop[2], p.crop[3]) for p in params)
    k = 1
    while k < 8 and shortest >= 2 * k * size:
        k *= 2
    return k


def fast_crops(
    img: Image.Image, params: Sequence[ViewParams], cfg: AugmentConfig
) -> List[np.ndarray]:
    """Decode once (reduced JPEG scale when the crops allow it) and cut every view.

    Args:
        img: an opened, not yet loaded, image (so JPEG draft mode can act).
        params: per-view parameters, crops in the image's full-resolution pixels.
        cfg: augmentation config.
    Returns:
        One uint8 array (size, size, 3) per view, cropped, resized and flipped.
    """
    full_w, full_h = img.size
    k = draft_factor(img, params, cfg.size)
    if k > 1:
        img.draft("RGB", (-(-full_w // k), -(-full_h // k)))
    if img.mode != "RGB":
        img = img.convert("RGB")
    sx, sy = img.size[0] / full_w, img.size[1] / full_h
    resample = _INTERP[cfg.interpolation][0]
    out = []
    for p in params:
        top, left, h, w = p.crop
        box = (left * sx, top * sy, (left + w) * sx, (top + h) * sy)
        v = img.resize((cfg.size, cfg.size), resample, box=box)
        if p.flip:
            v = v.transpose(Image.FLIP_LEFT_RIGHT)
        out.append(np.asarray(v))
    return out


def params_to_tensors(params: Sequence[ViewParams]) -> Dict[str, torch.Tensor]:
    """Stack the colour parameters of a list of views for the device stage."""
    return {
        "jitter": torch.tensor([p.jitter for p in params], dtype=torch.bool),
        "factors": torch.tensor([p.factors for p in params], dtype=torch.float32),
        "order": torch.tensor([p.order for p in params], dtype=torch.int64),
        "gray": torch.tensor([p.gray for p in params], dtype=torch.bool),
        "blur": torch.tensor([p.blur for p in params], dtype=torch.bool),
        "sigma": torch.tensor([p.sigma for p in params], dtype=torch.float32),
        "solarize": torch.tensor([p.solarize for p in params], dtype=torch.bool),
    }


# ---------------------------------------------------------------- fast pipeline, device side


def _gray(x: torch.Tensor) -> torch.Tensor:
    # ITU-R 601-2 luma, as PIL's convert("L") and torchvision's rgb_to_grayscale.
    return 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


def _hue_shift(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    # Rotating the HSV hue keeps each pixel's max and min channel; the channels are then given by
    # the closed form of hsv->rgb: c = max - chroma * clamp(min(k, 4 - k), 0, 1) with
    # k = (n_c + 6 h) mod 6, n = (5, 3, 1) for (r, g, b). Fewer passes than rgb->hsv->rgb.
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    mx = torch.maximum(torch.maximum(r, g), b)
    mn = torch.minimum(torch.minimum(r, g), b)
    chroma = mx - mn
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    h = torch.where(
        mx == r, (g - b) / safe, torch.where(mx == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0)
    )
    h = h + 6.0 * shift.view(-1, 1, 1)
    chans = []
    for n in (5.0, 3.0, 1.0):
        k = torch.remainder(h + n, 6.0)
        chans.append(mx - chroma * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0))
    return torch.stack(chans, 1)


def _jitter_op(x: torch.Tensor, op: int, f: torch.Tensor) -> torch.Tensor:
    if op == 0:
        return (x * f.view(-1, 1, 1, 1)).clamp_(0.0, 1.0)
    if op == 1:
        # Blend with the mean grey level of the image (PIL ImageEnhance.Contrast).
        m = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
        f = f.view(-1, 1, 1, 1)
        return (f * x + (1.0 - f) * m).clamp_(0.0, 1.0)
    if op == 2:
        f = f.view(-1, 1, 1, 1)
        return (f * x + (1.0 - f) * _gray(x)).clamp_(0.0, 1.0)
    return _hue_shift(x, f)


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    # Separable Gaussian, one kernel per image, radius 3 sigma of the widest in the group;
    # edges replicated like PIL's blur. Depthwise conv: each (image, channel) is a group.
    n, c, hgt, wid = x.shape
    sigma = sigma.detach().cpu()
    radius = max(1, int(math.ceil(3.0 * float(sigma.max()))))
    radius = min(radius, hgt - 1, wid - 1) if min(hgt, wid) > 1 else 0
    if radius == 0:
        return x
    # Kernels are built on the CPU (sigma is a CPU tensor) and then moved: no device sync.
    d = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(d.view(1, -1) ** 2) / (2.0 * sigma.view(-1, 1).float() ** 2))
    k = k / k.sum(dim=1, keepdim=True)
    # Far tails of narrow kernels underflow to denormals, which are very slow on CPUs.
    k = torch.where(k < 1e-7, torch.zeros_like(k), k).repeat_interleave(c, dim=0)
    k = k.to(device=x.device, dtype=x.dtype)
    y = x.reshape(1, n * c, hgt, wid)
    y = torch.nn.functional.pad(y, (radius, radius, radius, radius), mode="replicate")
    y = torch.nn.functional.conv2d(y, k.view(n * c, 1, 1, -1), groups=n * c)
    y = torch.nn.functional.conv2d(y, k.view(n * c, 1, -1, 1), groups=n * c)
    return y.view(n, c, hgt, wid)


def _apply_where(
    x: torch.Tensor, mask: torch.Tensor, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    # mask lives on the CPU, so deciding what to run never waits for the accelerator.
    if not bool(mask.any()):
        return x
    if bool(mask.all()):
        return fn(x, torch.arange(mask.numel()))
    idx = mask.nonzero().flatten()
    x[idx.to(x.device)] = fn(x[idx.to(x.device)], idx)
    return x


def device_augment(
    views: torch.Tensor,
    params: Dict[str, torch.Tensor],
    cfg: AugmentConfig,
    chunk: Optional[int] = None,
    channels_last: bool = False,
) -> torch.Tensor:
    """Finish a batch of fast-pipeline views on its device.

    Args:
        views: uint8 (N, H, W, 3) crops from :func:`fast_crops`, already on the target device.
        params: :func:`params_to_tensors` of the same views (CPU tensors).
        cfg: augmentation config (normalisation constants).
        chunk: images processed together; small chunks stay in CPU caches (default: 4 on CPU,
            the whole batch on an accelerator).
        channels_last: return channels_last memory format.
    Returns:
        Normalised float32 (N, 3, H, W).
    """
    n = views.shape[0]
    dev = views.device
    if chunk is None:
        chunk = 4 if dev.type == "cpu" else max(n, 1)
    p = {k: v.cpu() for k, v in params.items()}
    factors = p["factors"].to(dev, non_blocking=True)
    mean = torch.tensor(cfg.mean, device=dev).view(1, 3, 1, 1)
    inv_std = 1.0 / torch.tensor(cfg.std, device=dev).view(1, 3, 1, 1)
    out = torch.empty((n, 3) + tuple(views.shape[1:3]), device=dev, dtype=torch.float32)
    if channels_last:
        out = out.contiguous(memory_format=torch.channels_last)
    solar = 128.0 / 255.0
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        x = views[s:e].permute(0, 3, 1, 2).float().div_(255.0)
        fac = factors[s:e]
        jit, order = p["jitter"][s:e], p["order"][s:e]
        for step in range(4):
            for op in range(4):
                x = _apply_where(
                    x,
                    jit & (order[:, step] == op),
                    lambda t, i, op=op: _jitter_op(t, op, fac[i.to(dev), op]),
                )
        x = _apply_where(x, p["gray"][s:e], lambda t, i: _gray(t).repeat(1, 3, 1, 1))
        sigma = p["sigma"][s:e]
        x = _apply_where(x, p["blur"][s:e], lambda t, i: _gaussian_blur(t, sigma[i]))
        x = _apply_where(x, p["solarize"][s:e], lambda t, i: torch.where(t >= solar, 1.0 - t, t))
        out[s:e] = (x - mean) * inv_std
    return out

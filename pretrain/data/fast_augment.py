"""The fast two-view pipeline: the same distribution as the reference (PIL) one of
:mod:`pretrain.data.transforms`, with the crops decoded and resized in the DataLoader workers
(uint8, JPEG draft mode where it still downsamples) and the colour jitter, grayscale, blur and
solarize applied batched on the training device.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from pretrain.data.transforms import INTERPOLATIONS, AugmentConfig, ViewParams

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
    resample = INTERPOLATIONS[cfg.interpolation][0]
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

"""Image transforms: evaluation transforms and the two-view IMSVD augmentations.

The evaluation transforms are the standard frozen-feature protocol ones (PROTOCOLS section 3).
"""

from __future__ import annotations

from typing import Tuple

from torchvision import transforms as T

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
        raise ValueError(f"eval_transform: crop={crop} larger than resize={resize}")
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
        raise ValueError(f"train_linear_transform: scale={scale} must satisfy 0 < lo <= hi <= 1")
    return T.Compose(
        [
            T.RandomResizedCrop(crop, scale=(lo, hi)),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )

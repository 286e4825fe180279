"""Grad-CAM (Selvaraju et al., ICCV 2017) for units of IMSVD's discrete variables.

Each IMSVD variable is a B-way softmax over its units, i.e. an unsupervised classification head,
so Grad-CAM applies as for a class score: the target is the projector logit z[v * B + u] of unit u
of variable v (the pre-softmax score, as in the original method: the softmax saturates for
near one-hot codes, so gradients of q itself vanish). The map is ReLU(sum_k w_k A_k) over the
channels A_k of a convolutional layer, with w_k the spatial mean of d score / d A_k, upsampled to
the input size and scaled to [0, 1] per image.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pretrain.config import ConfigError

__all__ = ["GradCAM", "unit_score", "choose_layer", "overlay", "CAM_COLORMAP"]

# perceptually uniform, dark (irrelevant) to bright (relevant); shown with a colorbar
CAM_COLORMAP = "inferno"

ScoreFn = Callable[[torch.Tensor], torch.Tensor]


class GradCAM:
    """Grad-CAM maps of a scalar score per image with respect to one layer's activations.

    Use as a context manager (or call :meth:`close`) so the hooks are removed. The model must be
    in eval mode: in train mode BatchNorm couples the images of a batch.

    Args:
        model: network mapping images (N, 3, H, W) to outputs.
        layer: the layer (module or its dotted name in ``model``) whose output is explained.
    """

    def __init__(self, model: nn.Module, layer: nn.Module | str) -> None:
        if isinstance(layer, str):
            try:
                layer = model.get_submodule(layer)
            except AttributeError:
                raise ConfigError(
                    f"Grad-CAM layer '{layer}' is not a submodule of the model"
                ) from None
        self.model = model
        self._acts: torch.Tensor | None = None
        self._handle = layer.register_forward_hook(self._keep)

    def _keep(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if not isinstance(output, torch.Tensor) or output.dim() != 4:
            raise ConfigError(
                f"Grad-CAM layer {type(module).__name__} must output (N, C, H, W), got "
                f"{getattr(output, 'shape', type(output))}"
            )
        if not output.requires_grad:  # a forward pass outside Grad-CAM (e.g. under no_grad)
            self._acts = None
            return
        output.retain_grad()
        self._acts = output

    def __call__(self, images: torch.Tensor, score_fn: ScoreFn) -> torch.Tensor:
        """Compute maps.

        Args:
            images: (N, 3, H, W) normalised input batch.
            score_fn: maps the model output to one score per image, shape (N,).

        Returns:
            (N, H, W) maps in [0, 1] (all zeros where no location raises the score).
        """
        if self.model.training:
            raise ValueError("Grad-CAM needs the model in eval mode (call model.eval())")
        with torch.enable_grad():
            x = images.detach().clone().requires_grad_(True)
            self.model.zero_grad(set_to_none=True)
            scores = score_fn(self.model(x))
            if scores.shape != (x.shape[0],):
                raise ValueError(f"score_fn must return shape ({x.shape[0]},), got {scores.shape}")
            acts = self._acts
            if acts is None:
                raise ValueError("the Grad-CAM layer was not used in the forward pass")
            # images are independent in eval mode, so one backward of the sum gives every image's
            # own gradient
            scores.sum().backward()
            grads = acts.grad
        weights = grads.float().mean(dim=(2, 3), keepdim=True)
        cam = F.relu((weights * acts.detach().float()).sum(dim=1, keepdim=True))
        cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        peak = cam.flatten(1).amax(dim=1).clamp_min(1e-12).view(-1, 1, 1)
        self._acts = None
        return (cam / peak).cpu()

    def close(self) -> None:
        """Remove the hook."""
        self._handle.remove()

    def __enter__(self) -> "GradCAM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def unit_score(variable: int, units: int | Sequence[int] | torch.Tensor, bin_size: int) -> ScoreFn:
    """Score function selecting the logit of unit(s) of one variable.

    Args:
        variable: variable index m.
        units: local unit index u in [0, B), one for all images or one per image.
        bin_size: B.

    Returns:
        A function (N, D) -> (N,) giving z[i, m * B + u_i].
    """

    def score(z: torch.Tensor) -> torch.Tensor:
        m = z.shape[1] // bin_size
        if not 0 <= variable < m:
            raise ValueError(f"variable {variable} out of range: the model has {m} variables")
        u = torch.as_tensor(units, device=z.device, dtype=torch.long).expand(z.shape[0])
        if ((u < 0) | (u >= bin_size)).any():
            raise ValueError(f"unit indices must lie in [0, {bin_size}), got {u.tolist()}")
        cols = variable * bin_size + u
        return z.gather(1, cols.view(-1, 1))[:, 0]

    return score


@torch.no_grad()
def choose_layer(
    backbone: nn.Module,
    image_size: int,
    candidates: Sequence[str] = ("layer4", "layer3", "layer2", "layer1"),
) -> str:
    """Deepest candidate layer whose output is at least 4 x 4 for this input size.

    Grad-CAM at ResNet's last stage is 7 x 7 for 224 px inputs, but only 1 x 1 for 32 px inputs
    with a strided stem, where a map carries no spatial information.

    Args:
        backbone: the (eval-mode) backbone.
        image_size: input side.
        candidates: dotted layer names, deepest first.

    Returns:
        The chosen name (the last candidate if none reaches 4 x 4).
    """
    sizes: dict[str, int] = {}
    hooks = [
        backbone.get_submodule(name).register_forward_hook(
            lambda mod, inp, out, name=name: sizes.__setitem__(name, int(out.shape[-1]))
        )
        for name in candidates
    ]
    try:
        device = next(backbone.parameters()).device
        backbone(torch.zeros(1, 3, image_size, image_size, device=device))
    finally:
        for h in hooks:
            h.remove()
    for name in candidates:
        if sizes.get(name, 0) >= 4:
            return name
    return candidates[-1]


def overlay(image: np.ndarray, cam: np.ndarray | torch.Tensor, alpha: float = 0.55) -> np.ndarray:
    """Blend a [0, 1] map in :data:`CAM_COLORMAP` over the grey levels of an RGB uint8 image.

    The image is shown in grey so that every colour in the result reads as a map value on the
    colormap's colorbar.

    Args:
        image: (H, W, 3) uint8.
        cam: (H, W) map in [0, 1].
        alpha: weight of the map.

    Returns:
        (H, W, 3) uint8.
    """
    from matplotlib import colormaps

    cam = np.asarray(cam, dtype=np.float32)
    if cam.shape != image.shape[:2]:
        raise ValueError(f"overlay: map {cam.shape} and image {image.shape[:2]} differ in size")
    heat = colormaps[CAM_COLORMAP](np.clip(cam, 0.0, 1.0))[..., :3]
    grey = image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32) / 255.0
    out = (1 - alpha) * grey[..., None] + alpha * heat
    return (np.clip(out, 0.0, 1.0) * 255).round().astype(np.uint8)

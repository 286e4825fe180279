"""The files of the code analysis (:mod:`transfer.analysis.analyze`) written from the streamed
statistics, in the order they are written: the upper-left corner of the joint matrix P (and,
with ``codes.save_full_joint``, all of it), the block statistics, Fig. 3a (the joint corner),
Figs. 3b-c (two views and their codes), Figs. 4-5 (exemplars and their Grad-CAM maps) and
Grad-CAM on ``gradcam.images``. Each writer returns {summary name: written path}, or the path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pretrain.data.images import load_rgb
from transfer.analysis.codes import UnitExemplars, model_codes
from transfer.analysis.figures import (
    FigureStyle,
    plot_joint_corner,
    plot_views,
    save_npy,
    save_npz,
    to_uint8,
)
from transfer.analysis.gradcam import GradCAM
from transfer.analysis.grids import exemplar_figures, gradcam_figure
from transfer.analysis.stream import AnalysisViews


@dataclass(frozen=True)
class CodeSettings:
    """The codes as the analysis reads them: ``codes.*``, ``figures.variables`` and
    ``gradcam.variable``, else the model's pretraining recipe.

    Attributes:
        bin_size: B.
        temperature: the softmax temperature of the codes.
        num_variables: M = D / B.
        variables: the variables of the figures (repeats dropped).
        gradcam_variable: the variable Grad-CAM explains on ``gradcam.images``.
    """

    bin_size: int
    temperature: float
    num_variables: int
    variables: list[int]
    gradcam_variable: int


def save_joint(joint: torch.Tensor, codes: CodeSettings, c: dict, out: Path):
    """Write the upper-left corner of P (``codes.corner_vars`` variables) and, with
    ``codes.save_full_joint``, all of it; returns ({name: path}, the corner as numpy)."""
    outputs: dict[str, Path] = {}
    k = min(int(c["corner_vars"]), codes.num_variables)
    corner = joint[: k * codes.bin_size, : k * codes.bin_size].cpu().numpy()
    outputs["joint corner (npy)"] = save_npy(corner, out / "joint_corner.npy")
    if c["save_full_joint"]:
        outputs["joint matrix (npy)"] = save_npy(joint.cpu().numpy(), out / "joint_full.npy")
    return outputs, corner


def block_outputs(
    corner: np.ndarray,
    arrays: dict[str, torch.Tensor],
    codes: CodeSettings,
    two_views: bool,
    out: Path,
    style: FigureStyle,
) -> dict[str, Path]:
    """Write the block statistics (``code_stats.npz``) and Fig. 3a, the joint corner."""
    npz = {name: v.cpu().numpy() for name, v in arrays.items()}
    outputs = {"block statistics (npz)": save_npz(npz, out / "code_stats.npz")}
    names = ("view 1", "view 2") if two_views else ("clean view", "clean view")
    path = style.path(out, "joint_corner")
    bin_size = codes.bin_size
    outputs["joint corner (Fig. 3a)"] = plot_joint_corner(corner, bin_size, path, style.dpi, names)
    return outputs


def views_figure(
    model: nn.Module,
    item: tuple,
    codes: CodeSettings,
    figs: dict,
    out: Path,
    style: FigureStyle,
    device: torch.device,
) -> Path:
    """Figs. 3b-c: the two augmented views of one item of
    :class:`transfer.analysis.stream.AnalysisViews` (the clean view twice with
    codes.views=same) and their first variables' codes; returns the written path."""
    v1, v2 = item[1], item[2]
    q = model_codes(model, torch.stack([v1, v2]), codes.bin_size, codes.temperature, device)
    q = q[:, : min(int(figs["view_vars"]), codes.num_variables)].cpu().numpy()
    path = style.path(out, "views")
    return plot_views([to_uint8(v1), to_uint8(v2)], q, codes.bin_size, path, style.dpi)


def gradcam_outputs(
    model: nn.Module,
    layer: str,
    exemplars: UnitExemplars,
    views: AnalysisViews,
    codes: CodeSettings,
    cfg: dict,
    out: Path,
    style: FigureStyle,
    device: torch.device,
) -> dict[str, Path]:
    """Figs. 4-5 (the exemplars and their Grad-CAM maps) and Grad-CAM on ``gradcam.images``,
    at ``layer`` of the backbone."""
    figs, gc = cfg["figures"], cfg["gradcam"]
    outputs: dict[str, Path] = {}
    with GradCAM(model, f"backbone.{layer}") as cam_fn:
        load, units = (lambda i: views.clean(views.base[i][0])), int(figs["units_per_variable"])
        outputs.update(
            exemplar_figures(cam_fn, exemplars, load, codes.bin_size, units, out, device, style)
        )
        if gc["images"]:
            imgs = torch.stack([views.clean(load_rgb(str(p))) for p in gc["images"]])
            names = [Path(p).name for p in gc["images"]]
            unit = None if int(gc["unit"]) < 0 else int(gc["unit"])
            path, var = style.path(out, "gradcam_images"), codes.gradcam_variable
            outputs["Grad-CAM, given images"] = gradcam_figure(
                cam_fn,
                model,
                imgs,
                names,
                var,
                unit,
                codes.bin_size,
                codes.temperature,
                path,
                style.dpi,
            )
    return outputs

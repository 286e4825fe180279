"""The image grids of the code analysis (paper Figs. 4-5): per variable, the top images of its
most used units (:func:`exemplar_figures`) and their Grad-CAM maps, and Grad-CAM on given
images (:func:`gradcam_figure`), each a grid of :func:`grid_figure` written by
:func:`transfer.analysis.figures.save_figure` (format and resolution from
:class:`transfer.analysis.figures.FigureStyle`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch
from torch import nn

from pretrain.progress import progress
from transfer.analysis.codes import UnitExemplars, model_codes
from transfer.analysis.figures import STYLE, FigureStyle, pyplot, save_figure, to_uint8
from transfer.analysis.gradcam import CAM_COLORMAP, GradCAM, overlay, unit_score


class GridRow(NamedTuple):
    """One row of an image grid: its label, images and one caption per image."""

    label: str
    images: Sequence[np.ndarray]
    captions: Sequence[str] = ()


def _fill_cell(ax, row: GridRow, c: int, header: str | None) -> None:
    """Cell ``c`` of ``row``: its image and caption below, or nothing; the row's label left of
    the first column and ``header`` above (None: no header)."""
    ax.set_xticks([])
    ax.set_yticks([])
    if c < len(row.images):
        ax.imshow(row.images[c], interpolation="nearest")
        if c < len(row.captions):
            ax.set_xlabel(row.captions[c], fontsize=6.5, labelpad=1.5)
    else:
        ax.set_axis_off()
    if c == 0:
        ax.set_ylabel(row.label, rotation=0, ha="right", va="center", labelpad=5)
    if header is not None:
        ax.set_title(header, fontsize=7, pad=2)


def grid_figure(
    rows: Sequence[GridRow],
    title: str,
    column_labels: Sequence[str] = (),
    colorbar_label: str = "",
    cell: float = 0.9,
):
    """A tight grid of square images: a label left of each row, headers above the columns,
    captions below the images, and optionally a colorbar of :data:`CAM_COLORMAP` (0-1).

    Args:
        rows: the rows (empty cells where a row has fewer images).
        title: the figure title.
        column_labels: one header per column.
        colorbar_label: quantity and unit of the colorbar; empty: no colorbar.
        cell: side of one image, inches.

    Returns:
        The figure.
    """
    plt = pyplot()
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    ncols = max(1, max((len(r.images) for r in rows), default=1))
    nrows = max(1, len(rows))
    gap, cap = 0.05, (0.16 if any(r.captions for r in rows) else 0.0)
    left = 0.12 + 0.055 * max((len(line) for r in rows for line in r.label.split("\n")), default=0)
    top = 0.3 + (0.16 if column_labels else 0.0)
    right = 0.75 if colorbar_label else 0.05
    width = left + ncols * cell + (ncols - 1) * gap + right
    height = top + nrows * (cell + cap) + (nrows - 1) * gap + 0.05
    with plt.rc_context(STYLE):
        fig = plt.figure(figsize=(width, height))
        for r in range(nrows):
            row = rows[r] if r < len(rows) else GridRow("", [])
            for c in range(ncols):
                x0 = left + c * (cell + gap)
                y0 = height - top - (r + 1) * (cell + cap) - r * gap + cap
                ax = fig.add_axes((x0 / width, y0 / height, cell / width, cell / height))
                header = column_labels[c] if r == 0 and c < len(column_labels) else None
                _fill_cell(ax, row, c, header)
        fig.suptitle(title, y=1 - 0.12 / height, va="top")
        if colorbar_label:
            x0 = left + ncols * cell + (ncols - 1) * gap + 0.1
            bottom = height - top - nrows * (cell + cap) - (nrows - 1) * gap + cap
            box = (x0 / width, bottom / height, 0.1 / width, (height - top - bottom) / height)
            cax = fig.add_axes(box)
            mappable = ScalarMappable(Normalize(0.0, 1.0), plt.get_cmap(CAM_COLORMAP))
            fig.colorbar(mappable, cax=cax).set_label(colorbar_label)
    return fig


def plot_grid(
    rows: Sequence[GridRow], title: str, path: Path, dpi: int = 300, **kwargs: Any
) -> Path:
    """Write :func:`grid_figure` to ``path`` (format from its suffix)."""
    return save_figure(grid_figure(rows, title, **kwargs), path, dpi)


CAM_LABEL = "Grad-CAM relevance (each image's maximum = 1)"


def _unit_rows(
    cam_fn: GradCAM,
    exemplars: UnitExemplars,
    v: int,
    units: Sequence[int],
    load: Any,
    bin_size: int,
    device: torch.device,
) -> tuple[list[GridRow], list[GridRow]]:
    """The grid rows of variable ``v``, one per unit of ``units``: its top images (captioned
    with their q) and the same images under their Grad-CAM map; arguments as in
    :func:`exemplar_figures`."""
    counts = exemplars.counts[exemplars.variables.index(v)]
    total = max(int(counts.sum()), 1)
    rows, cam_rows = [], []
    for u in units:
        top = exemplars.exemplars(v, u)
        imgs = torch.stack([load(i) for i, _ in top])
        n = int(counts[u])
        label = f"variable {v}, unit {u}\n{n} images ({100 * n / total:.0f}%)"
        captions = [f"q = {s:.2f}" for _, s in top]
        cams = cam_fn(imgs.to(device), unit_score(v, u, bin_size)).numpy()
        rows.append(GridRow(label, [to_uint8(x) for x in imgs], captions))
        cam_rows.append(
            GridRow(label, [overlay(to_uint8(x), c) for x, c in zip(imgs, cams)], captions)
        )
    return rows, cam_rows


def exemplar_figures(
    cam_fn: GradCAM,
    exemplars: UnitExemplars,
    load: Any,
    bin_size: int,
    units_per_variable: int,
    out: Path,
    device: torch.device,
    style: FigureStyle = FigureStyle(),
) -> dict[str, Path]:
    """Figs. 4 and 5: per variable, top images of its most used units and their Grad-CAM maps.

    Args:
        cam_fn: Grad-CAM bound to the model's chosen layer.
        exemplars: the streamed unit exemplars.
        load: dataset index -> clean input tensor (3, H, W).
        bin_size: B.
        units_per_variable: rows per figure.
        out: output folder.
        device: model device.
        style: file format and resolution.

    Returns:
        {summary name: written path}.
    """
    outputs = {}
    for v in progress(exemplars.variables, desc="exemplars"):
        units = exemplars.top_units(v, units_per_variable)
        rows, cam_rows = _unit_rows(cam_fn, exemplars, v, units, load, bin_size, device)
        ncols = max((len(r.images) for r in rows), default=0)
        headers = [f"rank {c + 1}" for c in range(ncols)]
        what = f"its {len(rows)} most used units" if len(rows) > 1 else "its most used unit"
        outputs[f"exemplars, variable {v} (Fig. 4)"] = plot_grid(
            rows,
            f"Variable {v}: top images of {what} (ranked by q)",
            style.path(out, f"exemplars_var{v}"),
            style.dpi,
            column_labels=headers,
        )
        outputs[f"Grad-CAM, variable {v} (Fig. 5)"] = plot_grid(
            cam_rows,
            f"Variable {v}: Grad-CAM of each image's unit",
            style.path(out, f"gradcam_var{v}"),
            style.dpi,
            column_labels=headers,
            colorbar_label=CAM_LABEL,
        )
    return outputs


def gradcam_figure(
    cam_fn: GradCAM,
    model: nn.Module,
    images: torch.Tensor,
    names: Sequence[str],
    variable: int,
    unit: int | None,
    bin_size: int,
    temperature: float,
    path: Path,
    dpi: int = 300,
) -> Path:
    """Grad-CAM of one variable on given images: each row shows the image and its map.

    Args:
        unit: the unit explained; None: each image's own argmax unit.
    """
    device = next(model.parameters()).device
    qv = model_codes(model, images, bin_size, temperature, device)[:, variable].cpu()
    units = qv.argmax(dim=1) if unit is None else torch.full((len(images),), int(unit))
    cams = cam_fn(images.to(device), unit_score(variable, units, bin_size)).numpy()
    rows = []
    for i, (name, u) in enumerate(zip(names, units.tolist())):
        img = to_uint8(images[i])
        q = float(qv[i, u]) if 0 <= u < bin_size else float("nan")
        short = name if len(name) <= 24 else "..." + name[-21:]
        rows.append(GridRow(f"{short}\nunit {u}, q = {q:.2f}", [img, overlay(img, cams[i])]))
    which = "each image's argmax unit" if unit is None else f"unit {unit}"
    return plot_grid(
        rows,
        f"Grad-CAM, variable {variable} ({which})",
        path,
        dpi,
        column_labels=["input", "Grad-CAM"],
        colorbar_label=CAM_LABEL,
    )

"""Files and figures of the code analysis (paper Figs. 3-5): atomic .npy / .npz / .png writers,
the plots, and the exemplar / Grad-CAM figures of :mod:`transfer.analysis.analyze`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from pretrain.checkpoint import atomic_write
from pretrain.log import progress
from pretrain.transforms import IMAGENET_MEAN, IMAGENET_STD
from transfer.analysis.codes import UnitExemplars, model_codes
from transfer.analysis.gradcam import GradCAM, overlay, unit_score


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Undo the ImageNet normalisation of a (3, H, W) tensor -> (H, W, 3) uint8."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    img = (x.detach().cpu().float() * std + mean).clamp(0, 1)
    return (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def _atomic(path: Path, write) -> Path:
    """Run ``write(tmp_path)`` inside ``pretrain.checkpoint.atomic_write`` (fsync, rename)."""
    # write() opens the temporary file by name; fsync on atomic_write's handle syncs the file.
    return atomic_write(path, lambda f: write(Path(f.name)))


def save_npy(arr: np.ndarray, path: Path) -> Path:
    """Atomic ``np.save``."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, arr)

    return _atomic(path, write)


def save_npz(arrays: dict[str, np.ndarray], path: Path) -> Path:
    """Atomic ``np.savez_compressed``."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)

    return _atomic(path, write)


def save_figure(fig, path: Path, dpi: int = 120) -> Path:
    """Atomically save a matplotlib figure as PNG and close it."""
    plt = _pyplot()
    try:
        return _atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
    finally:
        plt.close(fig)


def _pyplot():
    # imported on first use: pyplot needs the non-interactive backend chosen before its import
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_joint_corner(corner: np.ndarray, bin_size: int, path: Path) -> Path:
    """Fig. 3a: the upper-left corner of P, linear and log scale, block borders marked."""
    plt = _pyplot()
    k = corner.shape[0] // bin_size
    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    floor = max(float(corner[corner > 0].min()) if (corner > 0).any() else 1e-12, 1e-12)
    panels = [(corner, "P (linear)"), (np.log10(np.maximum(corner, floor)), "log10 P")]
    for ax, (img, title) in zip(axes, panels):
        im = ax.imshow(img, cmap="viridis", interpolation="nearest")
        for b in range(1, k):
            ax.axhline(b * bin_size - 0.5, color="white", lw=0.4, alpha=0.6)
            ax.axvline(b * bin_size - 0.5, color="white", lw=0.4, alpha=0.6)
        ax.set_title(f"{title}: first {k} variables (ideal: diag 1/B, off-block 1/B^2)", fontsize=8)
        ax.set_xlabel("unit (view 2)")
        ax.set_ylabel("unit (view 1)")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_views(
    images: Sequence[np.ndarray], codes: Sequence[np.ndarray], bin_size: int, path: Path
) -> Path:
    """Figs. 3b-c: each view and its soft one-hot vectors over the first variables."""
    plt = _pyplot()
    fig, axes = plt.subplots(
        len(images), 2, figsize=(12, 2.6 * len(images)), gridspec_kw={"width_ratios": [1, 5]}
    )
    axes = np.atleast_2d(axes)
    colours = plt.get_cmap("tab10")
    for r, (img, q) in enumerate(zip(images, codes)):
        axes[r, 0].imshow(img)
        axes[r, 0].set_axis_off()
        axes[r, 0].set_title(f"view {r + 1}", fontsize=9)
        ax = axes[r, 1]
        for m in range(q.shape[0]):
            x = np.arange(m * bin_size, (m + 1) * bin_size)
            ax.bar(x, q[m], width=1.0, color=colours(m % 10))
        ax.set_xlim(-0.5, q.shape[0] * bin_size - 0.5)
        ax.set_ylim(0, 1.02)
        ax.set_ylabel("q")
        ax.set_title(
            f"codes of the first {q.shape[0]} variables (one colour per variable)", fontsize=9
        )
    axes[-1, 1].set_xlabel("unit")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_grid(rows: Sequence[tuple[str, Sequence[np.ndarray]]], title: str, path: Path) -> Path:
    """A grid of images, one titled row per unit (Figs. 4 and 5)."""
    plt = _pyplot()
    ncols = max(1, max((len(imgs) for _, imgs in rows), default=1))
    nrows = max(1, len(rows))
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.4 * ncols + 1.6, 1.5 * nrows + 0.4))
    axes = np.array(axes).reshape(nrows, ncols)
    for ax in axes.flat:
        ax.set_axis_off()
    for r, (label, imgs) in enumerate(rows):
        for c, img in enumerate(imgs):
            axes[r, c].imshow(img)
        axes[r, 0].text(
            -0.08, 0.5, label, transform=axes[r, 0].transAxes, ha="right", va="center", fontsize=8
        )
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0.1, 0, 1, 0.95))
    return save_figure(fig, path)


def exemplar_figures(
    cam_fn: GradCAM,
    exemplars: UnitExemplars,
    load: Any,
    bin_size: int,
    units_per_variable: int,
    out: Path,
    device: torch.device,
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

    Returns:
        {summary name: written path}.
    """
    outputs = {}
    for v in progress(exemplars.variables, desc="exemplars"):
        rows, cam_rows = [], []
        for u in exemplars.top_units(v, units_per_variable):
            imgs = torch.stack([load(i) for i, _ in exemplars.exemplars(v, u)])
            count = int(exemplars.counts[exemplars.variables.index(v), u])
            label = f"unit {u}\n(#{v * bin_size + u})\nn={count}"
            cams = cam_fn(imgs.to(device), unit_score(v, u, bin_size)).numpy()
            rows.append((label, [to_uint8(x) for x in imgs]))
            cam_rows.append((label, [overlay(to_uint8(x), c) for x, c in zip(imgs, cams)]))
        outputs[f"exemplars, variable {v} (Fig. 4)"] = plot_grid(
            rows, f"variable {v}: top images of its most used units", out / f"exemplars_var{v}.png"
        )
        outputs[f"Grad-CAM, variable {v} (Fig. 5)"] = plot_grid(
            cam_rows, f"variable {v}: Grad-CAM of each image's unit", out / f"gradcam_var{v}.png"
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
        rows.append((f"{name}\nunit {u} q={q:.2f}", [img, overlay(img, cams[i])]))
    return plot_grid(rows, f"variable {variable}: Grad-CAM", path)

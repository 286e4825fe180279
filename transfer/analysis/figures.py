"""Files and figures of the code analysis (paper Fig. 3): atomic .npy / .npz / figure writers,
the shared figure look, the joint-matrix and two-view plots of :mod:`transfer.analysis.analyze`.
The image grids of Figs. 4-5 (exemplars, Grad-CAM) are :mod:`transfer.analysis.grids`.

Figures are written as PNG, PDF or SVG (:class:`FigureStyle`, from ``figures.format`` and
``figures.dpi``). Every colour scale has a labelled colorbar naming its quantity and unit; maps
use perceptually uniform colormaps (viridis for probabilities, inferno for Grad-CAM, a diverging
red-blue map centred on zero for dependence); block separators and ticks follow the variables.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from pretrain.config import ConfigError
from pretrain.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from pretrain.fileio import atomic_write

FORMATS = ("png", "pdf", "svg")
# decades of joint probability shown below the largest entry (smaller values share the lowest
# colour): enough to separate the ideal diagonal 1/B from the ideal off-block 1/B^2 for B <= 300
LOG_DECADES = 5.0
# shared look of every figure: small serif-free fonts sized for a two-column paper
STYLE = {
    "font.size": 8,
    "axes.titlesize": 9,
    "axes.labelsize": 8,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "legend.fontsize": 7,
    "figure.titlesize": 10,
    "svg.fonttype": "none",  # text stays text in SVG (editable, searchable)
    "pdf.fonttype": 42,  # TrueType in PDF (journals reject Type 3 fonts)
}


@dataclass(frozen=True)
class FigureStyle:
    """How figures are written.

    Args:
        format: file format, one of :data:`FORMATS`.
        dpi: resolution of PNGs and of the images embedded in PDF / SVG.
    """

    format: str = "png"
    dpi: int = 300

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ConfigError(
                f"figures.format must be one of {', '.join(FORMATS)}, got {self.format!r}"
            )
        if int(self.dpi) < 10:
            raise ConfigError(f"figures.dpi must be at least 10, got {self.dpi!r}")

    def path(self, folder: Path, stem: str) -> Path:
        """``folder / stem.<format>``."""
        return Path(folder) / f"{stem}.{self.format}"


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Undo the ImageNet normalisation of a (3, H, W) tensor -> (H, W, 3) uint8."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    img = (x.detach().cpu().float() * std + mean).clamp(0, 1)
    return (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def _atomic(path: Path, write) -> Path:
    """Run ``write(tmp_path)`` inside ``pretrain.fileio.atomic_write`` (fsync, rename)."""
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


def save_figure(fig, path: Path, dpi: int = 300) -> Path:
    """Atomically save a matplotlib figure (format from the suffix of ``path``) and close it.

    The bounding box is cropped to the drawn content; PDF and SVG carry no creation date, so
    the same figure gives the same file.
    """
    plt = pyplot()
    fmt = Path(path).suffix.lstrip(".").lower()
    if fmt not in FORMATS:
        raise ValueError(f"{path}: figure format {fmt!r} is not one of {', '.join(FORMATS)}")
    metadata = {"png": None, "pdf": {"CreationDate": None}, "svg": {"Date": None}}[fmt]

    def write(tmp: Path) -> None:
        with plt.rc_context(STYLE):
            fig.savefig(
                tmp, format=fmt, dpi=dpi, bbox_inches="tight", pad_inches=0.04, metadata=metadata
            )

    try:
        return _atomic(path, write)
    finally:
        plt.close(fig)


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend."""
    # imported on first use: pyplot needs the non-interactive backend chosen before its import
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _variable_ticks(ax, k: int, bin_size: int, axes: str, sep_colour: str) -> None:
    """Ticks at the centre of each variable's B units, labelled by variable index, and a thin
    separator line every B units, on the x axis, the y axis or both (``axes``: "x", "y", "xy")."""
    step = max(1, math.ceil(k / 16))  # at most ~16 labels per axis
    centres = [m * bin_size + (bin_size - 1) / 2 for m in range(0, k, step)]
    names = [str(m) for m in range(0, k, step)]
    for b in range(1, k):
        if "x" in axes:
            ax.axvline(b * bin_size - 0.5, color=sep_colour, lw=0.6)
        if "y" in axes:
            ax.axhline(b * bin_size - 0.5, color=sep_colour, lw=0.6)
    if "x" in axes:
        ax.set_xticks(centres, names)
    if "y" in axes:
        ax.set_yticks(centres, names)
    ax.tick_params(length=0)


def log_joint(corner: np.ndarray, decades: float = LOG_DECADES) -> tuple[np.ndarray, float, float]:
    """log10 of the joint probabilities over the range of the data, at most ``decades`` deep.

    Returns:
        (log10 P with entries below the floor set to it, floor, log10 of the largest entry); the
        floor is the smallest positive entry, or ``decades`` below the largest if that is higher.
        All in float64 whatever the dtype of ``corner``, so every returned entry lies within
        [floor, largest] exactly (in float32 the clipped entries could fall an ulp below it).
    """
    corner = np.asarray(corner, dtype=np.float64)
    positive = corner[corner > 0]
    if positive.size == 0:
        return np.full(corner.shape, -decades), -decades, 0.0
    vmax = math.log10(float(positive.max()))
    vmin = max(math.log10(float(positive.min())), vmax - decades)
    if vmax - vmin < 1e-6:  # a constant matrix: give the colour scale some width
        vmin -= 0.5
    return np.log10(np.maximum(corner, 10.0**vmin)), vmin, vmax


def floor_clips(corner: np.ndarray, vmin: float) -> bool:
    """Whether :func:`log_joint` raised an entry of ``corner`` to its floor ``vmin``.

    True for a zero entry, or when the floor is the decades limit above the smallest positive
    entry. Compares logs computed as ``log_joint`` computes them (``10 ** vmin`` itself can round
    above the smallest entry when that entry is the floor).
    """
    corner = np.asarray(corner, dtype=np.float64)
    positive = corner[corner > 0]
    if positive.size < corner.size:
        return True
    return math.log10(float(positive.min())) < vmin


def pointwise_dependence(corner: np.ndarray, bin_size: int) -> np.ndarray:
    """log2 P / (p1 p2) per block: each block's joint over the product of its own marginals.

    0 everywhere for independent variables; log2 B on the diagonal of a diagonal block when both
    views pick the same unit of a uniform variable. NaN where a unit is never used (a zero
    marginal); -inf where P is 0 but both marginals are not.
    """
    k = corner.shape[0] // bin_size
    blocks = corner.astype(np.float64).reshape(k, bin_size, k, bin_size)
    rows = blocks.sum(axis=3, keepdims=True)  # p1 of the row variable, per block
    cols = blocks.sum(axis=1, keepdims=True)  # p2 of the column variable, per block
    independent = rows * cols  # (k, B, k, B)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.log2(blocks / independent)
    out[independent == 0] = np.nan
    return out.reshape(corner.shape)


def joint_figure(corner: np.ndarray, bin_size: int, views: tuple[str, str] = ("view 1", "view 2")):
    """Fig. 3a: the upper-left corner of P on a log scale, and its dependence structure.

    Args:
        corner: the first k * B rows and columns of P.
        bin_size: B.
        views: names of the row and column views (the clean view twice for a self-joint).

    Returns:
        The figure: (a) log10 P with block separators, the ideal levels 1/B and 1/B^2 marked on
        its colorbar when they fall in its range; (b) log2 P / (p1 p2) per block (pointwise
        mutual information, bits).
    """
    plt = pyplot()
    from matplotlib.colors import Normalize

    k = corner.shape[0] // bin_size
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, 2, figsize=(7.4, 3.3), layout="constrained")
        logp, vmin, vmax = log_joint(corner)
        ax = axes[0]
        im = ax.imshow(logp, cmap="viridis", vmin=vmin, vmax=vmax, interpolation="nearest")
        clipped = floor_clips(corner, vmin)
        cb = fig.colorbar(im, ax=ax, shrink=0.9, extend="min" if clipped else "neither")
        cb.set_label("joint probability P (log10)")
        for value, name in ((1 / bin_size, "1/B"), (1 / bin_size**2, "1/B²")):
            level = math.log10(value)
            if vmin <= level <= vmax:
                cb.ax.axhline(level, color="white", lw=1.2)
                cb.ax.text(
                    -0.15,
                    level,
                    name,
                    transform=cb.ax.get_yaxis_transform(),
                    ha="right",
                    va="center",
                    fontsize=6,
                )
        ax.set_title(f"(a) joint probability P, first {k} variables")
        _variable_ticks(ax, k, bin_size, "xy", "white")
        ax.set_xlabel(f"variable ({views[1]}, {bin_size} units each)")
        ax.set_ylabel(f"variable ({views[0]})")

        ax = axes[1]
        limit = math.log2(bin_size)
        cmap = plt.get_cmap("RdBu_r").with_extremes(bad="0.8")
        dep = np.clip(pointwise_dependence(corner, bin_size), -limit, limit)
        im = ax.imshow(dep, cmap=cmap, norm=Normalize(-limit, limit), interpolation="nearest")
        cb = fig.colorbar(im, ax=ax, shrink=0.9)
        cb.set_label("pointwise MI log2 P / (p1 p2) (bits; 0: independent)")
        ax.set_title("(b) P relative to independence")
        _variable_ticks(ax, k, bin_size, "xy", "0.35")
        ax.set_xlabel(f"variable ({views[1]})")
        ax.set_ylabel(f"variable ({views[0]})")
    return fig


def plot_joint_corner(
    corner: np.ndarray,
    bin_size: int,
    path: Path,
    dpi: int = 300,
    views: tuple[str, str] = ("view 1", "view 2"),
) -> Path:
    """Write :func:`joint_figure` to ``path`` (format from its suffix)."""
    return save_figure(joint_figure(corner, bin_size, views), path, dpi)


def plot_views(
    images: Sequence[np.ndarray], codes: np.ndarray, bin_size: int, path: Path, dpi: int = 300
) -> Path:
    """Figs. 3b-c: each view and its soft one-hot vectors over the first variables.

    Args:
        images: the two views, (H, W, 3) uint8 each.
        codes: (views, m, B) soft codes of the first m variables.
        bin_size: B.
        path: output file (format from its suffix).
        dpi: raster resolution.
    """
    plt = pyplot()
    from matplotlib.patches import Patch

    codes = np.asarray(codes)
    m = codes.shape[1]
    colours = plt.get_cmap("tab10" if m <= 10 else "tab20")
    n_colours = colours.N
    argmax = codes.argmax(axis=2)
    with plt.rc_context(STYLE):
        size = (7.2, 1.45 * len(images) + 0.5)
        grid = dict(layout="constrained", gridspec_kw={"width_ratios": [1, 6]}, squeeze=False)
        fig, axes = plt.subplots(len(images), 2, figsize=size, **grid)
        for r, (img, q) in enumerate(zip(images, codes)):
            axes[r, 0].imshow(img)
            axes[r, 0].set_xticks([])
            axes[r, 0].set_yticks([])
            axes[r, 0].set_ylabel(f"view {r + 1}")
            ax = axes[r, 1]
            for v in range(m):
                x = np.arange(v * bin_size, (v + 1) * bin_size)
                ax.bar(x, q[v], width=1.0, color=colours(v % n_colours))
            _variable_ticks(ax, m, bin_size, "x", "0.8")
            ax.set_xlim(-0.5, m * bin_size - 0.5)
            ax.set_ylim(0, 1.02)
            ax.set_ylabel("code probability q")
            ax.spines[["top", "right"]].set_visible(False)
            if r > 0:
                same = int((argmax[r] == argmax[0]).sum())
                ax.set_title(
                    f"view {r + 1}: same argmax unit as view 1 in {same} of {m} variables",
                    loc="left",
                )
            else:
                ax.set_title(f"view 1: soft codes of the first {m} variables", loc="left")
        axes[-1, 1].set_xlabel(f"variable ({bin_size} units each)")
        handles = [Patch(color=colours(v % n_colours), label=f"variable {v}") for v in range(m)]
        style = dict(frameon=False, handlelength=1.0, columnspacing=1.0)
        fig.legend(handles=handles, loc="outside lower center", ncol=min(m, 10), **style)
    return save_figure(fig, path, dpi)

"""Figures of the code analysis: file formats, resolution, and a readable joint matrix."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from transfer.analysis.figures import (
    FigureStyle,
    floor_clips,
    joint_figure,
    log_joint,
    plot_joint_corner,
    plot_views,
    pointwise_dependence,
)
from transfer.analysis.gradcam import overlay
from transfer.analysis.grids import GridRow, plot_grid
from transfer.analysis.joint import joint_matrix

B, M = 8, 4
MAGIC = {"png": b"\x89PNG\r\n\x1a\n", "pdf": b"%PDF", "svg": b"<?xml"}


def peaked_joint(seed: int = 0, n: int = 2000) -> np.ndarray:
    """P of near one-hot codes shared by both views: mass on one pixel per diagonal row and
    1 / B^2 off the diagonal blocks, values spread over many decades (the case a linear colour
    scale shows as an almost black square)."""
    rng = np.random.default_rng(seed)
    units = rng.integers(0, B, size=(n, M))
    logits = torch.tensor(np.eye(B)[units] * 12.0 + rng.normal(0, 0.5, (n, M, B)))
    q = torch.softmax(logits, dim=-1).float().reshape(n, M * B)
    return joint_matrix(q, q).numpy()


def panel_pixels(fig, index: int) -> np.ndarray:
    """RGB pixels (0-1) of the image drawn in axes ``index`` of a rendered figure."""
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba(), dtype=np.float64)[..., :3] / 255.0
    box = fig.axes[index].get_window_extent()
    h = rgba.shape[0]
    rows = slice(int(h - box.y1) + 2, int(h - box.y0) - 2)
    return rgba[rows, int(box.x0) + 2 : int(box.x1) - 2]


def test_joint_panel_is_not_almost_uniformly_dark():
    corner = peaked_joint()
    # on a linear colour scale over 90% of the pixels would sit in its darkest fifth
    assert (corner < 0.2 * corner.max()).mean() > 0.9
    fig = joint_figure(corner, B)
    try:
        pixels = panel_pixels(fig, 0)
        brightness = pixels.mean(axis=-1)
        assert pixels.shape[0] > 100 and pixels.shape[1] > 100
        # viridis: dark purple at the bottom of the scale, green / yellow above its middle
        assert (brightness > 0.35).mean() > 0.4, (brightness > 0.35).mean()
        labels = [ax.get_ylabel() for ax in fig.axes]
        assert "joint probability P (log10)" in labels
        assert any("pointwise MI" in label and "bits" in label for label in labels)
        # ticks name the variables, one per block
        assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == [str(m) for m in range(M)]
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


def test_log_scale_and_dependence_values():
    corner = peaked_joint()
    assert corner.dtype == np.float32  # the dtype the analysis hands over
    logp, vmin, vmax = log_joint(corner)
    assert logp.dtype == np.float64  # bounds and values in one precision
    assert vmax == math.log10(float(corner.max()))  # the library's own computation
    # float64 throughout: the clipped entries are log10(10 ** vmin), within a few ulps of vmin
    ulps = 4 * np.finfo(np.float64).eps * abs(vmin)
    assert vmax - 5.0 - ulps <= vmin < vmax and logp.min() >= vmin - ulps
    assert logp.max() <= vmax + 4 * np.finfo(np.float64).eps * max(abs(vmax), 1.0)
    assert not floor_clips(corner, vmin)  # the smallest entry is the floor: nothing clipped
    for seed in range(6):  # 10 ** vmin rounds above the minimum for some of these
        c = peaked_joint(seed)
        assert not floor_clips(c, log_joint(c)[1])
    wide = corner.copy()
    wide[0, 0] = corner.max() * 1e-9  # nine decades below the peak: the 5-decade floor clips
    assert floor_clips(wide, log_joint(wide)[1])
    zero = corner.copy()
    zero[0, 1] = 0.0
    assert floor_clips(zero, log_joint(zero)[1])
    dep = pointwise_dependence(corner, B)
    blocks = dep.reshape(M, B, M, B)
    # off-diagonal blocks: independent variables -> about 0 bits; diagonal: log2 B on the
    # diagonal of each diagonal block (both views pick the same unit)
    off = np.concatenate([blocks[a, :, b].ravel() for a in range(M) for b in range(M) if a != b])
    assert np.abs(np.nan_to_num(off)).mean() < 0.2
    diag = np.array([blocks[m, u, m, u] for m in range(M) for u in range(B)])
    assert np.all(diag > np.log2(B) - 0.3)
    # a unit nobody uses has no dependence value
    unused = corner.copy()
    unused[:, 0] = unused[0, :] = 0.0
    assert np.isnan(pointwise_dependence(unused, B)[0, 1])


@pytest.mark.parametrize("fmt", ["png", "pdf", "svg"])
def test_every_figure_in_every_format(tmp_path, fmt):
    style = FigureStyle(fmt, 100)
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
    codes = rng.dirichlet(np.ones(B), size=(2, 3))
    cam = overlay(img, rng.random((32, 32)))
    rows = [
        GridRow(f"variable 1, unit {u}\n5 images (50%)", [img] * 8, ["q = 0.90"] * 8)
        for u in range(4)
    ]
    paths = [
        plot_joint_corner(peaked_joint(), B, style.path(tmp_path, "joint"), style.dpi),
        plot_views([img, img], codes, B, style.path(tmp_path, "views"), style.dpi),
        plot_grid(rows, "title", style.path(tmp_path, "grid"), style.dpi,
                  column_labels=[f"rank {c + 1}" for c in range(8)]),
        plot_grid([GridRow("a.png", [img, cam])], "cam", style.path(tmp_path, "cam"),
                  style.dpi, colorbar_label="Grad-CAM relevance"),
    ]  # fmt: skip
    for path in paths:
        assert path.suffix == f".{fmt}" and path.exists()
        data = path.read_bytes()
        assert data.startswith(MAGIC[fmt]), path
        assert 2_000 < len(data) < 5_000_000, (path, len(data))
        if fmt == "png":
            with Image.open(path) as im:
                assert 250 <= im.width <= 3000 and 100 <= im.height <= 3000, (path, im.size)
                # a full grid is mostly image: tight cells, trimmed margins (the former layout
                # left 42% of this grid blank)
                if path.stem == "grid":
                    white = (np.asarray(im.convert("L")) > 250).mean()
                    assert white < 0.33, white


def test_resolution_and_bad_style(tmp_path):
    small = plot_joint_corner(peaked_joint(), B, tmp_path / "a.png", dpi=60)
    large = plot_joint_corner(peaked_joint(), B, tmp_path / "b.png", dpi=180)
    with Image.open(small) as a, Image.open(large) as b:
        assert b.width == pytest.approx(3 * a.width, rel=0.05)
    with pytest.raises(ValueError, match="figures.format"):
        FigureStyle("jpg")
    with pytest.raises(ValueError, match="figure format"):
        plot_joint_corner(peaked_joint(), B, tmp_path / "c.jpg")

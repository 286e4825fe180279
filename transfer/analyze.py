"""Discrete-variable analysis of an IMSVD model (paper Sec. III-E and V-C, Figs. 3-5).

    python -m transfer.analyze --weights outputs/demo/checkpoint_e0001_s000128.pth \\
        --data-root .cache/fashion_mnist/test --output-dir outputs/demo/analysis --num-images 2000

Streams a dataset through backbone + projector (weights from a training-state checkpoint, which
carries the projector; ``--weights random --config RECIPE`` analyses a randomly initialised model)
and writes, into ``--output-dir``:

* ``stats.json``: one-hot rates, marginal entropies vs log B, pairwise mutual information (and its
  finite-sample floor), diagonal-block trace, the loss's DE / OE terms, cross-view agreement;
* ``code_stats.npz``: per-variable marginals, the M x M MI matrix (and floor), block entropies;
* ``joint_corner.npy`` / ``joint_corner.png``: the cross-joint matrix P over the first k variables
  (Fig. 3a); ``--save-full-joint`` adds ``joint_full.npy`` (the whole D x D, fp32);
* ``views.png``: two augmented views of one image and their first variables' codes (Figs. 3b-c);
* ``exemplars_var{m}.png``: top images of the most populated units of each chosen variable
  (Fig. 4) and ``gradcam_var{m}.png``: their Grad-CAM maps (Fig. 5);
* ``gradcam_images.png``: Grad-CAM maps on the images given with ``--gradcam-images``.

P is accumulated in fp32 on the device without keeping embeddings (4 D^2 bytes, twice with the
independence floor). The codes of the clean (resize + centre crop) view give the one-hot rates,
marginals and exemplars; the two augmented views (the pretraining augmentations, drawn
deterministically from ``--seed`` and the image index) give P and the agreement. With
``--views same`` P is built from the clean view alone (self-joint matrix).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from pretrain.checkpoint import load_backbone, load_projector
from pretrain.config import load_config, resolve_config_path
from pretrain.data import build_image_dataset, load_rgb
from pretrain.log import format_table, progress, write_json_atomic
from pretrain.model import IMSVDModel, Projector, build_backbone, build_model
from pretrain.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    AugmentConfig,
    eval_transform,
    reference_two_views,
    sample_two_views,
)
from transfer.codes import (
    CodeStatsAccumulator,
    JointAccumulator,
    UnitExemplars,
    soft_codes,
    summarize,
)
from transfer.gradcam import GradCAM, choose_layer, overlay, unit_score

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "pretrain"


class AnalysisError(ValueError):
    """Invalid analysis request (missing bin size, variable out of range, ...)."""


# ----------------------------------------------------------------------------------- model


def load_model(
    weights: str, config: str | None = None, seed: int = 0
) -> tuple[IMSVDModel, dict[str, Any]]:
    """Backbone + projector from a training-state checkpoint, or randomly initialised.

    Args:
        weights: checkpoint path, or "random" (then ``config`` is required).
        config: pretraining recipe (path or name in configs/pretrain/) for "random"; for a
            checkpoint it overrides nothing and is only used when the file carries no config.
        seed: torch seed for the random initialisation.

    Returns:
        (eval-mode model, info) with info keys "weights", "arch", "stem", "projector", "config"
        (the recipe dict or None) and, for checkpoints, "epoch" and "sha256".
    """
    cfg = load_config(resolve_config_path(config, CONFIG_DIR)) if config else None
    if weights == "random":
        if cfg is None:
            raise AnalysisError("--weights random needs --config RECIPE to know the architecture")
        torch.manual_seed(seed)
        model = build_model(cfg["model"])
        info = {"weights": "random", "epoch": None, "sha256": None}
    else:
        if not Path(weights).is_file():
            raise AnalysisError(f"--weights {weights!r}: no such file")
        bsd, bmeta = load_backbone(weights)
        psd, pmeta = load_projector(weights)
        if not pmeta.get("matches_projector", False):
            raise AnalysisError(
                f"{weights}: projector weights do not fit Projector({pmeta['in_dim']}, "
                f"'{pmeta['spec']}'): {pmeta.get('mismatch')}"
            )
        backbone = build_backbone(bmeta["arch"], stem=bmeta["stem"])
        backbone.load_state_dict(bsd, strict=True)
        projector = Projector(pmeta["in_dim"], pmeta["spec"])
        projector.load_state_dict(psd, strict=True)
        model = IMSVDModel(backbone, projector)
        cfg = bmeta.get("config") or cfg
        info = {"weights": str(weights), "epoch": bmeta.get("epoch"), "sha256": bmeta["sha256"]}
    info.update(
        arch=model.backbone.arch,
        stem=model.backbone.stem,
        projector=model.projector.spec,
        config=cfg,
    )
    return model.eval(), info


def _from_config(cfg: dict | None, section: str, key: str) -> Any:
    if isinstance(cfg, dict) and isinstance(cfg.get(section), dict):
        return cfg[section].get(key)
    return None


# ------------------------------------------------------------------------------------ data


class AnalysisViews(Dataset):
    """Items (clean view, augmented view 1, view 2, dataset index) of an image dataset.

    Augmented views reuse the pretraining augmentation with parameters drawn from
    (seed, 0, index), so they do not depend on worker count or order.

    Args:
        base: dataset returning (PIL image, label) (transform None).
        indices: dataset indices to analyse.
        clean: transform of the clean view.
        augment: augmentation config of the two views; None: no augmented views.
        seed: augmentation seed.
    """

    def __init__(
        self,
        base: Dataset,
        indices: Sequence[int],
        clean: Any,
        augment: AugmentConfig | None,
        seed: int = 0,
    ) -> None:
        self.base, self.indices, self.clean = base, list(indices), clean
        self.augment, self.seed = augment, seed

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, pos: int):
        index = self.indices[pos]
        img, _ = self.base[index]
        clean = self.clean(img)
        if self.augment is None:
            return clean, clean, clean, index
        params = sample_two_views(self.seed, 0, index, img.width, img.height, self.augment)
        v1, v2 = reference_two_views(img, params, self.augment)
        return clean, v1, v2, index


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Undo the ImageNet normalisation of a (3, H, W) tensor -> (H, W, 3) uint8."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    img = (x.detach().cpu().float() * std + mean).clamp(0, 1)
    return (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


# ------------------------------------------------------------------------------- file output


def _atomic(path: Path, write) -> Path:
    """Run ``write(tmp_path)`` inside ``pretrain.checkpoint.atomic_write`` (fsync, rename)."""
    from pretrain.checkpoint import atomic_write

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
    import matplotlib.pyplot as plt

    try:
        return _atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
    finally:
        plt.close(fig)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ----------------------------------------------------------------------------------- plots


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


# -------------------------------------------------------------------------------- analysis


def _stats_table(stats: dict) -> list[dict]:
    """Rows (statistic, value, ideal) for the printed summary."""
    log_b = stats["log_bin_size"]

    def f(v: Any) -> str:
        return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)

    spec = [
        ("onehot_0.9", "sub-vectors with max > 0.9", 1.0),
        ("onehot_0.99", "sub-vectors with max > 0.99", 1.0),
        ("marginal_entropy_mean", "marginal entropy, mean (nats)", log_b),
        ("marginal_entropy_min", "marginal entropy, min (nats)", log_b),
        ("hard_marginal_entropy_mean", "argmax-marginal entropy (nats)", log_b),
        ("active_units_mean", "units in use per variable", float(stats["bin_size"])),
        ("offblock_mi_mean", "off-block MI, mean (nats)", 0.0),
        ("offblock_mi_max", "off-block MI, max (nats)", 0.0),
        ("offblock_mi_floor_mean", "  independence floor at this N", None),
        ("crossview_mi_mean", "MI(view 1, view 2) per variable", log_b),
        ("diag_trace_mean", "diagonal-block mass on diagonal", 1.0),
        ("loss_dia_term", "DE term (sum p log p / M)", -log_b),
        ("loss_off_term", "OE term (sum p log p / M(M-1))", -2 * log_b),
        ("agreement", "cross-view argmax agreement", 1.0),
    ]
    return [
        {"statistic": label, "value": f(stats.get(key)), "ideal": f(ideal)}
        for key, label, ideal in spec
        if key in stats
    ]


@torch.no_grad()
def _codes(model: nn.Module, x: torch.Tensor, bin_size: int, temperature: float, device):
    return soft_codes(model(x.to(device, non_blocking=True)), bin_size, temperature)


@torch.no_grad()
def stream_statistics(
    model: nn.Module,
    loader: DataLoader,
    bin_size: int,
    temperature: float,
    device: torch.device,
    two_views: bool,
    variables: Sequence[int],
    top_n: int,
    floor: bool = True,
) -> tuple[CodeStatsAccumulator, JointAccumulator, UnitExemplars]:
    """One pass over ``loader`` (items of :class:`AnalysisViews`) accumulating every statistic.

    Returns:
        (clean-view statistics, joint accumulator, unit exemplars).
    """
    dim = model.projector.out_dim
    stats_acc = CodeStatsAccumulator(dim // bin_size, bin_size, device=device)
    joint_acc = JointAccumulator(dim, bin_size, device=device, floor=floor)
    exemplars = UnitExemplars(variables, bin_size, top_n=top_n)
    for clean, v1, v2, idx in progress(loader, total=len(loader), desc="analyze"):
        q0 = _codes(model, clean, bin_size, temperature, device)
        stats_acc.update(q0)
        exemplars.update(q0, idx)
        if two_views:
            q1 = _codes(model, v1, bin_size, temperature, device)
            q2 = _codes(model, v2, bin_size, temperature, device)
            joint_acc.update(q1, q2)
        else:
            joint_acc.update(q0)
    return stats_acc, joint_acc, exemplars


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
    qv = _codes(model, images, bin_size, temperature, device)[:, variable].cpu()
    units = qv.argmax(dim=1) if unit is None else torch.full((len(images),), int(unit))
    cams = cam_fn(images.to(device), unit_score(variable, units, bin_size)).numpy()
    rows = []
    for i, (name, u) in enumerate(zip(names, units.tolist())):
        img = to_uint8(images[i])
        q = float(qv[i, u]) if 0 <= u < bin_size else float("nan")
        rows.append((f"{name}\nunit {u} q={q:.2f}", [img, overlay(img, cams[i])]))
    return plot_grid(rows, f"variable {variable}: Grad-CAM", path)


def run_analysis(args: argparse.Namespace) -> dict[str, Any]:
    """Run the whole analysis; returns {"stats": dict, "outputs": {name: path}}."""
    t0 = time.perf_counter()
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    model, info = load_model(args.weights, args.config, args.seed)
    model.to(device)
    cfg = info.pop("config")
    bin_size = args.bin_size or _from_config(cfg, "loss", "bin_size")
    if not bin_size:
        raise AnalysisError("the checkpoint carries no loss.bin_size: pass --bin-size")
    bin_size = int(bin_size)
    temperature = float(args.temperature or _from_config(cfg, "loss", "temperature") or 1.0)
    dim = model.projector.out_dim
    if dim % bin_size:
        raise AnalysisError(f"projector width {dim} is not a multiple of bin size {bin_size}")
    m = dim // bin_size
    variables = list(dict.fromkeys(args.variables))
    bad = [v for v in variables + [args.gradcam_variable or 0] if not 0 <= v < m]
    if bad:
        raise AnalysisError(f"variables {bad} out of range: the model has {m} variables")
    image_size = int(args.image_size or _from_config(cfg, "data", "image_size") or 224)
    resize = int(args.resize or round(image_size * 256 / 224))
    scale = _from_config(cfg, "data", "crop_scale") or (0.08, 1.0)
    augment = None
    if args.views == "two":
        augment = AugmentConfig(size=image_size, scale=(float(scale[0]), float(scale[1])))
    clean_tf = eval_transform(resize=resize, crop=image_size)

    base = build_image_dataset(root=args.data_root, list_file=args.list_file)
    n_total = len(base)
    if args.num_images and args.num_images < n_total:
        g = torch.Generator().manual_seed(args.seed)
        indices = torch.randperm(n_total, generator=g)[: args.num_images].sort().values.tolist()
    else:
        indices = list(range(n_total))
    views = AnalysisViews(base, indices, clean_tf, augment, args.seed)
    # Shuffled: the independence floor pairs each sample with the one streamed before it, which
    # in a class-sorted tree would be an image of the same class (a dependent pair). Every other
    # statistic is a sum and does not depend on the order.
    loader = DataLoader(
        views,
        batch_size=args.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(args.seed),
        num_workers=args.num_workers,
        pin_memory=device.type == "cuda",
    )
    stats_acc, joint_acc, exemplars = stream_statistics(
        model,
        loader,
        bin_size,
        temperature,
        device,
        augment is not None,
        variables,
        args.exemplars,
        floor=not args.no_floor,
    )
    stats, arrays = summarize(stats_acc, joint_acc)
    stats.update(
        views=args.views,
        temperature=temperature,
        image_size=image_size,
        data_root=str(args.data_root),
        dataset_size=n_total,
        skipped_images=getattr(base, "num_skipped", 0),
        **info,
    )

    out = Path(args.output_dir)
    outputs: dict[str, Path] = {}
    joint = joint_acc.joint()
    k = min(args.corner_vars, m)
    corner = joint[: k * bin_size, : k * bin_size].cpu().numpy()
    outputs["joint corner (npy)"] = save_npy(corner, out / "joint_corner.npy")
    if args.save_full_joint:
        outputs["joint matrix (npy)"] = save_npy(joint.cpu().numpy(), out / "joint_full.npy")
    del joint, joint_acc  # free the D x D accumulators before the figures
    npz = {name: v.cpu().numpy() for name, v in arrays.items()}
    outputs["block statistics (npz)"] = save_npz(npz, out / "code_stats.npz")
    path = out / "joint_corner.png"
    outputs["joint corner (Fig. 3a)"] = plot_joint_corner(corner, bin_size, path)

    # Figs. 3b-c: two augmented views of one image (the clean view twice with --views same)
    _, v1, v2, _ = views[min(max(args.view_image, 0), len(views) - 1)]
    q = _codes(model, torch.stack([v1, v2]), bin_size, temperature, device)
    q = q[:, : min(args.view_vars, m)].cpu().numpy()
    path = out / "views.png"
    outputs["two views (Figs. 3b-c)"] = plot_views([to_uint8(v1), to_uint8(v2)], q, bin_size, path)

    layer = args.gradcam_layer
    if layer == "auto":
        layer = choose_layer(model.backbone, image_size)
    stats["gradcam_layer"] = layer
    with GradCAM(model, f"backbone.{layer}") as cam_fn:
        outputs.update(
            exemplar_figures(
                cam_fn,
                exemplars,
                lambda i: clean_tf(base[i][0]),
                bin_size,
                args.units_per_variable,
                out,
                device,
            )
        )
        if args.gradcam_images:
            imgs = torch.stack([clean_tf(load_rgb(str(p))) for p in args.gradcam_images])
            v = variables[0] if args.gradcam_variable is None else args.gradcam_variable
            outputs["Grad-CAM, given images"] = gradcam_figure(
                cam_fn,
                model,
                imgs,
                [Path(p).name for p in args.gradcam_images],
                v,
                args.gradcam_unit,
                bin_size,
                temperature,
                out / "gradcam_images.png",
            )
    stats["elapsed_s"] = round(time.perf_counter() - t0, 2)
    write_json_atomic(stats, out / "stats.json")
    outputs["statistics (JSON)"] = out / "stats.json"
    return {"stats": stats, "outputs": outputs}


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    p = argparse.ArgumentParser(
        prog="python -m transfer.analyze",
        description="Measure and show the discrete codes of an IMSVD model (paper Figs. 3-5).",
    )
    p.add_argument(
        "--weights",
        required=True,
        help="training-state checkpoint (carries the projector), or 'random'",
    )
    p.add_argument("--config", help="pretraining recipe; required with --weights random")
    p.add_argument("--data-root", required=True, help="ImageFolder tree (or list-file root)")
    p.add_argument("--list-file", help="'path label' list file, paths relative to --data-root")
    p.add_argument("--output-dir", required=True)
    p.add_argument(
        "--num-images",
        type=int,
        default=0,
        help="analyse a seeded random subset of this many images (0: all)",
    )
    p.add_argument(
        "--variables",
        type=int,
        nargs="+",
        default=[0, 1],
        help="variables for exemplar grids and Grad-CAM (Figs. 4-5)",
    )
    p.add_argument(
        "--units-per-variable", type=int, default=4, help="most populated units shown per variable"
    )
    p.add_argument("--exemplars", type=int, default=8, help="images per unit")
    p.add_argument("--gradcam-images", nargs="+", default=[], help="image files for Grad-CAM")
    p.add_argument(
        "--gradcam-variable",
        type=int,
        help="variable for --gradcam-images " "(default: the first of --variables)",
    )
    p.add_argument(
        "--gradcam-unit",
        type=int,
        help="unit (0..B-1) for --gradcam-images (default: each image's argmax)",
    )
    p.add_argument(
        "--gradcam-layer",
        default="auto",
        help="backbone layer (layer1..layer4); auto: deepest one with >= 4x4 maps",
    )
    p.add_argument(
        "--views",
        choices=("two", "same"),
        default="two",
        help="P from two augmented views (Fig. 3a) or from the clean view alone",
    )
    p.add_argument("--corner-vars", type=int, default=5, help="variables in joint_corner.*")
    p.add_argument("--view-vars", type=int, default=10, help="variables plotted in views.png")
    p.add_argument(
        "--view-image",
        type=int,
        default=0,
        help="position (in the analysed images) of the image for views.png",
    )
    p.add_argument(
        "--save-full-joint",
        action="store_true",
        help="also save the whole D x D matrix (fp32, 4 D^2 bytes)",
    )
    p.add_argument(
        "--no-floor",
        action="store_true",
        help="skip the independence-floor matrix (halves memory and matmul time)",
    )
    p.add_argument("--bin-size", type=int, help="override the checkpoint's loss.bin_size")
    p.add_argument("--temperature", type=float, help="override the checkpoint's loss.temperature")
    p.add_argument("--image-size", type=int, help="input side (default: data.image_size)")
    p.add_argument("--resize", type=int, help="clean view short side (default: size * 256/224)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = build_parser().parse_args(argv)
    try:
        result = run_analysis(args)
    except (ValueError, FileNotFoundError) as e:  # bad paths, checkpoints, data, arguments
        print(f"error: {e}", file=sys.stderr)
        return 2
    stats = result["stats"]
    title = (
        f"discrete codes of {stats['weights']} on {stats['num_images']} images "
        f"(M={stats['num_variables']}, B={stats['bin_size']}, log B={stats['log_bin_size']:.3f})"
    )
    print(format_table(_stats_table(stats), title=title), flush=True)
    print("outputs:", flush=True)
    for name, path in result["outputs"].items():
        print(f"  {name:34s} {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Discrete-variable analysis of an IMSVD model (paper Sec. III-E and V-C, Figs. 3-5).

    imsvd-analyze --weights outputs/demo/checkpoint_e0001_s000128.pth \\
        --output-dir outputs/demo/analysis data.root=.cache/fashion_mnist/test data.num_images=2000

Streams a dataset through backbone + projector (weights from a training-state checkpoint, which
carries the projector; ``--weights random model.recipe=RECIPE`` analyses a randomly initialised
model of a pretraining recipe) and writes, into the output folder (recipe: configs/eval/
analyze.yaml, every option a dotted key):

* ``stats.json``: one-hot rates, marginal entropies vs log B, pairwise mutual information (and its
  finite-sample floor), diagonal-block trace, the loss's DE / OE terms, cross-view agreement;
* ``code_stats.npz``: per-variable marginals, the M x M MI matrix (and floor), block entropies;
* ``joint_corner.npy`` / ``joint_corner.png``: the cross-joint matrix P over the first k variables
  (Fig. 3a) on a log scale, and its pointwise dependence; ``codes.save_full_joint=true`` adds
  ``joint_full.npy`` (the whole D x D, fp32);
* ``views.png``: two augmented views of one image and their first variables' codes (Figs. 3b-c);
* ``exemplars_var{m}.png``: top images of the most populated units of each chosen variable
  (Fig. 4) and ``gradcam_var{m}.png``: their Grad-CAM maps (Fig. 5);
* ``gradcam_images.png``: Grad-CAM maps on the images of ``gradcam.images``.

Figures are PNG by default; ``figures.format=pdf`` (or ``svg``) writes vector files instead and
``figures.dpi`` sets the raster resolution.

P is accumulated in fp32 on the device without keeping embeddings (4 D^2 bytes, twice with the
independence floor). The codes of the clean (resize + centre crop) view give the one-hot rates,
marginals and exemplars; the two augmented views (the pretraining augmentations, drawn
deterministically from ``seed`` and the image index) give P and the agreement. With
``codes.views=same`` P is built from the clean view alone (self-joint matrix). Unreadable images
are left out and counted (``data.strict=true``: an error).
"""

from __future__ import annotations

import sys
import time
from typing import Any

import torch

from pretrain.config import ConfigError, complete_section, find_config, load_config
from pretrain.data.datasets import build_image_dataset
from pretrain.data.transforms import AugmentConfig, eval_transform
from pretrain.errors import IMSVDError
from pretrain.log import format_table
from pretrain.models.build import PretrainModel, build_model, require_projector
from transfer.analysis.codes import summarize
from transfer.analysis.figures import FigureStyle
from transfer.analysis.gradcam import choose_layer
from transfer.analysis.outputs import (
    CodeSettings,
    block_outputs,
    gradcam_outputs,
    save_joint,
    views_figure,
)
from transfer.analysis.stream import (
    AnalysisViews,
    analysis_indices,
    analysis_loader,
    stream_statistics,
)
from transfer.eval import runner
from transfer.eval.inputs import check_weights


class AnalysisError(IMSVDError, ValueError):
    """Invalid analysis request (missing bin size, variable out of range, ...)."""


# ----------------------------------------------------------------------------------- model


def load_model(ctx: runner.EvalContext) -> tuple[PretrainModel, dict[str, Any]]:
    """Backbone + projector from one read of ``model.weights``, or randomly initialised.

    Args:
        ctx: the run's context; ``model.weights`` is a checkpoint path or "random" (then
            ``model.recipe``, a pretraining recipe, is required); ``model.recipe`` is otherwise
            used only when the file carries no recipe.

    Returns:
        (eval-mode model on the device, info) with info keys "weights", "epoch", "sha256",
        "arch", "stem", "projector", "recipe" (the pretraining recipe dict or None).

    Raises:
        AnalysisError: "random" without a recipe. CheckpointError: a file without a usable
            projector.
    """
    m = ctx.cfg["model"]
    recipe = load_config(find_config(m["recipe"], "pretrain")) if m["recipe"] else None
    if m["weights"] == "random":
        if recipe is None:
            raise AnalysisError(
                "--weights random needs the pretraining recipe of the model: model.recipe=NAME "
                "(a name in configs/pretrain or a path; --config selects the analysis recipe)"
            )
        torch.manual_seed(int(ctx.cfg["seed"]))
        model = build_model(recipe["model"]).to(ctx.device)
        info = {"weights": "random", "epoch": None, "sha256": None}
    else:
        backbone, projector, meta = ctx.load_model()
        model = PretrainModel(backbone, require_projector(projector, meta))
        # a reader records the recipe only when the file holds one
        recipe = meta.get("config") or recipe
        info = {"weights": str(m["weights"]), "epoch": meta.get("epoch"), "sha256": meta["sha256"]}
    info.update(
        arch=model.backbone.arch,
        stem=model.backbone.stem,
        projector=model.projector.spec,
        recipe=recipe,
    )
    return model.eval(), info


def recipe_value(recipe: dict | None, dotted: str, required: str = "") -> Any:
    """A pretraining setting of the analysed model: from its recipe, else the schema default.

    Args:
        recipe: the model's pretraining recipe (possibly partial, e.g. from another codebase's
            checkpoint), or None.
        dotted: ``section.key`` of configs/pretrain/base.yaml.
        required: when set, a missing value is an error that names this analysis key instead of
            falling back to the schema default (a default would be a guess about the model).

    Returns:
        The value.
    """
    section, key = dotted.split(".")
    node = recipe.get(section) if isinstance(recipe, dict) else None
    if isinstance(node, dict) and node.get(key) is not None:
        return node[key]
    if required:
        raise AnalysisError(f"the model's recipe does not record {dotted}: set {required}")
    return complete_section({}, "pretrain", section)[key]


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


def validate(cfg: dict) -> None:
    """Cross-field checks of an analyze recipe (raises ConfigError naming the keys)."""
    if not cfg["data"]["root"] and not cfg["data"]["list_file"]:
        raise ConfigError("config key 'data.root' (or data.list_file) is required")
    if cfg["codes"]["views"] not in ("two", "same"):
        raise ConfigError(f"codes.views must be 'two' or 'same', got {cfg['codes']['views']!r}")
    if not cfg["figures"]["variables"]:
        raise ConfigError("figures.variables must name at least one variable")
    try:
        figure_style(cfg)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    if cfg["model"]["weights"] != "random":
        check_weights(cfg)


def figure_style(cfg: dict) -> FigureStyle:
    """The figure format and resolution of an analyze recipe (``figures.format``, ``.dpi``)."""
    return FigureStyle(str(cfg["figures"]["format"]), int(cfg["figures"]["dpi"]))


def code_settings(cfg: dict, dim: int, recipe: dict | None) -> CodeSettings:
    """The :class:`CodeSettings` of an analyze recipe for a projector of width ``dim``.

    Raises:
        AnalysisError: no bin size recorded or given, a width that is not a multiple of it, a
            variable or the Grad-CAM unit out of range.
    """
    c, gc = cfg["codes"], cfg["gradcam"]
    bin_size = int(c["bin_size"] or recipe_value(recipe, "loss.bin_size", "codes.bin_size"))
    temperature = float(c["temperature"] or recipe_value(recipe, "loss.temperature"))
    if dim % bin_size:
        raise AnalysisError(f"projector width {dim} is not a multiple of bin size {bin_size}")
    m = dim // bin_size
    variables = list(dict.fromkeys(int(v) for v in cfg["figures"]["variables"]))
    gradcam_variable = variables[0] if int(gc["variable"]) < 0 else int(gc["variable"])
    bad = [v for v in variables + [gradcam_variable] if not 0 <= v < m]
    if bad:
        raise AnalysisError(f"variables {bad} out of range: the model has {m} variables")
    if int(gc["unit"]) >= bin_size:
        raise AnalysisError(f"gradcam.unit {gc['unit']} out of range: units are 0..{bin_size - 1}")
    return CodeSettings(bin_size, temperature, m, variables, gradcam_variable)


def view_transforms(cfg: dict, recipe: dict | None) -> tuple[int, AugmentConfig | None, Any]:
    """(crop size, the augmentation of the two views or None with ``codes.views=same``, the
    clean view's transform): ``data.crop`` / ``data.resize``, else the model's recipe."""
    d = cfg["data"]
    image_size = int(d["crop"] or recipe_value(recipe, "data.image_size"))
    resize = int(d["resize"] or round(image_size * 256 / 224))
    scale = recipe_value(recipe, "data.crop_scale")
    augment = None
    if cfg["codes"]["views"] == "two":
        augment = AugmentConfig(size=image_size, scale=(float(scale[0]), float(scale[1])))
    return image_size, augment, eval_transform(resize=resize, crop=image_size)


def run(ctx: runner.EvalContext) -> dict[str, Any]:
    """The whole analysis in a set-up context.

    Returns:
        The statistics (``stats.json``) with ``outputs``: {name: written path}.
    """
    t0 = time.perf_counter()
    cfg, out, device = ctx.cfg, ctx.out, ctx.device
    d, c, figs = cfg["data"], cfg["codes"], cfg["figures"]
    model, info = load_model(ctx)
    recipe = info.pop("recipe")
    codes = code_settings(cfg, model.projector.out_dim, recipe)
    image_size, augment, clean_tf = view_transforms(cfg, recipe)
    base = build_image_dataset(
        root=d["root"] or None, list_file=d["list_file"] or None, strict=bool(d["strict"])
    )
    seed = int(cfg["seed"])
    indices = analysis_indices(len(base), int(d["num_images"]), seed)
    views = AnalysisViews(base, indices, clean_tf, augment, seed)
    loader = analysis_loader(views, int(d["batch_size"]), int(d["num_workers"]), seed, device)
    stats_acc, joint_acc, exemplars, unreadable = stream_statistics(
        model,
        loader,
        codes.bin_size,
        codes.temperature,
        device,
        augment is not None,
        codes.variables,
        int(figs["exemplars"]),
        floor=bool(c["floor"]),
    )
    if stats_acc.count == 0:
        raise AnalysisError(f"none of the {len(views)} images under {d['root']} could be read")
    stats, arrays = summarize(stats_acc, joint_acc)
    stats.update(
        views=c["views"],
        temperature=codes.temperature,
        image_size=image_size,
        data_root=str(d["root"]),
        dataset_size=len(base),
        unreadable_images=unreadable,
        **info,
    )
    outputs, corner = save_joint(joint_acc.joint(), codes, c, out)
    del joint_acc  # free the D x D accumulators before the figures
    style = figure_style(cfg)
    outputs.update(block_outputs(corner, arrays, codes, augment is not None, out, style))
    # Figs. 3b-c: the first readable image at or after figures.view_image
    item = _first_readable(views, int(figs["view_image"]))
    outputs["two views (Figs. 3b-c)"] = views_figure(model, item, codes, figs, out, style, device)
    layer = cfg["gradcam"]["layer"]
    if layer == "auto":
        layer = choose_layer(model.backbone, image_size)
    stats["gradcam_layer"] = layer
    outputs.update(gradcam_outputs(model, layer, exemplars, views, codes, cfg, out, style, device))
    stats["elapsed_s"] = round(time.perf_counter() - t0, 2)
    stats["outputs"] = {name: str(p) for name, p in outputs.items()}
    return stats


def _first_readable(views: AnalysisViews, start: int):
    """The item of the first readable image at or after position ``start`` (wrapping)."""
    n = len(views)
    for offset in range(n):
        item = views[(min(max(start, 0), n - 1) + offset) % n]
        if item is not None:
            return item
    raise AnalysisError("no readable image for views.png")


def summary(stats: dict) -> str:
    """The printed summary: the statistics table, then every file written."""
    title = (
        f"discrete codes of {stats['weights']} on {stats['num_images']} images "
        f"(M={stats['num_variables']}, B={stats['bin_size']}, log B={stats['log_bin_size']:.3f})"
    )
    lines = [format_table(_stats_table(stats), title=title), "outputs:"]
    lines += [f"  {name:34s} {path}" for name, path in stats["outputs"].items()]
    if stats["unreadable_images"]:
        lines.append(f"{stats['unreadable_images']} unreadable images left out")
    return "\n".join(lines)


EVALUATION = runner.Evaluation(
    name="analyze",
    prog="imsvd-analyze",
    description="Measure and show the discrete codes of an IMSVD model (paper Figs. 3-5)",
    default_config="analyze",
    results_name="stats.json",
    validate=validate,
    run=run,
    summary=summary,
)


main = EVALUATION.main  # the entry point (imsvd-analyze)


if __name__ == "__main__":
    sys.exit(main())

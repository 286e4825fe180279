"""End-to-end: the analysis CLI on a tiny image tree with a tiny saved model."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from pretrain.checkpoint import export_backbone, save_training_state
from pretrain.config import find_config
from pretrain.data.transforms import eval_transform
from pretrain.models.build import build_model
from transfer.analysis import analyze
from transfer.analysis.codes import soft_codes
from transfer.analysis.joint import joint_matrix

B = 8
CFG = {
    "model": {
        "arch": "resnet18",
        "stem": "small_s2",
        "zero_init_residual": True,
        "projector": "32-40",
    },
    "loss": {"bin_size": B, "temperature": 1.0},
    "data": {"image_size": 32, "crop_scale": [0.2, 1.0]},
}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("analyze")
    rng = np.random.default_rng(0)
    paths = []
    for c in range(2):
        d = root / "data" / f"class{c}"
        d.mkdir(parents=True)
        for i in range(4):
            img = rng.integers(0, 255, (28, 28, 3), dtype=np.uint8)
            img[4 + 8 * c : 12 + 8 * c, 6:20] = 255  # a bright bar whose position depends on class
            paths.append(d / f"{i}.png")
            Image.fromarray(img).save(paths[-1])
    torch.manual_seed(0)
    model = build_model(CFG["model"])
    with torch.no_grad():  # sharper codes than the default init, so statistics are not trivial
        model.projector[-1].weight.mul_(20)
    ckpt = root / "ckpt.pth"
    save_training_state(
        ckpt, model=model, optimizer=None, scaler=None, epoch=1, step=1, step_in_epoch=0, config=CFG
    )
    return {"root": root, "data": root / "data", "ckpt": ckpt, "model": model, "paths": paths}


def run(args, capsys):
    code = analyze.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_on_tiny(tiny, out, overrides, capsys):
    """The CLI on the tiny tree and checkpoint (no loader workers), writing into ``out``."""
    args = ["--weights", tiny["ckpt"], "--output-dir", out, f"data.root={tiny['data']}",
            "data.num_workers=0", *overrides]  # fmt: skip
    return run(args, capsys)


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    with Image.open(path) as img:
        assert img.width >= 200 and img.height >= 100, (path, img.size)


def test_cli_writes_every_output(tiny, capsys):
    out = tiny["root"] / "out"
    code, stdout, stderr = run_on_tiny(
        tiny, out,
        ["data.batch_size=3", "figures.variables=[0,2]", "figures.units_per_variable=2",
         "figures.exemplars=3", "codes.corner_vars=3",
         f"gradcam.images=[{tiny['paths'][0]},{tiny['paths'][5]}]"],
        capsys,
    )  # fmt: skip
    assert code == 0, stderr
    names = [
        "joint_corner.png",
        "views.png",
        "exemplars_var0.png",
        "exemplars_var2.png",
        "gradcam_var0.png",
        "gradcam_var2.png",
        "gradcam_images.png",
    ]
    for name in names:
        assert_png(out / name)
        assert str(out / name) in stdout  # the summary names every output
    assert "off-block MI" in stdout and "stats.json" in stdout
    stats = json.loads((out / "stats.json").read_text())
    assert stats["num_images"] == 8 and stats["num_variables"] == 5 and stats["bin_size"] == B
    assert 0.0 <= stats["onehot_0.99"] <= stats["onehot_0.9"] <= 1.0
    # float32 entropies against the float64 log B: a few float32 steps per summed term
    f32 = float(np.finfo(np.float32).eps)
    assert 0.0 <= stats["marginal_entropy_mean"] <= math.log(B) * (1 + 4 * B * f32)
    assert len(stats["marginal_entropy_per_variable"]) == 5
    assert 0.0 <= stats["offblock_mi_mean"] <= stats["offblock_mi_max"]
    assert 0.0 <= stats["agreement"] <= 1.0
    assert stats["views"] == "two" and stats["gradcam_layer"] == "layer2"
    corner = np.load(out / "joint_corner.npy")
    assert corner.shape == (3 * B, 3 * B) and corner.dtype == np.float32
    # every B x B block of P is a joint distribution
    blocks = corner.reshape(3, B, 3, B).sum(axis=(1, 3))
    assert np.allclose(blocks, 1.0, atol=1e-4)
    npz = np.load(out / "code_stats.npz")
    assert npz["mi"].shape == (5, 5) and npz["marginals"].shape == (5, B)


def test_vector_formats_and_labelled_figures(tiny, capsys):
    out = tiny["root"] / "svg"
    code, stdout, stderr = run_on_tiny(
        tiny, out,
        ["figures.variables=[3]", "figures.units_per_variable=2", "figures.exemplars=2",
         "figures.format=svg", "figures.dpi=72", f"gradcam.images=[{tiny['paths'][1]}]"],
        capsys,
    )  # fmt: skip
    assert code == 0, stderr
    stems = ["joint_corner", "views", "exemplars_var3", "gradcam_var3", "gradcam_images"]
    assert not list(out.glob("*.png"))
    text = {}
    for stem in stems:
        path = out / f"{stem}.svg"
        assert str(path) in stdout and path.stat().st_size > 5_000, path
        text[stem] = path.read_text()
        assert text[stem].lstrip().startswith("<?xml") and "<svg" in text[stem]
    # text stays text in SVG: the labels a reader needs are in the files
    assert "joint probability P (log10)" in text["joint_corner"]
    assert "pointwise MI" in text["joint_corner"] and "1/B²" in text["joint_corner"]
    assert "variable 4" in text["views"]  # the legend names every plotted variable
    assert "variable 3, unit" in text["exemplars_var3"] and "rank 1" in text["exemplars_var3"]
    for stem in ("gradcam_var3", "gradcam_images"):
        assert "Grad-CAM relevance" in text[stem]  # the colorbar of the maps
    # a bad format or resolution is a config error naming the key
    for bad, key in (("figures.format=jpg", "figures.format"), ("figures.dpi=0", "figures.dpi")):
        code, _, err = run(["--weights", tiny["ckpt"], f"data.root={tiny['data']}", bad], capsys)
        assert code == 2 and key in err, err


def test_same_view_matrix_equals_direct_computation(tiny, capsys):
    out = tiny["root"] / "same"
    code, _, stderr = run_on_tiny(
        tiny, out,
        ["codes.views=same", "codes.save_full_joint=true", "data.batch_size=3",
         "data.num_images=5", "figures.variables=[1]", "figures.units_per_variable=1",
         "figures.exemplars=1", "gradcam.layer=layer3",
         "device=cpu"],  # the reference below runs on the CPU (CUDA convolutions may use TF32)
        capsys,
    )  # fmt: skip
    assert code == 0, stderr
    stats = json.loads((out / "stats.json").read_text())
    assert stats["agreement"] is None and stats["num_images"] == 5
    # the same seeded subset, through the same clean transform, in one shot
    idx = torch.randperm(8, generator=torch.Generator().manual_seed(0))[:5].sort().values
    files = sorted(tiny["data"].glob("*/*.png"))
    tf = eval_transform(resize=37, crop=32)
    x = torch.stack([tf(Image.open(files[i]).convert("RGB")) for i in idx])
    model = tiny["model"].eval()
    with torch.no_grad():
        expected = joint_matrix(soft_codes(model(x), B)).numpy()
    assert np.allclose(np.load(out / "joint_full.npy"), expected, atol=1e-5)
    # same view: every diagonal block is the self-joint, whose MI is the soft marginal entropy
    # of one-hot codes at most
    assert stats["diag_trace_mean"] > 0
    assert stats["crossview_mi_mean"] <= math.log(B) * (
        1 + 32 * B * float(np.finfo(np.float32).eps)
    )


def test_clear_errors(tiny, capsys):
    base = [f"data.root={tiny['data']}", "--output-dir", tiny["root"] / "err"]
    code, _, err = run(["--weights", "random", *base], capsys)
    assert code == 2 and "--config" in err
    code, _, err = run(["--weights", tiny["root"] / "missing.pth", *base], capsys)
    assert code == 2 and "missing.pth" in err
    code, _, err = run(["--weights", tiny["ckpt"], "figures.variables=[9]", *base], capsys)
    assert code == 2 and "out of range" in err
    exported = tiny["root"] / "backbone.pth"
    backbone_sd = tiny["model"].backbone.state_dict()
    export_backbone(exported, backbone_sd, arch="resnet18", stem="small_s2", epoch=1, config=CFG)
    code, _, err = run(["--weights", exported, *base], capsys)
    assert code == 2 and "projector" in err  # an exported backbone carries no projector
    code, _, err = run(["--weights", tiny["ckpt"], "codes.bin_size=7", *base], capsys)
    assert code == 2 and "multiple" in err


def test_unreadable_images_are_left_out_and_counted(tiny, tmp_path, capsys):
    data = tmp_path / "data"
    for c in ("class0", "class1"):
        (data / c).mkdir(parents=True)
        for f in (tiny["data"] / c).glob("*.png"):
            (data / c / f.name).write_bytes(f.read_bytes())
    (data / "class0" / "0.png").write_bytes(b"not a png")  # views.png's default image
    (data / "class1" / "3.png").write_bytes(b"")
    out = tmp_path / "out"
    args = ["--weights", tiny["ckpt"], "--output-dir", out, f"data.root={data}",
            "data.batch_size=3", "data.num_workers=0", "figures.units_per_variable=1",
            "figures.exemplars=1"]  # fmt: skip
    code, stdout, stderr = run(args, capsys)
    assert code == 0, stderr
    stats = json.loads((out / "stats.json").read_text())
    assert stats["unreadable_images"] == 2 and stats["num_images"] == 6
    assert "2 unreadable images left out" in stdout
    code, _, err = run(args + ["data.strict=true"], capsys)
    assert code == 2 and "cannot read image" in err  # names the first bad file met


def test_random_model_of_a_pretraining_recipe(tiny, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "_base_: " + str(find_config("base", "pretrain")) + "\n"
        "model: {arch: resnet18, stem: small_s2, projector: '32-40'}\n"
        "loss: {bin_size: 8}\ndata: {image_size: 32}\n"
    )
    out = tmp_path / "out"
    code, stdout, stderr = run(
        ["--weights", "random", "--output-dir", out, f"data.root={tiny['data']}",
         f"model.recipe={recipe}", "data.num_workers=0", "figures.exemplars=1",
         "figures.units_per_variable=1"],
        capsys,
    )  # fmt: skip
    assert code == 0, stderr
    stats = json.loads((out / "stats.json").read_text())
    assert stats["weights"] == "random" and stats["bin_size"] == 8 and stats["num_variables"] == 5
    assert stats["image_size"] == 32 and f"results written to {out / 'stats.json'}" in stdout
    # the resolved analysis recipe is written next to the results
    assert "recipe: " in (out / "config.yaml").read_text()

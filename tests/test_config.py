"""Config loading: inheritance, overrides, schema errors, saved config."""

from pathlib import Path

import pytest
import yaml

from pretrain.config import ConfigError, load_config, resolve_config_path, save_config

REPO = Path(__file__).resolve().parent.parent
CFG_DIR = REPO / "configs" / "pretrain"


def test_paper_recipe_values():
    cfg = load_config(CFG_DIR / "imsvd_r50_100ep.yaml")
    assert cfg["model"]["arch"] == "resnet50"
    assert cfg["model"]["projector"] == "8192-8160"
    assert cfg["loss"]["bin_size"] == 80
    assert cfg["optim"] == {
        "name": "lars",
        "base_lr": 0.6,
        "reference_batch": 256,
        "momentum": 0.9,
        "weight_decay": 1e-6,
        "eta": 0.001,
        "exclude_bias_and_norm": True,
        "excluded_lr_ratio": 1.0,
        "warmup_epochs": 10.0,
        "final_lr_ratio": 0.001,
    }
    assert cfg["train"]["batch_size"] == 2048 and cfg["train"]["epochs"] == 100
    assert cfg["train"]["precision"] == "fp16" and cfg["train"]["sync_bn"] is True


@pytest.mark.parametrize("epochs", [200, 400, 800, 1000])
def test_epoch_variants(epochs):
    cfg = load_config(CFG_DIR / f"imsvd_r50_{epochs}ep.yaml")
    assert cfg["train"]["epochs"] == epochs
    assert cfg["model"]["projector"] == "8192-8160"


def test_every_recipe_is_consistent():
    files = sorted(CFG_DIR.rglob("*.yaml"))
    assert len(files) >= 20
    for f in files:
        cfg = load_config(f)
        assert cfg["loss"]["name"] in ("imsvd", "vicreg", "barlowtwins"), f
        if cfg["loss"]["name"] == "imsvd":  # the baselines have no bins
            d = int(cfg["model"]["projector"].split("-")[-1])
            assert d % cfg["loss"]["bin_size"] == 0, f


def test_ablation_values():
    a = CFG_DIR / "ablations"
    assert load_config(a / "batch_512.yaml")["train"]["batch_size"] == 512
    assert load_config(a / "projector_depth3.yaml")["model"]["projector"] == "8192-8192-8160"
    assert load_config(a / "dim_16320.yaml")["model"]["projector"] == "8192-16320"
    assert load_config(a / "bin_32.yaml")["loss"]["bin_size"] == 32
    de_oe = load_config(a / "loss_de_oe.yaml")["loss"]
    assert de_oe["ti_coeff"] == 0.0 and de_oe["dia_coeff"] == 1.0 and de_oe["off_coeff"] == 1.0
    assert load_config(a / "loss_oe_ti.yaml")["loss"]["dia_coeff"] == 0.0
    assert load_config(a / "loss_de_oe_tic.yaml")["loss"]["ti_mode"] == "ce"


def test_overrides_parse_yaml_scalars():
    cfg = load_config(
        CFG_DIR / "imsvd_smoke.yaml",
        ["train.epochs=3", "optim.base_lr=1e-3", "data.crop_scale=[0.2, 1.0]", "data.root=/x y"],
    )
    assert cfg["train"]["epochs"] == 3
    assert cfg["optim"]["base_lr"] == pytest.approx(1e-3)
    assert cfg["data"]["crop_scale"] == [0.2, 1.0]
    assert cfg["data"]["root"] == "/x y"


def test_int_is_accepted_for_float_and_converted():
    cfg = load_config(CFG_DIR / "imsvd_smoke.yaml", ["optim.base_lr=1"])
    assert isinstance(cfg["optim"]["base_lr"], float)


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.batchsize=3", "train.batchsize"),
        ("nope=1", "'nope'"),
        ("train.epochs=abc", "train.epochs"),
        ("train.channels_last=1", "train.channels_last"),
        ("model=3", "model"),
        ("train.epochs", "key.sub=value"),
    ],
)
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(CFG_DIR / "imsvd_smoke.yaml", [override])
    assert needle in str(e.value)


def test_unknown_key_in_file_names_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"_base_: {CFG_DIR / 'base.yaml'}\ntrain:\n  epoch: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    assert "train.epoch" in str(e.value) and "bad.yaml" in str(e.value)


def test_missing_base_and_invalid_yaml(tmp_path):
    f = tmp_path / "a.yaml"
    f.write_text("_base_: missing.yaml\n")
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_config(f)
    g = tmp_path / "b.yaml"
    g.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(g)
    with pytest.raises(ConfigError, match="not found"):
        resolve_config_path("no_such_recipe", CFG_DIR)
    assert resolve_config_path("imsvd_smoke", CFG_DIR).name == "imsvd_smoke.yaml"


def test_save_config_round_trip(tmp_path):
    cfg = load_config(CFG_DIR / "imsvd_r50_100ep.yaml", ["train.epochs=7"])
    save_config(cfg, tmp_path / "config.yaml")
    again = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert again == cfg

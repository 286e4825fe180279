"""Config loading: inheritance, overrides, schema errors, saved config."""

import pytest
import yaml
from helpers import REPO

from pretrain.config import ConfigError, load_config, resolve_config_path, save_config
from pretrain.fileio import yaml_load

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


SMOKE = CFG_DIR / "imsvd_smoke.yaml"


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.max_steps=1:30", "train.max_steps"),  # YAML 1.1 sexagesimal: 90
        ("train.batch_size=010", "train.batch_size"),  # YAML 1.1 octal: 8
        ("train.batch_size=0o10", "train.batch_size"),
        ("train.batch_size=0x10", "train.batch_size"),
        ("train.batch_size=1_000", "train.batch_size"),
        ("train.epochs=1e2", "train.epochs"),  # a float for an int key
        ("optim.base_lr=1:30", "optim.base_lr"),
        ("data.strict=no", "data.strict"),  # YAML 1.1 boolean
        ("data.strict=on", "data.strict"),
        ("data.strict=Y", "data.strict"),
    ],
)
def test_yaml_1_1_number_and_bool_forms_are_refused(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(SMOKE, [override])
    assert needle in str(e.value)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("1:30", "1:30"),
        ("010", "010"),
        ("no", "no"),
        ("2024", "2024"),
        ("1e-3", "1e-3"),
        ("[1, 2]", "[1, 2]"),
        ("{a: 1}", "{a: 1}"),
        ("'quoted'", "quoted"),
        ('"a #b"', "a #b"),
    ],
)
def test_string_keys_keep_the_text_as_written(text, expected):
    cfg = load_config(SMOKE, [f"data.root={text}", f"model.projector={text}"])
    assert cfg["data"]["root"] == expected and cfg["model"]["projector"] == expected


@pytest.mark.parametrize(
    "override, key, value",
    [
        ("optim.base_lr=1e-3", ("optim", "base_lr"), 1e-3),
        ("optim.base_lr=.5", ("optim", "base_lr"), 0.5),
        ("optim.base_lr=2", ("optim", "base_lr"), 2.0),
        ("train.batch_size=10", ("train", "batch_size"), 10),
        ("train.batch_size=+10", ("train", "batch_size"), 10),
        ("data.strict=True", ("data", "strict"), True),
        ("data.strict=false", ("data", "strict"), False),
        ("eval.image_size=null", ("eval", "image_size"), None),
        ("eval.image_size=32", ("eval", "image_size"), 32),
        ("data.root=null", ("data", "root"), None),
    ],
)
def test_yaml_1_2_core_values_are_read_as_written(override, key, value):
    cfg = load_config(SMOKE, [override])
    got = cfg[key[0]][key[1]]
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.epochs=null", "train.epochs"),
        ("train.batch_size=~", "train.batch_size"),
        ("optim.base_lr=null", "optim.base_lr"),
        ("model.arch=null", "model.arch"),
        ("data.crop_scale=null", "data.crop_scale"),
        ("eval.image_size=abc", "eval.image_size"),
        ("eval.image_size=true", "eval.image_size"),
        ("data.root=~", "data.root"),  # not expanded, not null: refused
        ("data.root=~/imagenet", "data.root"),
        ("data.root='~/imagenet'", "data.root"),
        ("eval.bank_root=~user/x", "eval.bank_root"),
    ],
)
def test_null_and_wrong_types_are_refused_for_every_key(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(SMOKE, [override])
    assert needle in str(e.value)


@pytest.mark.parametrize(
    "override, needle",
    [
        ("optim.base_lr=nan", "optim.base_lr"),
        ("optim.base_lr=.nan", "optim.base_lr"),
        ("optim.base_lr=-.inf", "optim.base_lr"),
        ("optim.base_lr=.inf", "optim.base_lr"),
        ("optim.base_lr=inf", "optim.base_lr"),
        ("optim.base_lr=0", "optim.base_lr"),
        ("optim.base_lr=-0.1", "optim.base_lr"),
        ("loss.temperature=.nan", "loss.temperature"),
        ("eval.temperature=0", "eval.temperature"),
        ("eval.temperature=.inf", "eval.temperature"),
        ("optim.weight_decay=-1e-6", "optim.weight_decay"),
        ("train.batch_size=0", "train.batch_size"),
        ("train.epochs=-3", "train.epochs"),
        ("data.num_workers=-1", "data.num_workers"),
        ("eval.image_size=0", "eval.image_size"),
        ("eval.ks=[]", "eval.ks"),
        ("eval.ks=[20, 0]", "eval.ks"),
        ("data.blur_prob=[1.5, 0.1]", "data.blur_prob"),
        ("data.crop_scale=[0.08, .nan]", "data.crop_scale"),
    ],
)
def test_non_finite_and_out_of_range_values_are_refused(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(SMOKE, [override])
    assert needle in str(e.value) and "command-line override" in str(e.value)


@pytest.mark.parametrize(
    "body, needle",
    [
        ("train:\n  max_steps: 1:30\n", "train.max_steps"),
        ("train:\n  batch_size: 010\n", "train.batch_size"),
        ("data:\n  strict: no\n", "data.strict"),
        ("train:\n  epochs: null\n", "train.epochs"),
        ("train:\n  epochs:\n", "train.epochs"),
        ("optim:\n  base_lr: .nan\n", "optim.base_lr"),
        ("optim:\n  base_lr: -.inf\n", "optim.base_lr"),
        ("eval:\n  image_size: abc\n", "eval.image_size"),
        ("data:\n  root: [1, 2]\n", "data.root"),
        ("data:\n  root: 2024\n", "data.root"),  # a number for a string key: quote it
        ("data:\n  crop_scale: [0.5]\n", "data.crop_scale"),
        ("_types_:\n  train.epochs: int\n", "_types_"),
    ],
)
def test_recipe_files_are_read_with_the_same_rule(tmp_path, body, needle):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"_base_: {CFG_DIR / 'base.yaml'}\n{body}")
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    assert needle in str(e.value) and "bad.yaml" in str(e.value)


def test_recipe_files_read_yaml_1_2_numbers(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text(
        f"_base_: {CFG_DIR / 'base.yaml'}\noptim:\n  base_lr: 1e-3\n  weight_decay: 0\n"
        "data:\n  root: '010'\n  list_file: no\ntrain:\n  max_steps: -1\n"
    )
    cfg = load_config(good)
    assert cfg["optim"]["base_lr"] == 1e-3 and cfg["optim"]["weight_decay"] == 0.0
    assert cfg["data"]["root"] == "010" and cfg["train"]["max_steps"] == -1
    assert cfg["data"]["list_file"] == "no"  # YAML 1.2: a string, not False


def test_every_null_default_is_declared(tmp_path):
    # a schema key whose default is null needs a type in _types_
    root = tmp_path / "root.yaml"
    root.write_text("a:\n  b: null\n")
    with pytest.raises(ConfigError, match="'a.b' has a null default"):
        load_config(root)
    root.write_text("a:\n  b: null\n_types_:\n  a.b: int? >=0\n")
    assert load_config(root, ["a.b=3"])["a"]["b"] == 3
    with pytest.raises(ConfigError, match="a.b"):
        load_config(root, ["a.b=-1"])
    root.write_text("a:\n  b: 1\n_types_:\n  a.b: integer\n")
    with pytest.raises(ConfigError, match="unknown type"):
        load_config(root)
    root.write_text("a:\n  b: 1\n_types_:\n  a.b: int >=x\n")
    with pytest.raises(ConfigError, match="malformed bound"):
        load_config(root)
    root.write_text("a:\n  b: 1\n_types_:\n  a.b: 3\n")
    with pytest.raises(ConfigError, match="_types_"):
        load_config(root)
    root.write_text("a:\n  b: [1]\n_types_:\n  a.b: list[int] len<=2\n")
    assert load_config(root, ["a.b=[1, 2]"])["a"]["b"] == [1, 2]
    with pytest.raises(ConfigError, match="list length 3 must be <= 2"):
        load_config(root, ["a.b=[1, 2, 3]"])


@pytest.mark.parametrize("bound", [">=1.2.3", ">=.", "len<1..2"])
def test_a_bound_that_is_not_a_number_is_a_config_error_naming_the_key(tmp_path, bound):
    root = tmp_path / "root.yaml"
    root.write_text(f"a:\n  b: 1\n_types_:\n  a.b: int {bound}\n")
    with pytest.raises(ConfigError, match="malformed bound") as e:
        load_config(root)
    assert "'a.b'" in str(e.value) and bound in str(e.value) and str(root) in str(e.value)
    with pytest.raises(ConfigError, match="malformed bound"):  # and through an override
        load_config(root, ["a.b=2"])


def test_saved_config_reads_back_the_same_with_either_yaml_rule(tmp_path):
    cfg = load_config(SMOKE, ["data.root=1e-3", "model.projector=010", "data.list_file=no"])
    save_config(cfg, tmp_path / "config.yaml")
    text = (tmp_path / "config.yaml").read_text()
    assert yaml.safe_load(text) == cfg and yaml_load(text) == cfg

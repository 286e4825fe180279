"""The one command-line grammar of the evaluation tools: flags as typed overrides, named recipes,
the tool check, shared sections, and the set-up every tool gets (config.yaml, log.txt)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import yaml
from helpers import act_as_launcher, free_port, make_weights

from pretrain.config import ConfigError, config_dir, config_names, find_config, load_config
from pretrain.export import export
from transfer.analysis import analyze
from transfer.eval import finetune, knn, linear, voc07_svm
from transfer.eval.evalcfg import build_parser, flag_overrides, load_eval_config

TOOLS = [
    knn.EVALUATION,
    linear.EVALUATION,
    finetune.EVALUATION,
    voc07_svm.EVALUATION,
    analyze.EVALUATION,
]


def _args(*argv, default="knn"):
    return build_parser("t", "d", default).parse_intermixed_args(list(argv))


def test_flags_become_typed_overrides_and_dotted_keys_win():
    args = _args("--weights", "/w/yes: 1.pth", "--output-dir", "o", "--allow-unsafe",
                 "--prefix", "module.", "--stem", "small_s2", "data.train_root=t",
                 "output_dir=later")  # fmt: skip
    assert flag_overrides(args) == [
        'model.weights="/w/yes: 1.pth"',
        'output_dir="o"',
        "model.allow_unsafe=true",
        'model.prefix="module."',
        'model.stem="small_s2"',
    ]
    cfg, path = load_eval_config("knn", args)
    assert path == find_config("knn", "eval")
    assert cfg["model"] == {
        "weights": "/w/yes: 1.pth",
        "allow_unsafe": True,
        "checkpoint_key": "",
        "prefix": "module.",
        "stem": "small_s2",
    }
    assert cfg["output_dir"] == "later" and cfg["data"]["train_root"] == "t"
    # no flag given: the recipe's values, nothing from argparse
    cfg, _ = load_eval_config("knn", _args())
    assert cfg["output_dir"] == "outputs/knn" and cfg["model"]["weights"] == ""


def test_errors_name_the_key_and_the_source(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'knn.kz' in command-line"):
        load_eval_config("knn", _args("knn.kz=1"))
    with pytest.raises(ConfigError, match=r"'data.batch_size' in command-line .* expects int"):
        load_eval_config("knn", _args("data.batch_size=many"))
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"_base_: {find_config('knn', 'eval')}\nfeatures: {{layr: pool5}}\n")
    with pytest.raises(ConfigError, match=rf"unknown config key 'features.layr' in {bad}"):
        load_eval_config("knn", _args("--config", str(bad)))
    with pytest.raises(ConfigError, match=r"recipe for 'linear', not for 'knn'.*knn_tiny"):
        load_eval_config("knn", _args("--config", "linear_tiny"))
    with pytest.raises(ConfigError, match=r"not found .*shipped eval recipes: .*voc07_svm"):
        load_eval_config("knn", _args("--config", "nope"))


def test_every_recipe_shares_the_base_sections():
    base = load_config(config_dir("eval") / "base.yaml")
    for name in config_names("eval"):
        cfg = load_config(find_config(name, "eval"))
        for section in ("model", "data"):
            assert set(base[section]) <= set(cfg[section]), (name, section)
        if name not in ("base", "frozen", "supervised_base"):  # shared roots of several tools
            assert cfg["evaluation"] in {t.name for t in TOOLS}, name
            assert cfg["output_dir"] == f"outputs/{cfg['evaluation']}", name


@pytest.mark.parametrize("tool", TOOLS, ids=lambda t: t.name)
def test_every_tool_has_the_same_flags(tool, capsys):
    with pytest.raises(SystemExit):
        tool_main = {"knn": knn.main, "linear": linear.main, "finetune": finetune.main,
                     "voc07_svm": voc07_svm.main, "analyze": analyze.main}[tool.name]  # fmt: skip
        tool_main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--config", "--weights", "--output-dir", "--allow-unsafe", "--checkpoint-key",
                 "--prefix", "key.sub=value"):  # fmt: skip
        assert flag in text, (tool.name, flag)
    assert f"default: {tool.default_config}" in text and tool.prog in text


def test_run_writes_config_log_and_results(tiny_trees, tiny_backbone, tmp_path, capsys):
    out = tmp_path / "o"
    assert knn.main(["--config", "knn_tiny", "--weights", str(tiny_backbone), "--output-dir",
                     str(out), f"data.train_root={tiny_trees / 'train'}",
                     f"data.val_root={tiny_trees / 'val'}", "seed=3"]) == 0  # fmt: skip
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["seed"] == 3 and saved["model"]["weights"] == str(tiny_backbone)
    log = (out / "log.txt").read_text()
    assert "knn results written to" in log and str(tiny_backbone) in log
    assert json.loads((out / "knn_results.json").read_text())["num_train"] == 24
    assert "kNN top-1" in capsys.readouterr().out
    # the same weights flags as every reader of weights: a layout option the file does not have
    assert knn.main(["--config", "knn_tiny", "--weights", str(tiny_backbone), "--checkpoint-key",
                     "teacher", "--output-dir", str(out), f"data.train_root={tiny_trees / 'train'}",
                     f"data.val_root={tiny_trees / 'val'}"]) == 2  # fmt: skip
    assert "teacher" in capsys.readouterr().err


def _corrupt_weights(path, name, value, seed=0):
    """A tiny exported backbone whose tensor ``name`` is filled with ``value`` (or, for a
    running_var, has its first entry set to it)."""
    import torch

    from pretrain.checkpoint import export_backbone
    from pretrain.models.backbone import build_backbone

    torch.manual_seed(seed)
    net = build_backbone("resnet18", zero_init_residual=False, stem="small_s2")
    sd = net.state_dict()
    if name.endswith("running_var"):
        sd[name][0] = value
    else:
        sd[name].view(-1)[: max(1, sd[name].numel() // 7)] = value
    export_backbone(path, sd, arch="resnet18", stem="small_s2", epoch=0, config=None)
    return path


CORRUPTIONS = [
    ("conv1.weight", float("nan")),
    ("layer2.0.conv1.weight", float("inf")),
    ("layer1.0.bn1.bias", -float("inf")),
    ("bn1.running_mean", float("nan")),
    ("layer3.1.bn2.running_var", -1.0),
    ("layer4.0.bn1.running_var", 0.0),
]


def _tool_args(tool, tmp_path, trees, weights):
    out = ["--weights", str(weights), "--output-dir", str(tmp_path / "o")]
    if tool == "voc07_svm":
        from helpers import make_voc_tree

        voc = make_voc_tree(tmp_path / "data", n_trainval=6, n_test=6)
        return ["--config", "voc07_svm_tiny", f"data.voc_root={voc}"] + out
    folders = [f"data.train_root={trees / 'train'}", f"data.val_root={trees / 'val'}"]
    return ["--config", f"{tool}_tiny"] + folders + out


@pytest.mark.parametrize("tool", ["knn", "linear", "finetune", "voc07_svm"])
@pytest.mark.parametrize("name, value", CORRUPTIONS, ids=[f"{n}={v}" for n, v in CORRUPTIONS])
def test_non_finite_weights_are_refused_naming_tensor_and_file(
    tool, name, value, tiny_trees, tmp_path, capsys
):
    weights = _corrupt_weights(tmp_path / "bad weights.pth", name, value)
    tool_main = {"knn": knn.main, "linear": linear.main, "finetune": finetune.main,
                 "voc07_svm": voc07_svm.main}[tool]  # fmt: skip
    assert tool_main(_tool_args(tool, tmp_path, tiny_trees, weights)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err
    assert f"'{name}'" in err[0] and str(weights) in err[0]
    assert not list((tmp_path / "o").glob("*results.json"))


def test_analyze_refuses_non_finite_weights(tiny_trees, tmp_path, capsys):
    weights = _corrupt_weights(tmp_path / "w.pth", "layer1.0.bn2.running_var", -1.0)
    code = analyze.main(["--weights", str(weights), "--output-dir", str(tmp_path / "o"),
                         "--config", "analyze", f"data.root={tiny_trees / 'train'}",
                         "model.recipe=imsvd_smoke"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "layer1.0.bn2.running_var" in err and str(weights) in err


@pytest.mark.parametrize("tool", ["knn", "linear", "finetune"])
def test_non_finite_features_are_refused(tool, tiny_trees, tmp_path, capsys):
    # finite but huge weights: the activations overflow to inf / NaN
    weights = _corrupt_weights(tmp_path / "w.pth", "conv1.weight", 3e38)
    assert {"knn": knn.main, "linear": linear.main, "finetune": finetune.main}[tool](
        _tool_args(tool, tmp_path, tiny_trees, weights)
    ) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "NaN/inf" in err[0] and str(weights) in err[0], err


@pytest.mark.parametrize("tool", ["knn", "linear", "finetune", "voc07_svm"])
def test_a_directory_as_weights_is_refused_naming_the_key(tool, tiny_trees, tmp_path, capsys):
    tool_main = {"knn": knn.main, "linear": linear.main, "finetune": finetune.main,
                 "voc07_svm": voc07_svm.main}[tool]  # fmt: skip
    assert tool_main(_tool_args(tool, tmp_path, tiny_trees, tmp_path)) == 2
    err = capsys.readouterr().err
    assert "model.weights" in err and "is a directory" in err


@pytest.mark.parametrize(
    "tool, override, needle",
    [
        ("linear", "data.train_scale=[0.5]", "list length 1"),
        ("linear", "data.train_scale=[0.2, 1.0, 0.5]", "list length 3"),
        ("linear", "data.train_scale=[0.5, 2.0]", "<= 1"),
        ("linear", "data.train_scale=[0.5, abc]", "element 1"),
        ("linear", "data.train_scale=0.5", "expects list[float]"),
        ("linear", "train.milestones=[5, -1]", "train.milestones"),
        ("linear", "train.lr=.nan", "finite"),
        ("linear", "train.batch_size=0", "train.batch_size"),
        ("linear", "data.train_fraction=1.5", "<= 1"),
        ("finetune", "backbone.lr=-0.1", ">= 0"),
        ("finetune", "train.checkpoint_every_steps=-1", ">= 0"),
        ("knn", "knn.chunk_size=0", ">= 1"),
        ("knn", "knn.ks=[]", "list length 0"),
        ("knn", "knn.ks=[20, 0]", "knn.ks"),
        ("knn", "knn.temperature=.inf", "finite"),
        ("knn", "data.batch_size=0", "data.batch_size"),
        ("knn", "output_dir=null", "output_dir"),
        ("voc07_svm", "svm.costs=[]", "svm.costs"),
        ("voc07_svm", "svm.costs=[1.0, -2.0]", "svm.costs"),
        ("voc07_svm", "svm.folds=1", "svm.folds"),
        ("voc07_svm", "low_shot.ks=[0]", "low_shot.ks"),
    ],
)
def test_malformed_values_are_schema_errors_naming_the_key(tool, override, needle):
    key = override.split("=", 1)[0]
    with pytest.raises(ConfigError) as e:
        load_eval_config(
            tool,
            _args(
                override,
                default={"linear": "linear_tiny", "finetune": "finetune_tiny"}.get(tool, tool),
            ),
        )
    assert f"'{key}'" in str(e.value) and needle in str(e.value)


@pytest.mark.parametrize("tool", ["knn", "linear", "finetune", "voc07_svm"])
def test_one_run_per_output_folder(tool, tiny_trees, tiny_backbone, tmp_path, capsys):
    from pretrain.engine.checkpointer import RunFolder

    tool_main = {"knn": knn.main, "linear": linear.main, "finetune": finetune.main,
                 "voc07_svm": voc07_svm.main}[tool]  # fmt: skip
    out = tmp_path / "o"
    with RunFolder(out, is_main=True):  # another run holds the folder
        assert tool_main(_tool_args(tool, tmp_path, tiny_trees, tiny_backbone)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is in use by another run" in err[0] and "output_dir" in err[0]
    assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing else written


def test_a_malformed_pixel_limit_is_one_error_before_anything_is_read(
    tiny_trees, tiny_backbone, tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("IMSVD_MAX_IMAGE_PIXELS", "1e9")
    assert knn.main(_tool_args("knn", tmp_path, tiny_trees, tiny_backbone)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "IMSVD_MAX_IMAGE_PIXELS='1e9' must be a positive integer" in err[0]
    assert not (tmp_path / "o").exists()


def _single():
    from pretrain.dist import DistInfo

    return DistInfo(0, 1, 0, torch.device("cpu"), None)


def test_the_output_folder_decision_in_one_process(tmp_path):
    from pretrain.dist import main_rank_values
    from pretrain.engine.checkpointer import RunFolder, RunFolderBusyError, take_output_folder

    info = _single()
    assert main_rank_values([0, 1, 2], info.device) == [0, 1, 2]  # no process group
    assert take_output_folder(None, info) is None
    lock = take_output_folder(tmp_path / "a", info)
    assert lock is not None and (tmp_path / "a" / ".lock").is_file()
    with pytest.raises(RunFolderBusyError, match=r"in use by another run \(pid \d+\)"):
        take_output_folder(tmp_path / "a", info)  # our own lock is another open file: busy
    lock.__exit__(None, None, None)
    with RunFolder(tmp_path / "a", is_main=True):
        with pytest.raises(RunFolderBusyError, match="output_dir"):
            take_output_folder(tmp_path / "a", info)
    take_output_folder(tmp_path / "a", info).__exit__(None, None, None)  # free again


def _folder_worker(rank, world, port, busy, free, out_dir):
    import os

    from pretrain.dist import cleanup, init_distributed, main_rank_values
    from pretrain.engine.checkpointer import RunFolderBusyError, take_output_folder

    act_as_launcher(rank, world, port)
    torch.set_num_threads(1)
    info = init_distributed("cpu")
    got = {"value": main_rank_values([5 if rank == 0 else 7], info.device)[0]}
    try:
        take_output_folder(busy, info)
        got["busy"] = "no error"
    except RunFolderBusyError as e:
        got["busy"] = str(e)
    lock = take_output_folder(free, info)
    got["free"] = lock is not None
    got["after"] = main_rank_values([1], info.device)[0]  # every rank still in step
    torch.distributed.barrier()
    if lock is not None:
        lock.__exit__(None, None, None)
    torch.save(got, os.path.join(out_dir, f"rank{rank}.pt"))
    cleanup()


@pytest.mark.dist
def test_a_busy_output_folder_stops_every_rank(tmp_path):

    import torch.multiprocessing as mp

    from pretrain.engine.checkpointer import RunFolder

    port = free_port()
    busy, free = tmp_path / "busy", tmp_path / "free"
    with RunFolder(busy, is_main=True):  # another run holds it
        mp.spawn(_folder_worker, args=(2, port, busy, free, str(tmp_path)), nprocs=2, join=True)
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert [g["value"] for g in got] == [5, 5] and [g["after"] for g in got] == [1, 1]
    assert all("is in use by another run" in g["busy"] for g in got), got
    assert "output_dir" in got[1]["busy"] and f"pid {os.getpid()}" in got[0]["busy"]
    assert [g["free"] for g in got] == [True, False]  # rank 0 holds the lock


def test_the_folder_is_released_after_a_run_and_after_an_error(
    tiny_trees, tiny_backbone, tmp_path, capsys
):
    args = _tool_args("knn", tmp_path, tiny_trees, tiny_backbone)
    assert knn.main(args + [f"data.val_root={tmp_path / 'missing'}"]) == 2
    assert knn.main(args) == 0 and knn.main(args) == 0
    assert (
        "results written to" in capsys.readouterr().out + (tmp_path / "o" / "log.txt").read_text()
    )


@pytest.mark.parametrize("text", ["imgs #2", "a: b", 'say "hi"', "it's", "#x", "[1, 2]", "1:30"])
def test_string_overrides_arrive_intact(text):
    cfg, _ = load_eval_config(
        "knn",
        _args(f"data.train_root={text}", f"output_dir=runs/{text}", "--weights", f"w/{text}"),
    )
    assert cfg["data"]["train_root"] == text
    assert cfg["output_dir"] == f"runs/{text}" and cfg["model"]["weights"] == f"w/{text}"


def test_evaluations_take_the_stem_and_warn_when_it_is_assumed(tiny_trees, tmp_path, capsys):
    src = make_weights(tmp_path / "w.pth", stem="small_s2")
    export(str(src), str(tmp_path / "tv.pth"), "torchvision")
    data = [f"data.train_root={tiny_trees / 'train'}", f"data.val_root={tiny_trees / 'val'}"]
    runs = {
        "recorded": [str(src)],
        "given": [str(tmp_path / "tv.pth"), "--stem", "small_s2"],
        "assumed": [str(tmp_path / "tv.pth")],
    }
    feats = {}
    for name, weights in runs.items():
        out = tmp_path / name
        argv = ["--config", "knn_tiny", "--output-dir", str(out), "--weights", *weights, *data]
        assert knn.main(argv) == 0
        feats[name] = np.load(out / "features" / "val_pool5.feats.npy")
        log = (out / "log.txt").read_text()
        assert ("WARNING" in log and "model.stem=small_s2" in log) == (name == "assumed"), name
        assert json.loads((out / "knn_results.json").read_text())["num_val"] == 12
    np.testing.assert_array_equal(feats["given"], feats["recorded"])
    assert not np.array_equal(feats["assumed"], feats["recorded"])
    err_out = tmp_path / "bad"
    argv = ["--config", "knn_tiny", "--output-dir", str(err_out), "--weights", str(src), *data]
    capsys.readouterr()
    assert knn.main(argv + ["model.stem=big"]) == 2
    assert "config key 'model.stem' (--stem): 'big' is not one of" in capsys.readouterr().err


def test_a_resolution_far_from_the_pretraining_one_is_a_warning(tiny_trees, tmp_path):
    from pretrain.checkpoint import export_backbone
    from pretrain.models.backbone import build_backbone

    net = build_backbone("resnet18", stem="small_s2").state_dict()
    cfg = {"data": {"image_size": 8}}
    export_backbone(tmp_path / "w.pth", net, arch="resnet18", stem="small_s2", epoch=1, config=cfg)
    data = [f"data.train_root={tiny_trees / 'train'}", f"data.val_root={tiny_trees / 'val'}"]
    for crop, warned in ((32, True), (8, False)):
        out = tmp_path / f"c{crop}"
        argv = [
            "--config",
            "knn_tiny",
            "--output-dir",
            str(out),
            "--weights",
            str(tmp_path / "w.pth"),
        ]
        assert knn.main(argv + data + [f"data.resize={crop}", f"data.crop={crop}"]) == 0
        log = (out / "log.txt").read_text()
        assert ("pretrained on 8 px views and are evaluated at 32 px" in log) == warned, log

"""The package as users get it: a wheel installed outside the checkout has every console script
and resolves the shipped recipes by name (package data, installed as ``imsvd_configs``, never as
a top-level ``configs``), and a kNN smoke run works from it."""

from __future__ import annotations

import configparser
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO

from pretrain.config import CONFIGS_PACKAGE, config_dir, find_config

SCRIPTS = {
    "imsvd-pretrain": "pretrain.main:main",
    "imsvd-knn": "transfer.eval.knn:main",
    "imsvd-linear": "transfer.eval.linear:main",
    "imsvd-voc07": "transfer.eval.voc07_svm:main",
    "imsvd-analyze": "transfer.analysis.analyze:main",
    "imsvd-export-backbone": "pretrain.export:main",
    "imsvd-convert-d2": "transfer.detection.d2.convert:main",
    "imsvd-plot": "pretrain.curves:main",
    "imsvd-d2-train": "transfer.detection.d2.train:cli",
    "imsvd-convert-mmdet": "transfer.detection.mmdet.convert:main",
    "imsvd-mmdet-train": "transfer.detection.mmdet.train:cli",
}

# Calls every console script's function with --help in one process (imports torch once) and
# reports where the packages and the recipes came from.
PROBE = """
import contextlib, importlib, io, json, sys
out = {}
for name, target in json.loads(sys.argv[1]).items():
    module, func = target.split(":")
    fn = getattr(importlib.import_module(module), func)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        try:
            code = fn(["--help"])
        except SystemExit as e:
            code = e.code
    out[name] = [code, buf.getvalue()]
import imsvd_configs, pretrain, transfer
from pretrain.config import config_dir, find_config
out["_files"] = [pretrain.__file__, transfer.__file__, imsvd_configs.__file__]
out["_recipes"] = [str(config_dir("eval")), str(find_config("knn_tiny", "eval")),
                   str(find_config("ablations/batch_512", "pretrain"))]
print(json.dumps(out))
"""


def _setup_cfg() -> configparser.ConfigParser:
    parser = configparser.ConfigParser()
    parser.read(REPO / "setup.cfg", encoding="utf-8")
    return parser


def _cfg_list(value: str) -> list[str]:
    return [line.strip() for line in value.splitlines() if line.strip()]


def test_setup_cfg_installs_the_recipes_under_the_project_name():
    cfg = _setup_cfg()
    packages = _cfg_list(cfg["options"]["packages"])
    package_dir = dict(
        (k.strip(), v.strip())
        for k, v in (line.split("=", 1) for line in _cfg_list(cfg["options"]["package_dir"]))
    )
    assert "configs" not in packages and not any(p.startswith("configs.") for p in packages)
    assert package_dir == {CONFIGS_PACKAGE: "configs"} and CONFIGS_PACKAGE in packages
    data = cfg["options.package_data"]
    assert "configs" not in data and data[CONFIGS_PACKAGE].strip() == "**/*.yaml"
    assert (REPO / "configs" / "__init__.py").is_file()


def test_setup_cfg_lists_every_package_of_the_tree():
    # packages are listed (a mapped package cannot be found): one added to the tree must be too
    tree = {
        ".".join(p.parent.relative_to(REPO).parts)
        for root in ("pretrain", "transfer")
        for p in (REPO / root).rglob("__init__.py")
    }
    listed = set(_cfg_list(_setup_cfg()["options"]["packages"])) - {CONFIGS_PACKAGE}
    assert listed == tree


def test_find_config_resolves_the_shipped_recipes():
    assert find_config("knn_tiny", "eval").name == "knn_tiny.yaml"
    assert find_config("ablations/batch_512", "pretrain").parent.name == "ablations"
    assert (config_dir("pretrain") / "base.yaml").is_file()


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The wheel built from the checkout, installed with --target into a fresh folder.

    The sources are copied first: an in-tree build would reuse (and could ship stale files of)
    the checkout's build/ folder.
    """
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("pretrain", "transfer", "configs"):
        shutil.copytree(REPO / name, src / name, ignore=skip)
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INDEX="1")
    pip = [sys.executable, "-m", "pip"]
    build = subprocess.run(
        pip + ["wheel", "--no-deps", "--no-build-isolation", "-w", str(root / "dist"), str(src)],
        capture_output=True, text=True, env=env, cwd=root, timeout=600,
    )  # fmt: skip
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    wheels = list((root / "dist").glob("imsvd-*.whl"))
    assert len(wheels) == 1, wheels
    site = root / "site"
    inst = subprocess.run(
        pip + ["install", "--no-deps", "--target", str(site), str(wheels[0])],
        capture_output=True, text=True, env=env, cwd=root, timeout=600,
    )  # fmt: skip
    assert inst.returncode == 0, inst.stdout[-2000:] + inst.stderr[-2000:]
    run_env = dict(os.environ, PYTHONPATH=str(site), OMP_NUM_THREADS="1")
    return root, site, run_env


@pytest.mark.slow
def test_wheel_declares_every_console_script(installed):
    _, site, _ = installed
    (dist_info,) = site.glob("imsvd-*.dist-info")
    parser = configparser.ConfigParser()
    parser.read(dist_info / "entry_points.txt")
    declared = dict(parser["console_scripts"])
    assert {k: declared.get(k) for k in SCRIPTS} == SCRIPTS
    assert not (site / "configs").exists()  # not under a name other projects use
    recipes = site / CONFIGS_PACKAGE
    shipped = {p.relative_to(recipes).as_posix() for p in recipes.rglob("*.yaml")}
    assert {
        "eval/base.yaml",
        "eval/knn_tiny.yaml",
        "pretrain/base.yaml",
        "pretrain/ablations/batch_512.yaml",
    } <= shipped


@pytest.mark.slow
def test_every_console_script_runs_from_the_wheel(installed):
    root, site, env = installed
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(SCRIPTS)],
        capture_output=True, text=True, env=env, cwd=root, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for path in out.pop("_files") + out.pop("_recipes"):
        assert Path(path).resolve().is_relative_to(site.resolve()), path  # not the checkout
    for name, (code, text) in out.items():  # the detection trainers too, stack or not
        assert code == 0 and "usage:" in text, (name, code, text[-500:])


@pytest.mark.slow
def test_knn_smoke_run_from_the_wheel(installed, tiny_trees, tiny_backbone):
    root, site, env = installed
    out = root / "knn_out"
    proc = subprocess.run(
        [sys.executable, "-m", "transfer.eval.knn", "--config", "knn_tiny", "--weights",
         str(tiny_backbone), "--output-dir", str(out), f"data.train_root={tiny_trees / 'train'}",
         f"data.val_root={tiny_trees / 'val'}"],
        capture_output=True, text=True, env=env, cwd=root, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "knn_results.json").read_text())
    assert res["num_train"] == 24 and res["num_val"] == 12 and res["top1_k1"] > 60.0
    assert f"results written to {out / 'knn_results.json'}" in proc.stdout
    assert (out / "config.yaml").is_file() and (out / "log.txt").is_file()

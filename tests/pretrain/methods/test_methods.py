"""The method registry: each method declares its section, checks, paper projector, loss and
monitors; the trainer's modules never branch on a method's name."""

from __future__ import annotations

import ast
import copy

import pytest
import torch
from helpers import REPO

from pretrain.config import ConfigError, load_config
from pretrain.engine.preflight import check_config
from pretrain.losses.barlowtwins import BarlowTwinsLoss
from pretrain.losses.imsvd import IMSVDLoss, LossConfigError
from pretrain.losses.vicreg import VICRegLoss
from pretrain.methods import METHODS, build_loss, get_method

RECIPES = REPO / "configs" / "pretrain"


def _cfg(name: str = "imsvd") -> dict:
    cfg = load_config(RECIPES / "imsvd_smoke.yaml")
    cfg["loss"]["name"] = name
    return cfg


def test_the_three_methods_are_registered_with_their_losses():
    assert set(METHODS) == {"imsvd", "vicreg", "barlowtwins"}
    cfg = _cfg()
    kinds = {"imsvd": IMSVDLoss, "vicreg": VICRegLoss, "barlowtwins": BarlowTwinsLoss}
    for name, kind in kinds.items():
        assert isinstance(build_loss({**cfg["loss"], "name": name}), kind)
        assert get_method(name).name == name
    with pytest.raises(LossConfigError, match="'loss.name': 'simclr' is not one of imsvd"):
        get_method("simclr")


@pytest.mark.parametrize("name", ["imsvd", "vicreg", "barlowtwins"])
def test_paper_projector_is_the_one_of_the_method_s_paper_recipe(name):
    recipe = load_config(RECIPES / f"{name}_r50_100ep.yaml")
    assert recipe["loss"]["name"] == name
    assert recipe["model"]["projector"] == get_method(name).paper_projector


@pytest.mark.parametrize("name", ["imsvd", "vicreg", "barlowtwins"])
def test_section_names_keys_of_the_schema(name):
    section = get_method(name).section.split(".")
    node = load_config(RECIPES / "base.yaml")
    for part in section:
        node = node[part]
    assert isinstance(node, dict) and node


def test_each_method_s_own_checks_run_in_check_config():
    cfg = _cfg("imsvd")
    cfg["model"]["projector"] = "128-161"
    with pytest.raises(ConfigError, match="not a multiple of bin_size"):
        check_config(cfg, 1)
    for name in ("vicreg", "barlowtwins"):  # their width needs no bin_size ...
        ok = copy.deepcopy(cfg)
        ok["loss"]["name"] = name
        check_config(ok, 1)
        ok["train"]["batch_size"] = 1  # ... but their statistics need two samples
        with pytest.raises(ConfigError, match=f"{name} needs a global batch of at least 2"):
            check_config(ok, 1)
    cfg["loss"]["name"] = "simclr"
    with pytest.raises(LossConfigError, match="loss.name"):
        check_config(cfg, 1)


def test_monitors_are_imsvd_s_code_statistics_and_follow_train_monitors():
    cfg = _cfg("imsvd")
    g = torch.Generator().manual_seed(0)
    d = int(cfg["model"]["projector"].split("-")[-1])
    z1, z2 = torch.randn(16, d, generator=g), torch.randn(16, d, generator=g)
    cfg["train"]["monitors"] = True
    stats = get_method("imsvd").monitors(z1, z2, cfg, 3)
    assert stats and all(k.startswith("mon/") for k in stats)
    cfg["train"]["monitors"] = False
    assert get_method("imsvd").monitors(z1, z2, cfg, 3) == {}
    assert get_method("vicreg").monitors is None and get_method("barlowtwins").monitors is None


def _compared_names(tree: ast.AST, names: set) -> list[int]:
    """Lines of comparisons (==, !=, in, not in) with a method name as one side."""
    lines = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Compare):
            continue
        for side in (node.left, *node.comparators):
            items = side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
            if any(isinstance(i, ast.Constant) and i.value in names for i in items):
                lines.append(node.lineno)
    return lines


def test_the_trainer_never_branches_on_a_method_name():
    names = set(METHODS)
    found = {}
    files = [
        *(REPO / "pretrain" / "engine").glob("*.py"),
        *(REPO / "pretrain" / "probe").glob("*.py"),
    ]
    files.append(REPO / "pretrain" / "main.py")
    assert len(files) >= 8
    for path in files:
        hits = _compared_names(ast.parse(path.read_text(encoding="utf-8")), names)
        if hits:
            found[str(path.relative_to(REPO))] = hits
    assert not found, found
    # the check finds such a branch where there is one
    assert _compared_names(ast.parse("if cfg['loss']['name'] in ('vicreg', 'x'): pass"), names)

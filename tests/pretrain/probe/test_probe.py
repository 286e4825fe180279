"""The online kNN probe: separable features give 100%, uninformative ones chance; the engine
logs it; bank / query sets come from a seeded split or two labelled folders."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REPO
from PIL import Image
from torch import nn

from pretrain.config import load_config
from pretrain.data.images import DataError
from pretrain.engine import trainer as engine
from pretrain.probe.online import KNNProbe, ProbeSet, build_probe

SMOKE = REPO / "configs" / "pretrain" / "imsvd_smoke.yaml"
COLOURS = [(230, 20, 20), (20, 230, 20), (20, 20, 230)]


def _pooling() -> nn.Module:
    """A 'backbone' whose features are the mean colour: it separates colour-coded classes."""
    net = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    net.register_parameter("dummy", nn.Parameter(torch.zeros(1)))  # gives the probe a device
    return net


def _coloured(n: int, seed: int) -> ProbeSet:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n,), generator=g)
    base = torch.tensor(COLOURS, dtype=torch.float32)[labels].view(n, 3, 1, 1)
    noise = torch.randint(-15, 16, (n, 3, 8, 8), generator=g).float()
    return ProbeSet((base + noise).clamp(0, 255).to(torch.uint8), labels)


def test_separable_features_give_100_percent():
    probe = KNNProbe(_coloured(300, 0), _coloured(90, 1), ks=(20, 5))
    model = _pooling().train()
    res = probe(model)
    assert res["knn/top1_k20"] == 100.0 and res["knn/top1_k5"] == 100.0
    assert model.training  # mode restored


def test_uninformative_features_give_chance():
    # labels independent of the images: 3 classes -> about 33%
    g = torch.Generator().manual_seed(0)
    bank = ProbeSet(
        torch.randint(0, 256, (600, 3, 8, 8), generator=g, dtype=torch.uint8),
        torch.randint(0, 3, (600,), generator=g),
    )
    queries = ProbeSet(
        torch.randint(0, 256, (900, 3, 8, 8), generator=g, dtype=torch.uint8),
        torch.randint(0, 3, (900,), generator=g),
    )
    res = KNNProbe(bank, queries)(_pooling())
    assert 25.0 < res["knn/top1_k20"] < 42.0


def _tree(root: Path, classes: list[str], per_class: int) -> Path:
    for ci, name in enumerate(classes):
        d = root / name
        d.mkdir(parents=True)
        colour = COLOURS[["red", "green", "blue"].index(name)]
        for i in range(per_class):
            arr = np.full((12, 12, 3), colour, np.uint8)
            arr[0, 0, :] = i  # a unique pixel per image
            Image.fromarray(arr).save(d / f"{i}.png")
    return root


EVAL = {
    "every_steps": 1,
    "bank_root": None,
    "query_root": None,
    "bank_size": 30,
    "query_size": 12,
    "seed": 0,
    "ks": [5],
    "temperature": 0.07,
    "image_size": 12,
    "batch_size": 16,
}
DATA = {"kind": "imagefolder", "root": None, "list_file": None, "image_size": 8}


@pytest.mark.parametrize("temperature", [0.01, 1e-3])
def test_small_temperature_does_not_overflow(temperature):
    # the probe votes with pretrain.probe.knn: exp(sim / T) is max-subtracted there
    probe = KNNProbe(_coloured(300, 0), _coloured(90, 1), ks=(1, 3, 20), temperature=temperature)
    out = probe(_pooling())
    assert out["knn/top1_k1"] == out["knn/top1_k3"] == out["knn/top1_k20"] == 100.0


@pytest.mark.parametrize("temperature", [float("nan"), float("inf"), 0.0, -1.0])
def test_bad_temperature_is_refused_naming_the_key(temperature):
    with pytest.raises(ValueError, match="eval.temperature"):
        KNNProbe(_coloured(30, 0), _coloured(9, 1), temperature=temperature)


def test_seeded_split_is_disjoint_and_reproducible(tmp_path):
    root = _tree(tmp_path / "train", ["red", "green", "blue"], 15)
    p1 = build_probe(EVAL, {**DATA, "root": str(root)})
    p2 = build_probe(EVAL, {**DATA, "root": str(root)})
    assert len(p1.bank) == 30 and len(p1.queries) == 12
    assert torch.equal(p1.bank.images, p2.bank.images)
    flat = lambda s: {bytes(x.numpy().tobytes()) for x in s.images}  # noqa: E731
    assert not flat(p1.bank) & flat(p1.queries)  # every image differs, so disjointness shows
    assert p1(_pooling())["knn/top1_k5"] == 100.0
    # more images requested than available: scaled down, still disjoint and non-empty
    p3 = build_probe({**EVAL, "bank_size": 100, "query_size": 100}, {**DATA, "root": str(root)})
    assert len(p3.bank) + len(p3.queries) == 45 and len(p3.queries) > 0


def test_folder_pair_matches_classes_by_name(tmp_path):
    bank = _tree(tmp_path / "bank", ["red", "green", "blue"], 6)
    query = _tree(tmp_path / "query", ["blue", "red"], 4)  # folder order differs from the bank
    cfg = {**EVAL, "bank_root": str(bank), "query_root": str(query)}
    probe = build_probe(cfg, DATA)
    assert probe(_pooling())["knn/top1_k5"] == 100.0
    other = _tree(tmp_path / "other", ["green"], 2)
    (other / "purple").mkdir()
    Image.new("RGB", (8, 8)).save(other / "purple" / "0.png")
    with pytest.raises(DataError, match="purple"):
        build_probe({**cfg, "query_root": str(other)}, DATA)
    with pytest.raises(DataError, match="together"):
        build_probe({**cfg, "query_root": None}, DATA)


def test_engine_logs_the_probe(tmp_path):
    out = tmp_path / "run"
    cfg = load_config(
        SMOKE,
        [
            f"checkpoint.output_dir={out}",
            "eval.every_steps=2",
            "eval.bank_size=20",
            "eval.query_size=8",
            "eval.ks=[3]",
        ],
    )
    summary = engine.train(cfg)
    assert summary["status"] == "finished"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    probes = [r for r in rows if "knn/top1_k3" in r]
    assert [r["step"] for r in probes] == [0, 2, 4]
    assert all(0.0 <= r["knn/top1_k3"] <= 100.0 and r["train_seconds"] >= 0 for r in probes)
    assert "probe" in (out / "log.txt").read_text()

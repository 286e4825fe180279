"""Linear probe: schedules, global-batch BatchNorm head, resume, frozen check, 2 procs == 1."""

from __future__ import annotations

import json

import pytest
import torch
from eval_helpers import REPO, make_image_tree, make_weights, run_module

from pretrain.config import load_config
from transfer import linear
from transfer.linear import LinearEvalError, LinearHead, lr_at_epoch, main, topk_accuracy

EVAL = REPO / "configs" / "eval"


def test_recipes_follow_the_protocols():
    places = load_config(EVAL / "places205_linear.yaml")
    assert places["head"]["batchnorm"] and places["train"]["epochs"] == 14
    lrs = [lr_at_epoch(e, places) for e in range(14)]
    assert lrs[:5] == [0.01] * 5
    assert lrs[5:10] == pytest.approx([0.001] * 5) and lrs[10:] == pytest.approx([1e-4] * 4)
    vissl = load_config(EVAL / "places205_linear_vissl.yaml")
    assert vissl["train"]["milestones"] == [4, 8, 12] and vissl["train"]["nesterov"]
    imnet = load_config(EVAL / "imagenet_linear.yaml")
    t = imnet["train"]
    assert (t["lr"], t["weight_decay"], t["batch_size"], t["epochs"]) == (0.02, 1e-6, 256, 100)
    assert imnet["data"]["train_scale"] == [0.2, 1.0] and not imnet["head"]["batchnorm"]
    assert lr_at_epoch(0, imnet) == 0.02 and lr_at_epoch(50, imnet) == pytest.approx(0.01)


def test_head_batchnorm_uses_the_global_batch():
    torch.manual_seed(0)
    head = LinearHead(6, 3, batchnorm=True)
    x = torch.randn(8, 6) * 3 + 1
    full = head(x)
    part = head(x, slice(4, 8))
    torch.testing.assert_close(part, full[4:8])
    assert not any(p.requires_grad for p in head.bn.parameters())  # affine=False: no params


def test_topk():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1]])
    acc = topk_accuracy(logits, torch.tensor([1, 2]), ks=(1, 2, 5))
    assert acc == {"top1": 50.0, "top2": 50.0, "top5": 100.0}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("lin")
    make_image_tree(root / "train", n_per_class=8, seed=0)
    make_image_tree(root / "val", n_per_class=4, seed=1)
    return root, make_weights(root / "w.pth")


def _args(root, weights, out, *extra):
    return [
        "--config", "linear_tiny", "--weights", str(weights), "--output-dir", str(out),
        f"data.train_root={root / 'train'}", f"data.val_root={root / 'val'}", *extra,
    ]  # fmt: skip


def test_train_resume_and_results(tiny, tmp_path):
    root, weights = tiny
    out = tmp_path / "out"
    assert main(_args(root, weights, out, "train.lr=0.5")) == 0
    res = json.loads((out / "linear_results.json").read_text())
    assert res["frozen_weights_unchanged"] and res["num_classes"] == 3
    assert len(res["history"]) == 2 and 0.0 <= res["top1"] <= res["top5"] <= 100.0
    assert res["top1"] > 50.0  # chance is 33%
    ckpt = torch.load(out / "linear_checkpoint.pth", weights_only=True)
    assert ckpt["epoch"] == 2
    # resume: one more epoch continues from the saved head (history grows by one)
    assert main(_args(root, weights, out, "train.lr=0.5", "train.epochs=3")) == 0
    res3 = json.loads((out / "linear_results.json").read_text())
    assert [h["epoch"] for h in res3["history"]] == [1, 2, 3]
    assert res3["history"][:2] == res["history"]


def test_changed_frozen_weights_is_an_error(tiny, tmp_path, monkeypatch):
    root, weights = tiny
    import transfer.features as feat_mod

    real = feat_mod.forward_features

    def drifting(model, x, layer="pool5"):
        with torch.no_grad():  # a bug that updates the "frozen" trunk
            model.conv1.weight.add_(1e-3)
        return real(model, x, layer)

    monkeypatch.setattr(feat_mod, "forward_features", drifting)
    cfg = load_config(EVAL / "linear_tiny.yaml", _args(root, weights, tmp_path)[6:])
    cfg.update(weights=str(weights), output_dir=str(tmp_path / "o"))
    with pytest.raises(LinearEvalError, match="frozen backbone weights changed"):
        linear.train_linear(cfg)


@pytest.mark.dist
def test_two_processes_equal_one(tiny, tmp_path):
    root, weights = tiny
    heads, results = [], []
    for nproc in (1, 2):
        out = tmp_path / f"out{nproc}"
        run_module("transfer.linear", _args(root, weights, out), nproc=nproc, timeout=180)
        heads.append(torch.load(out / "linear_checkpoint.pth", weights_only=True)["head"])
        results.append(json.loads((out / "linear_results.json").read_text()))
    for key in heads[0]:
        torch.testing.assert_close(heads[1][key], heads[0][key], rtol=1e-4, atol=1e-5)
    assert results[0]["top1"] == results[1]["top1"]

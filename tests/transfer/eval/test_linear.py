"""Linear probe: schedules, global-batch BatchNorm head, val labels by train class names, resume
checks, log lines, unreadable images, frozen check, 2 procs == 1."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch
from helpers import REPO, make_weights, run_module

from pretrain.config import load_config
from transfer.eval import features as feat_mod
from transfer.eval import head_state, linear
from transfer.eval.classifier import LinearHead, format_epoch, lr_at_epoch, topk_accuracy
from transfer.eval.linear import main
from transfer.eval.supervised import SupervisedError

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


def test_head_is_a_batchnorm_without_affine_then_a_linear_layer():
    torch.manual_seed(0)
    head = LinearHead(6, 3, batchnorm=True)
    x = torch.randn(8, 6) * 3 + 1
    z = (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + 1e-5)
    torch.testing.assert_close(head(x), z @ head.fc.weight.T + head.fc.bias)
    assert list(head.bn.parameters()) == []  # affine=False: no params
    assert float(head.fc.weight.detach().std()) == pytest.approx(0.01, rel=0.3)
    assert not head.fc.bias.any()


def test_topk():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1]])
    acc = topk_accuracy(logits, torch.tensor([1, 2]), ks=(1, 2, 5))
    assert acc == {"top1": 50.0, "top2": 50.0, "top5": 100.0}


@pytest.fixture(scope="module")
def tiny(tiny_trees, tiny_backbone):
    return tiny_trees, tiny_backbone


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
    real = feat_mod.forward_features

    def drifting(model, x, layer="pool5"):
        with torch.no_grad():  # a bug that updates the "frozen" trunk
            model.conv1.weight.add_(1e-3)
        return real(model, x, layer)

    monkeypatch.setattr(feat_mod, "forward_features", drifting)
    cfg = load_config(EVAL / "linear_tiny.yaml", _args(root, weights, tmp_path)[6:])
    cfg["model"]["weights"], cfg["output_dir"] = str(weights), str(tmp_path / "o")
    with pytest.raises(SupervisedError, match="frozen backbone weights changed"):
        linear.train_linear(cfg)


@pytest.mark.dist
def test_two_processes_equal_one(tiny, tmp_path):
    root, weights = tiny
    heads, results = [], []
    for nproc in (1, 2):
        out = tmp_path / f"out{nproc}"
        run_module("transfer.eval.linear", _args(root, weights, out), nproc=nproc, timeout=180)
        heads.append(torch.load(out / "linear_checkpoint.pth", weights_only=True)["head"])
        results.append(json.loads((out / "linear_results.json").read_text()))
    for key in heads[0]:
        torch.testing.assert_close(heads[1][key], heads[0][key], rtol=1e-4, atol=1e-5)
    assert results[0]["top1"] == results[1]["top1"]


def _copy(src, dst, classes):
    for c in classes:
        shutil.copytree(src / c, dst / c)
    return dst


@pytest.mark.parametrize("val_classes", [["c1", "c2"], ["c0"]])
def test_val_tree_missing_classes_keeps_the_train_labels(tiny, tmp_path, val_classes):
    root, weights = tiny
    full = tmp_path / "full"
    assert main(_args(root, weights, full, "train.lr=0.5")) == 0
    ref = json.loads((full / "linear_results.json").read_text())
    part = _copy(root / "val", tmp_path / "val", val_classes)
    out = tmp_path / "part"
    assert main(_args(root, weights, out, "train.lr=0.5", f"data.val_root={part}")) == 0
    res = json.loads((out / "linear_results.json").read_text())
    assert res["num_val"] == 4 * len(val_classes) and res["num_classes"] == 3
    # the same head (same data, seed, settings) judged on the subset with the same labels
    head = torch.load(full / "linear_checkpoint.pth", weights_only=True)["head"]
    feats = np.load(full / "features" / "val_pool5.feats.npy")
    labels = np.load(full / "features" / "val_pool5.labels.npy")
    keep = np.isin(labels, [int(c[1:]) for c in val_classes])
    model = LinearHead(feats.shape[1], 3, batchnorm=True)
    model.load_state_dict(head)
    model.eval()
    with torch.no_grad():
        pred = model(torch.from_numpy(feats[keep])).argmax(1).numpy()
    assert res["top1"] == pytest.approx(100.0 * np.mean(pred == labels[keep]), abs=1e-6)
    assert ref["top1"] > 50.0 and res["top1"] > 0.0  # a class-order mix-up gave 0.00


@pytest.mark.parametrize(
    "change, expected",
    [
        ("classes", r"training classes \(3 vs 2; only in the checkpoint: \['c2'\]\)"),
        ("renamed", r"only now: \['c9'\]"),
        ("samples", r"training samples \(24 in the checkpoint, 21 now"),
        ("lr", r"train.lr: 0.5 -> 0.1"),
        ("batchnorm", r"head.batchnorm: True -> False"),
        ("weights", r"backbone weights: sha256"),
    ],
)
def test_resume_refuses_another_run(tiny, tmp_path, capsys, change, expected):
    root, weights = tiny
    out = tmp_path / "out"
    assert main(_args(root, weights, out, "train.lr=0.5")) == 0
    config_before = (out / "config.yaml").read_bytes()
    train, val = root / "train", root / "val"
    extra = ["train.lr=0.5", "train.epochs=3"]
    if change in ("classes", "renamed"):
        train = _copy(root / "train", tmp_path / "t", ["c0", "c1"])
        val = _copy(root / "val", tmp_path / "v", ["c0", "c1"])
        if change == "renamed":
            shutil.copytree(root / "train" / "c2", train / "c9")
    elif change == "samples":
        train = _copy(root / "train", tmp_path / "t", ["c0", "c1", "c2"])
        for c in ("c0", "c1", "c2"):
            (train / c / "img007.png").unlink()
    elif change == "lr":
        extra = ["train.lr=0.1", "train.epochs=3"]
    elif change == "batchnorm":
        extra.append("head.batchnorm=false")
    args = _args(root, weights, out, *extra, f"data.train_root={train}", f"data.val_root={val}")
    if change == "weights":
        args[args.index(str(weights))] = str(make_weights(tmp_path / "w2.pth", seed=1))
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "does not belong to this run" in err and "train.resume=false" in err
    assert re.search(expected, err), err
    # the refused run changed nothing (its config.yaml neither); train.resume=false starts a
    # new head there
    assert torch.load(out / "linear_checkpoint.pth", weights_only=True)["epoch"] == 2
    assert (out / "config.yaml").read_bytes() == config_before
    assert main(args + ["train.resume=false"]) == 0
    assert json.loads((out / "linear_results.json").read_text())["history"][0]["epoch"] == 1


def test_head_checkpoint_records_data_and_settings(tiny, tmp_path):
    root, weights = tiny
    out = tmp_path / "out"
    assert main(_args(root, weights, out)) == 0
    ckpt = torch.load(out / "linear_checkpoint.pth", weights_only=True)
    assert ckpt["data"]["classes"] == ["c0", "c1", "c2"] and ckpt["data"]["num_samples"] == 24
    assert ckpt["format"] == "imsvd-supervised-state" and ckpt["mode"] == "frozen"
    assert ckpt["config"]["train"]["lr"] == 0.1 and ckpt["backbone"] is None
    assert ckpt["config"]["train"]["milestones"] == [1]
    assert (ckpt["epoch"], ckpt["step_in_epoch"], ckpt["step"]) == (2, 0, 6)  # 24 images / 8
    # the earlier layout (no format field, epoch ends only) loads as a frozen state ...
    old = {k: ckpt[k] for k in ("epoch", "head", "optimizer", "history", "weights_sha256",
                                "data", "config")}  # fmt: skip
    # its recipe lacks the keys added with the new trainer (read as the old behaviour)
    for section, key in (("data", "train_subset"), ("data", "train_fraction"),
                         ("data", "subset_seed"), ("train", "precision"),
                         ("train", "checkpoint_every_steps")):  # fmt: skip
        del old["config"][section][key]
    torch.save(old, out / "linear_checkpoint.pth")
    state = head_state.load_state(out / "linear_checkpoint.pth")
    assert (state["mode"], state["step_in_epoch"], state["format_version"]) == ("frozen", 0, 0)
    assert main(_args(root, weights, out, "train.epochs=3")) == 0  # ... and resumes
    res = json.loads((out / "linear_results.json").read_text())
    assert [h["epoch"] for h in res["history"]] == [1, 2, 3]
    # one without the training data's record is refused, not guessed at
    del old["data"]
    torch.save(old, out / "linear_checkpoint.pth")
    with pytest.raises(head_state.HeadStateError, match="lacks field 'data'.*older version"):
        head_state.load_state(out / "linear_checkpoint.pth")


def test_epoch_log_lines_are_readable(tiny, tmp_path, capsys):
    line = format_epoch({"epoch": 3, "lr": 0.019999999999999997, "loss": 1.234567891234,
                         "top1": 66.899999999, "top5": 97.8}, 100)  # fmt: skip
    assert line == "epoch 3/100  lr 0.02  loss 1.2346  top1 66.90%  top5 97.80%"
    assert format_epoch({"epoch": 1, "lr": 0.1, "loss": 2.0}, 2, 3).endswith(
        "(3 unreadable images left out)"
    )
    root, weights = tiny
    assert main(_args(root, weights, tmp_path / "out")) == 0
    out = capsys.readouterr().out
    for epoch, lr in ((1, "0.1"), (2, "0.01")):
        pattern = (
            rf"epoch {epoch}/2  lr {lr}  loss \d+\.\d{{4}}  top1 \d+\.\d\d%  top5 \d+\.\d\d%\n"
        )
        assert re.search(pattern, out), out
    assert "{'epoch'" not in out


def test_unreadable_images_counted(tiny, tmp_path):
    root, weights = tiny
    data = tmp_path / "data"
    shutil.copytree(root, data, ignore=shutil.ignore_patterns("*.pth"))
    (data / "train" / "c0" / "img003.png").write_bytes(b"")
    (data / "val" / "c2" / "img000.png").write_bytes(b"junk")
    out = tmp_path / "out"
    assert main(_args(data, weights, out)) == 0
    res = json.loads((out / "linear_results.json").read_text())
    assert res["unreadable_images"] == {"train": 1, "val": 1}
    assert res["num_train"] == 23 and res["num_val"] == 11
    # batches of one: the unreadable image's batch is empty and its step is skipped
    one = tmp_path / "one"
    assert main(_args(data, weights, one, "train.batch_size=1", "head.batchnorm=false")) == 0
    res = json.loads((one / "linear_results.json").read_text())
    assert res["unreadable_images"] == {"train": 1, "val": 1}
    assert main(_args(data, weights, tmp_path / "strict", "data.strict=true")) == 2


@pytest.mark.parametrize("n", [21, 101, 102, 7, 1])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_global_batches_are_the_same_for_any_process_count(n, world):
    from transfer.eval.classifier import GlobalBatchSampler

    batch = 6
    one = GlobalBatchSampler(n, batch, 1, 0, seed=4)
    shards = [GlobalBatchSampler(n, batch, world, r, seed=4) for r in range(world)]
    for epoch in (0, 3):
        for s in [one, *shards]:
            s.set_epoch(epoch)
        single = list(one)
        per_rank = [list(s) for s in shards]
        assert all(len(b) == len(single) == -(-n // batch) for b in per_rank)
        single = [[i for _, i in b] for b in single]
        per_rank = [[[i for _, i in b] for b in r] for r in per_rank]
        for step, block in enumerate(single):
            union = [i for b in per_rank for i in b[step]]
            assert sorted(union) == sorted(block)  # the same global batch, nothing padded
        assert sorted(i for b in single for i in b) == list(range(n))  # each sample once
    if n > 2:  # epochs reshuffle
        one.set_epoch(0)
        first = list(one)
        one.set_epoch(1)
        assert list(one) != first


@pytest.mark.dist
def test_two_processes_equal_one_with_an_odd_count_and_a_bad_image(tiny, tmp_path):
    # 21 training images, global batch 8: the last batch (5) is split 3 / 2; DistributedSampler
    # would pad to 22 with a duplicate of the permutation's first image, the unreadable one here
    root, weights = tiny
    data = tmp_path / "data"
    from helpers import make_image_tree

    make_image_tree(data / "train", n_per_class=7, seed=0)
    shutil.copytree(root / "val", data / "val")
    ds_paths = sorted((data / "train").rglob("*.png"))
    g = torch.Generator()
    g.manual_seed(0)  # seed 0, epoch 0: the sample DistributedSampler pads with
    ds_paths[int(torch.randperm(21, generator=g)[0])].write_bytes(b"junk")
    heads, results = [], []
    for nproc in (1, 2):
        out = tmp_path / f"out{nproc}"
        args = _args(data, weights, out, "train.batch_size=8")
        run_module("transfer.eval.linear", args, nproc=nproc, timeout=180)
        heads.append(torch.load(out / "linear_checkpoint.pth", weights_only=True)["head"])
        results.append(json.loads((out / "linear_results.json").read_text()))
    for key in heads[0]:
        torch.testing.assert_close(heads[1][key], heads[0][key], rtol=1e-4, atol=1e-5)
    for r in results:
        assert r["unreadable_images"]["train"] == 1 and r["num_train"] == 20
    assert results[0]["top1"] == results[1]["top1"]
    assert [h["loss"] for h in results[0]["history"]] == pytest.approx(
        [h["loss"] for h in results[1]["history"]], rel=1e-4
    )


@pytest.mark.parametrize("weights", ["missing.pth", "a_folder"])
def test_bad_weights_are_refused_before_the_output_folder_is_made(tiny, tmp_path, capsys, weights):
    root, _ = tiny
    (tmp_path / "a_folder").mkdir()
    out = tmp_path / "out"
    assert main(_args(root, tmp_path / weights, out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: config key 'model.weights'") and weights in err[-1]
    assert not out.exists()

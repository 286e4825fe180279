"""The supervised-head trainer: frozen mode against an independent re-computation, fine-tuning
(the backbone changes, a separable set is learned), label subsets, exact resume after a kill
mid-epoch, a changed recipe refused on resume, 2 gloo processes == 1 (global BatchNorm)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import REPO, run_module

from pretrain.checkpoint import load_backbone, tensor_sha256
from pretrain.config import ConfigError, load_config
from transfer.eval import features, finetune, linear, runner, subsets
from transfer.eval.classifier import LinearHead, lr_at_epoch
from transfer.eval.supervised import SupervisedTrainer

EVAL = REPO / "configs" / "eval"


def _args(config, root, weights, out, *extra):
    return [
        "--config", config, "--weights", str(weights), "--output-dir", str(out),
        f"data.train_root={root / 'train'}", f"data.val_root={root / 'val'}", *extra,
    ]  # fmt: skip


def _state(out, name="finetune_checkpoint.pth"):
    return torch.load(out / name, weights_only=True)


def test_frozen_mode_equals_an_independent_sgd_on_the_features(tiny_trees, tiny_backbone, tmp_path):
    """The probe is SGD (momentum, wd, step schedule) on BN+Linear over the frozen features, in
    the batches of the seeded permutation: re-computed here from the features and the initial
    head, without the trainer."""
    overrides = [f"model.weights={tiny_backbone}", f"output_dir={tmp_path / 'out'}",
                 f"data.train_root={tiny_trees / 'train'}", f"data.val_root={tiny_trees / 'val'}",
                 "head.batchnorm=true", "train.lr=0.3", "train.weight_decay=1e-3"]  # fmt: skip
    cfg = load_config(EVAL / "linear_tiny.yaml", overrides)
    ctx = runner.setup(linear.EVALUATION, cfg)
    try:
        trainer = SupervisedTrainer(ctx, "frozen", "linear_checkpoint.pth")
        init = copy.deepcopy(trainer.head.state_dict())
        res = trainer.fit()
    finally:
        ctx.release()
    feats, labels = features.extract_features(trainer.backbone, trainer.train_ds, batch_size=5)
    feats, labels = torch.from_numpy(feats), torch.from_numpy(labels)
    head = LinearHead(feats.shape[1], 3, batchnorm=True)
    head.load_state_dict(init)
    t = cfg["train"]
    opt = torch.optim.SGD(head.parameters(), lr=t["lr"], momentum=t["momentum"],
                          weight_decay=t["weight_decay"])  # fmt: skip
    for epoch in range(t["epochs"]):
        for g in opt.param_groups:
            g["lr"] = lr_at_epoch(epoch, cfg)
        gen = torch.Generator().manual_seed(cfg["seed"] + epoch)
        perm = torch.randperm(len(labels), generator=gen)
        for start in range(0, len(perm), t["batch_size"]):
            idx = perm[start : start + t["batch_size"]]
            loss = F.cross_entropy(head(feats[idx]), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    for key, value in head.state_dict().items():
        torch.testing.assert_close(trainer.head.state_dict()[key], value, rtol=1e-5, atol=1e-6)
    assert res["frozen_weights_unchanged"] and res["reported"] == "last"
    assert res["top1"] == res["last"]["top1"] and res["best"]["top1"] >= res["top1"]


def test_finetune_changes_the_backbone_and_learns_a_separable_set(
    tiny_trees, tiny_backbone, tmp_path, capsys
):
    out = tmp_path / "ft"
    # the training images are the validation set: the separable set must be learned to 100%
    args = _args("finetune_tiny", tiny_trees, tiny_backbone, out, "train.epochs=12",
                 f"data.val_root={tiny_trees / 'train'}", "train.eval_every=4")  # fmt: skip
    assert finetune.main(args) == 0
    res = json.loads((out / "finetune_results.json").read_text())
    assert res["mode"] == "finetune" and res["top1"] == 100.0
    assert [e["epoch"] for e in res["evaluated"]] == [4, 8, 12]
    assert res["best"] in res["evaluated"] and res["num_train"] == 24
    tuned, meta = load_backbone(res["finetuned_backbone"])
    before, _ = load_backbone(str(tiny_backbone))
    assert tensor_sha256(tuned) != tensor_sha256(before)
    for key in ("conv1.weight", "layer4.1.conv2.weight", "layer1.0.bn1.running_mean"):
        assert not torch.equal(tuned[key], before[key]), key
    assert "best top1 (epoch" in capsys.readouterr().out
    # the fine-tuned backbone is an input of the other evaluations
    assert linear.main(_args("linear_tiny", tiny_trees, res["finetuned_backbone"],
                             tmp_path / "probe")) == 0  # fmt: skip


def test_bf16_autocast_runs(tiny_trees, tiny_backbone, tmp_path):
    out = tmp_path / "bf16"
    assert finetune.main(_args("finetune_tiny", tiny_trees, tiny_backbone, out,
                               "train.precision=bf16", "train.epochs=1")) == 0  # fmt: skip
    res = json.loads((out / "finetune_results.json").read_text())
    assert np.isfinite(res["history"][0]["loss"]) and 0.0 <= res["top1"] <= 100.0


def _samples(n_per_class, classes=3):
    return [(f"/d/c{c}/c{c}_{i:03d}.JPEG", c) for c in range(classes) for i in range(n_per_class)]


def test_subset_file_takes_exactly_the_listed_images(tmp_path):
    samples = _samples(10)
    listed = ["c0_003.JPEG", "c2_009.JPEG", "c1_000.JPEG"]
    f = tmp_path / "1percent.txt"
    f.write_text("\n".join(listed) + "\n\n")
    idx = subsets.select_by_names(samples, subsets.read_subset_file(f), "test")
    assert [samples[i][0].rsplit("/", 1)[1] for i in idx] == sorted(listed, key=lambda n: n[:2])
    f.write_text("c0_003.JPEG\nn01440764_10026.JPEG\nc9_1.JPEG\n")
    with pytest.raises(subsets.SubsetError, match=r"2 of its 3 file names are not in the .*30 "):
        subsets.select_by_names(samples, subsets.read_subset_file(f), "test")
    f.write_text("c0_003.JPEG\nc0_003.JPEG\n")
    with pytest.raises(subsets.SubsetError, match="more than once"):
        subsets.read_subset_file(f)
    twice = samples + [("/e/c0/c0_003.JPEG", 0)]
    with pytest.raises(subsets.SubsetError, match="match several"):
        subsets.select_by_names(twice, ["c0_003.JPEG"], "test")


@pytest.mark.parametrize("fraction, per_class", [(0.01, [1, 1, 2]), (0.1, [10, 5, 15])])
def test_fraction_is_per_class_with_at_least_one_image(fraction, per_class):
    labels = [0] * 100 + [1] * 50 + [2] * 150
    idx = subsets.select_fraction(labels, fraction, seed=3)
    counts = np.bincount([labels[i] for i in idx], minlength=3)
    assert counts.tolist() == per_class and idx == sorted(set(idx))
    assert idx == subsets.select_fraction(labels, fraction, seed=3)  # seeded
    assert idx != subsets.select_fraction(labels, fraction, seed=4)
    with pytest.raises(ConfigError, match="train_fraction"):
        subsets.select_fraction(labels, 1.5, seed=0)


def test_subsets_through_the_command_line(tiny_trees, tiny_backbone, tmp_path, capsys):
    names = tmp_path / "subset.txt"
    names.write_text("img000.png\n")  # the same name exists in every class folder
    out = tmp_path / "o"
    base = _args("linear_tiny", tiny_trees, tiny_backbone, out)
    assert linear.main(base + [f"data.train_subset={names}"]) == 2
    assert "match several training images" in capsys.readouterr().err
    names.write_text("nothere.png\nimg000.png\n")
    assert linear.main(base + [f"data.train_subset={names}"]) == 2
    assert "1 of its 2 file names are not in the training data (24 images)" in (
        capsys.readouterr().err
    )
    assert linear.main(base + ["data.train_fraction=0.25", "train.batch_size=3"]) == 0
    res = json.loads((out / "linear_results.json").read_text())
    assert res["num_train"] == 6 and res["subset"]["kind"] == "fraction"
    assert res["subset"]["num_samples"] == 6 and res["subset"]["of"] == 24
    assert _state(out, "linear_checkpoint.pth")["data"]["num_samples"] == 6


class _Killed(Exception):
    pass


def test_resume_after_a_kill_mid_epoch_reaches_the_uninterrupted_weights(
    tiny_trees, tiny_backbone, tmp_path, monkeypatch
):
    extra = ["train.epochs=2", "train.checkpoint_every_steps=1",
             "data.train_aug=random_resized_crop", "data.train_crop=32",
             "data.train_scale=[0.5,1.0]"]  # fmt: skip
    whole = tmp_path / "whole"
    assert finetune.main(_args("finetune_tiny", tiny_trees, tiny_backbone, whole, *extra)) == 0
    cut = tmp_path / "cut"
    real, calls = SupervisedTrainer.run_step, []

    def dies_at_the_fifth_step(self, *a, **k):
        calls.append(1)
        if len(calls) == 5:  # epoch 1, after its first step was saved
            raise _Killed
        return real(self, *a, **k)

    monkeypatch.setattr(SupervisedTrainer, "run_step", dies_at_the_fifth_step)
    with pytest.raises(_Killed):
        finetune.main(_args("finetune_tiny", tiny_trees, tiny_backbone, cut, *extra))
    saved = _state(cut)
    assert (saved["epoch"], saved["step_in_epoch"], saved["step"]) == (1, 1, 4)
    monkeypatch.setattr(SupervisedTrainer, "run_step", real)
    # resumed with a data worker (a neutral key): the augmentations are per-sample seeded
    assert finetune.main(_args("finetune_tiny", tiny_trees, tiny_backbone, cut, *extra,
                               "data.num_workers=1")) == 0  # fmt: skip
    a, b = _state(whole), _state(cut)
    for part in ("head", "backbone"):
        for key in a[part]:
            torch.testing.assert_close(b[part][key], a[part][key], rtol=0, atol=0)
    ra = json.loads((whole / "finetune_results.json").read_text())
    rb = json.loads((cut / "finetune_results.json").read_text())
    assert ra["history"] == rb["history"] and ra["top1"] == rb["top1"]


def test_a_changed_learning_rate_is_refused_on_resume(tiny_trees, tiny_backbone, tmp_path, capsys):
    out = tmp_path / "o"
    assert finetune.main(_args("finetune_tiny", tiny_trees, tiny_backbone, out)) == 0
    before = _state(out)
    args = _args("finetune_tiny", tiny_trees, tiny_backbone, out, "train.epochs=3")
    assert finetune.main(args + ["backbone.lr=0.02"]) == 2
    err = capsys.readouterr().err
    assert "does not belong to this run" in err and "backbone.lr: 0.01 -> 0.02" in err
    assert "train.epochs" in err  # cosine: more epochs change every epoch's learning rate
    assert _state(out)["step"] == before["step"]  # the refused run wrote nothing
    assert finetune.main(args + ["backbone.lr=0.02", "train.resume=false"]) == 0


def test_recipes_hold_the_published_settings():
    vic1 = load_config(EVAL / "imagenet_semi_vicreg_1pct.yaml")
    assert (vic1["backbone"]["lr"], vic1["train"]["lr"], vic1["train"]["epochs"]) == (
        0.03,
        0.08,
        20,
    )
    assert vic1["train"]["weight_decay"] == vic1["backbone"]["weight_decay"] == 0.0
    assert vic1["data"]["train_subset"] == "1percent.txt"
    vic10 = load_config(EVAL / "imagenet_semi_vicreg_10pct.yaml")
    assert (vic10["backbone"]["lr"], vic10["train"]["lr"]) == (0.01, 0.1)
    bt = load_config(EVAL / "imagenet_semi_barlowtwins_1pct.yaml")
    assert (bt["backbone"]["lr"], bt["train"]["lr"], bt["train"]["epochs"]) == (0.002, 0.5, 20)
    ref = load_config(EVAL / "imagenet_finetune.yaml")
    t = ref["train"]
    assert (t["lr"], t["weight_decay"], t["epochs"], t["batch_size"]) == (0.02, 1e-6, 100, 256)
    assert ref["backbone"] == {"lr": 0.0, "weight_decay": 1e-6}
    assert ref["data"]["train_scale"] == [0.08, 1.0] and ref["evaluation"] == "finetune"


@pytest.mark.parametrize(
    "override, needle",
    [("train.precision=fp8", "train.precision must be fp32, bf16 or fp16"),
     ("data.train_fraction=0.1", "alternatives"), ("train.schedule=step", "train.schedule"),
     ("features.layer=res4", "layer4 untrained"),
     ("train.nesterov=true", "train.momentum > 0")],
)  # fmt: skip
def test_cross_field_checks_name_the_key(override, needle):
    overrides = ["data.train_root=t", "data.val_root=v", "data.train_subset=s.txt", override]
    cfg = load_config(EVAL / "finetune_tiny.yaml", overrides)
    if override.startswith("data.train_fraction"):
        with pytest.raises(ConfigError, match=needle):
            finetune.validate(cfg)
        return
    cfg["data"]["train_subset"] = ""
    if override == "train.nesterov=true":
        cfg["train"]["momentum"] = 0.0
    with pytest.raises(ConfigError, match=needle):
        finetune.validate(cfg)


def test_the_linear_tool_refuses_a_finetune_recipe(tiny_trees, tiny_backbone, tmp_path, capsys):
    assert linear.main(_args("finetune_tiny", tiny_trees, tiny_backbone, tmp_path)) == 2
    assert "is a recipe for 'finetune', not for 'linear'" in capsys.readouterr().err


@pytest.mark.dist
def test_two_processes_equal_one_with_global_batchnorm(tiny_trees, tiny_backbone, tmp_path):
    # one step per epoch (the whole 24-image train set, 12 a process), two epochs: the tiny
    # ResNet's BatchNorm over 1 x 1 res5 maps amplifies float32 rounding differences between
    # one and two processes (1e-7 at the first step) past 1e-4 from the third step on, by an
    # amount that depends on the CPU's kernels; a missing gradient or statistics sync shows at
    # the first step already
    states, results = [], []
    for nproc in (1, 2):
        out = tmp_path / f"out{nproc}"
        args = _args("finetune_tiny", tiny_trees, tiny_backbone, out, "train.batch_size=24",
                     "train.lr=0.01", "backbone.lr=0.001")  # fmt: skip
        run_module("transfer.eval.finetune", args, nproc=nproc, timeout=240)
        states.append(_state(out))
        results.append(json.loads((out / "finetune_results.json").read_text()))
    for part in ("head", "backbone"):
        for key in states[0][part]:
            torch.testing.assert_close(
                states[1][part][key].float(), states[0][part][key].float(), rtol=1e-4, atol=1e-5
            )
    assert results[0]["top1"] == results[1]["top1"]
    assert [h["loss"] for h in results[0]["history"]] == pytest.approx(
        [h["loss"] for h in results[1]["history"]], rel=1e-4
    )


def test_channels_last_training_matches_contiguous(tiny_trees, tiny_backbone, tmp_path):
    """train.channels_last only changes the memory format: one step (the whole 24-image set)
    gives the same head and backbone as the contiguous run, up to float rounding."""
    states = []
    for flag in ("false", "true"):
        out = tmp_path / flag
        args = _args("finetune_tiny", tiny_trees, tiny_backbone, out, "train.epochs=1",
                     "train.batch_size=24", f"train.channels_last={flag}")  # fmt: skip
        assert finetune.main(args) == 0
        states.append(_state(out))
    for part in ("head", "backbone"):
        for key in states[0][part]:
            torch.testing.assert_close(
                states[1][part][key].float(), states[0][part][key].float(), rtol=1e-4, atol=1e-5
            )

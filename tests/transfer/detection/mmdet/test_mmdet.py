"""MMDetection transfer: loading check, refusals, instant training + evaluation + resume on CPU.

Skipped when MMDetection is not installed (tools/install_mmdet.py installs it).
"""

from __future__ import annotations

import glob
import json
import os
import time

import pytest
import torch

try:  # the reason is shown by pytest -rs
    import mmcv.ops  # noqa: F401
    import mmdet  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    pytest.skip(
        f"MMDetection is not installed ({exc}); `make setup-mmdet` compiles and installs it",
        allow_module_level=True,
    )
pytestmark = pytest.mark.mmdet

from helpers import REPO, export_and_convert, write_tiny_coco  # noqa: E402
from mmdet.datasets import CocoDataset  # noqa: E402
from mmdet.registry import MODELS  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402

from transfer.detection.mmdet import train as mmdet_train  # noqa: E402
from transfer.detection.mmdet import trainer as mmdet_trainer  # noqa: E402
from transfer.detection.mmdet.ext import (  # noqa: E402
    ResLayerExtraNorm,
    set_pretrained_checkpoint,
    single_process_norm,
)
from transfer.detection.mmdet.weights import MMDetWeightsError  # noqa: E402

REPO = str(REPO)
MARKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), ".mmdet_train_payload_ran")

# The only parameters a converted backbone cannot provide: the untrained heads.
HEAD_PREFIXES = (
    "rpn_head.",
    "roi_head.bbox_head.",
    "roi_head.mask_head.",
    "roi_head.shared_head.norm.",  # the extra norm after res5 (ResLayerExtraNorm)
)
# The official COCO category ids of the 80 classes, in CocoDataset.METAINFO["classes"] order.
COCO_IDS = [
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27,
    28, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53,
    54, 55, 56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80,
    81, 82, 84, 85, 86, 87, 88, 89, 90,
]  # fmt: skip


def _convert(folder, arch: str = "resnet50"):
    return export_and_convert(folder, "convert_to_mmdet", f"{arch}_mmdet.pth", arch)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """This project's exported ResNet-50 backbone, converted by tools/convert_to_mmdet.py."""
    sd, path, summary = _convert(tmp_path_factory.mktemp("w"))
    print("\n" + summary)
    return sd, path


def _cfg(name: str) -> Config:
    return Config.fromfile(mmdet_trainer.resolve_config(name))


@pytest.mark.parametrize(
    "name",
    ["mask_rcnn_C4_1x", "mask_rcnn_C4_2x", "faster_rcnn_C4_voc0712", "mask_rcnn_C4_instant_test"],
)
def test_configs_match_protocol(name):
    cfg = _cfg(name)
    bb, head = cfg.model.backbone, cfg.model.roi_head.shared_head
    assert (bb.type, bb.depth, bb.num_stages, bb.out_indices) == ("ResNet", 50, 3, (2,))
    for part in (bb, head):
        assert part.norm_cfg == {"type": "SyncBN", "requires_grad": True}
        assert part.style == "pytorch" and part.norm_eval is False
        assert part.init_cfg.type == "Pretrained"
    assert bb.frozen_stages == -1
    assert bb.init_cfg.prefix == "backbone." and head.init_cfg.prefix == "roi_head.shared_head."
    assert head.type == "ResLayerExtraNorm" and head.stage == 3
    pre = cfg.model.data_preprocessor
    assert pre.mean == [123.675, 116.28, 103.53] and pre.std == [58.395, 57.12, 57.375]
    assert pre.bgr_to_rgb is True
    assert cfg.optim_wrapper.paramwise_cfg.norm_decay_mult == 0.0
    assert cfg.train_dataloader.batch_size * 8 == cfg.auto_scale_lr.base_batch_size == 16
    warmup, steps = cfg.param_scheduler
    assert warmup.type == "LinearLR" and warmup.end > 0 and steps.type == "MultiStepLR"
    if name.startswith("mask_rcnn_C4_") and "instant" not in name:
        pipeline = cfg.train_dataloader.dataset.pipeline
        resize = next(t for t in pipeline if t.type == "RandomChoiceResize")
        assert resize.scales == [(1333, s) for s in range(640, 801, 32)]
        assert cfg.optim_wrapper.optimizer.lr == 0.1
        assert cfg.val_evaluator.metric == ["bbox", "segm"]
        assert cfg.model.type == "MaskRCNN" and cfg.model.roi_head.mask_head.num_classes == 80
    if name == "mask_rcnn_C4_1x":
        assert (cfg.train_cfg.max_iters, steps.milestones) == (90000, [60000, 80000])
    if name == "mask_rcnn_C4_2x":
        assert (cfg.train_cfg.max_iters, steps.milestones) == (180000, [120000, 160000])
    if name.startswith("faster"):
        assert cfg.model.type == "FasterRCNN" and cfg.model.roi_head.mask_head is None
        assert cfg.model.roi_head.bbox_head.num_classes == 20
        assert cfg.train_cfg.max_iters == 24000 and cfg.val_evaluator.type == "VOCMetric"


@pytest.mark.parametrize("name", ["faster_rcnn_C4_voc0712", "mask_rcnn_C4_instant_test"])
def test_configs_build(name):
    cfg = _cfg(name)
    single_process_norm(cfg)
    init_default_scope("mmdet")
    model = MODELS.build(cfg.model)
    assert type(model.roi_head.shared_head).__name__ == "_ResLayerExtraNorm"
    assert model.roi_head.with_mask == name.startswith("mask")


def test_metrics_to_results_percent_and_missing_sizes():
    coco = {"coco/bbox_mAP": 0.393, "coco/bbox_mAP_50": 0.591, "coco/bbox_mAP_l": -1.0}
    coco.update({"coco/segm_mAP_75": 0.366, "coco/bbox_mAP_copypaste": "0.393 ..."})
    res = mmdet_trainer.metrics_to_results(coco)
    assert res["bbox"]["AP"] == pytest.approx(39.3) and res["bbox"]["APl"] is None
    assert res["segm"] == {"AP75": pytest.approx(36.6)}
    voc = {"pascal_voc/mAP": 0.5, "pascal_voc/AP50": 0.8, "pascal_voc/AP75": 0.55}
    voc["pascal_voc/AP55"] = 0.7
    assert mmdet_trainer.metrics_to_results(voc) == {
        "bbox": {"AP": 50.0, "AP50": 80.0, "AP75": pytest.approx(55.0)}
    }


def test_single_process_norm_and_pretrained_paths():
    cfg = _cfg("mask_rcnn_C4_1x")
    assert single_process_norm(cfg) == [
        "model.backbone.norm_cfg",
        "model.roi_head.shared_head.norm_cfg",
    ]
    assert cfg.model.backbone.norm_cfg.type == "BN"
    assert set_pretrained_checkpoint(cfg, "w.pth") == [
        "model.backbone.init_cfg",
        "model.roi_head.shared_head.init_cfg",
    ]


def test_extra_norm_head():
    head = ResLayerExtraNorm(
        depth=50, norm_cfg=dict(type="BN", requires_grad=True), norm_eval=False
    )
    assert head.norm.num_features == 2048
    head.train()
    x = torch.rand(2, 1024, 6, 6)
    out = head(x)
    assert out.shape == (2, 2048, 3, 3)
    # Train-mode BN over the batch: each channel has ~zero mean after the extra norm.
    assert out.mean(dim=(0, 2, 3)).abs().max() < 1e-4
    assert head.norm.training  # norm_eval False keeps the norms in train mode


def test_loading_check_every_tensor_exact(converted):
    """Build Mask R-CNN C4 from the 1x config and run init_weights: backbone + shared head land."""
    sd, path = converted
    cfg = _cfg("mask_rcnn_C4_1x")
    single_process_norm(cfg)
    set_pretrained_checkpoint(cfg, path)
    init_default_scope("mmdet")
    model = MODELS.build(cfg.model)
    model.init_weights()
    model_sd = model.state_dict()
    file_sd = torch.load(path, weights_only=True)["state_dict"]
    assert not set(file_sd) - set(model_sd), "converted names the model does not have"
    n_checked = 0
    for tv_key, value in sd.items():
        if tv_key.startswith("fc."):
            continue
        prefix = "roi_head.shared_head." if tv_key.startswith("layer4") else "backbone."
        torch.testing.assert_close(model_sd[prefix + tv_key], value, rtol=0, atol=0)
        n_checked += 1
    assert n_checked == len(file_sd) == 318
    missing = sorted(set(model_sd) - set(file_sd))
    assert all(k.startswith(HEAD_PREFIXES) for k in missing), missing
    for prefix in HEAD_PREFIXES:
        assert any(k.startswith(prefix) for k in missing), prefix
    counters = [k for k in missing if k.endswith("num_batches_tracked")]
    print(
        f"\nloading check: {n_checked} tensors loaded ({n_checked - 53} weights and statistics "
        f"+ 53 counters); not in the file (untrained heads): {len(missing) - len(counters)} "
        f"tensors + {len(counters)} counter"
    )


# ------------------------------------------------------------------------------------------
# Refusals: no weights, wrong arch, malicious files.
# ------------------------------------------------------------------------------------------


def _args(*argv: str):
    return mmdet_train.build_parser().parse_args(list(argv))


def test_refuses_without_weights_and_bad_resume(tmp_path):
    with pytest.raises(mmdet_trainer.MMDetTrainError, match="no pretrained weights"):
        mmdet_trainer.setup(_args("mask_rcnn_C4_instant_test", "--work-dir", str(tmp_path)))
    with pytest.raises(mmdet_trainer.MMDetTrainError, match="no checkpoint to resume"):
        mmdet_trainer.setup(
            _args("mask_rcnn_C4_instant_test", "--work-dir", str(tmp_path), "--resume")
        )
    cfg = mmdet_trainer.setup(
        _args("mask_rcnn_C4_instant_test", "--work-dir", str(tmp_path), "--no-weights")
    )
    assert cfg.model.backbone.init_cfg is None and cfg.model.roi_head.shared_head.init_cfg is None
    with pytest.raises(mmdet_trainer.MMDetTrainError, match="nope.py"):
        mmdet_trainer.resolve_config("nope.py")


def test_refuses_mismatched_arch(tmp_path, capsys):
    _, r18, _ = _convert(tmp_path, "resnet18")
    with pytest.raises(MMDetWeightsError, match=r"resnet18 \(depth 18\).*ResNet-50"):
        mmdet_trainer.setup(_args("mask_rcnn_C4_instant_test", "--weights", r18))
    # The same file without its metadata: the block counts give it away.
    data = torch.load(r18, weights_only=True)
    bare = str(tmp_path / "bare.pth")
    torch.save(data["state_dict"], bare)
    with pytest.raises(MMDetWeightsError, match="ResNet-18 .block counts."):
        mmdet_trainer.setup(_args("mask_rcnn_C4_instant_test", "--weights", bare))
    # Also through --cfg-options instead of --weights, and as a command-line error.
    opt = f"model.backbone.init_cfg.checkpoint={r18}"
    with pytest.raises(
        mmdet_trainer.MMDetTrainError, match="shared_head.init_cfg has no checkpoint"
    ):
        mmdet_trainer.setup(_args("mask_rcnn_C4_instant_test", "--cfg-options", opt))
    opt2 = f"model.roi_head.shared_head.init_cfg.checkpoint={r18}"
    with pytest.raises(MMDetWeightsError, match="ResNet-50"):
        mmdet_trainer.setup(_args("mask_rcnn_C4_instant_test", "--cfg-options", opt, opt2))
    assert mmdet_train.cli(["mask_rcnn_C4_instant_test", "--weights", r18]) == 2
    assert "depth 18" in capsys.readouterr().err


@pytest.mark.parametrize(
    "key, value",
    [
        ("backbone.conv1.weight", float("nan")),
        ("backbone.layer2.0.conv2.weight", float("inf")),
        ("backbone.bn1.running_var", -1.0),
        ("roi_head.shared_head.layer4.0.bn1.running_var", 0.0),
    ],
)
def test_refuses_non_finite_weights_naming_the_tensor(tmp_path, converted, key, value):
    _, good = converted
    data = torch.load(good, weights_only=True)
    data["state_dict"][key].view(-1)[0] = value
    bad = str(tmp_path / "bad.pth")
    torch.save(data, bad)
    with pytest.raises(MMDetWeightsError) as e:
        mmdet_trainer.setup(_args("mask_rcnn_C4_instant_test", "--weights", bad))
    assert key in str(e.value) and "bad.pth" in str(e.value)


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


def test_refuses_malicious_files(tmp_path, converted):
    if os.path.exists(MARKER):
        os.unlink(MARKER)
    _, good = converted
    data = torch.load(good, weights_only=True)
    data["meta"]["note"] = _Payload()
    evil = str(tmp_path / "evil.pth")
    torch.save(data, evil)
    with pytest.raises(MMDetWeightsError, match="refused by the safe loader"):
        mmdet_trainer.setup(_args("mask_rcnn_C4_instant_test", "--weights", evil))
    with pytest.raises(MMDetWeightsError, match="refused by the safe loader"):
        mmdet_trainer.setup(_args("mask_rcnn_C4_instant_test", "--eval-only", "--weights", evil))
    pkl = str(tmp_path / "weights.pkl")
    with open(pkl, "wb") as f:
        f.write(b"anything")
    with pytest.raises(MMDetWeightsError, match="pickle files are not read"):
        mmdet_trainer.setup(_args("mask_rcnn_C4_instant_test", "--weights", pkl))
    assert not os.path.exists(MARKER)
    # A converted backbone has no detection heads: nothing to evaluate.
    with pytest.raises(MMDetWeightsError, match="no detection heads"):
        mmdet_trainer.setup(_args("mask_rcnn_C4_instant_test", "--eval-only", "--weights", good))


# ------------------------------------------------------------------------------------------
# Tiny COCO-layout dataset with the 80 official categories: a few 64x80 images with rectangles
# (polygon masks, "person") and ellipses (RLE masks, "car").
# ------------------------------------------------------------------------------------------


def _make_tiny_coco(root: str, n_images: int = 4) -> None:
    classes = CocoDataset.METAINFO["classes"]
    assert len(classes) == len(COCO_IDS) == 80
    categories = [dict(id=i, name=n) for i, n in zip(COCO_IDS, classes)]
    names = [f"{i + 1:012d}.png" for i in range(n_images)]
    ann = os.path.join(root, "annotations", "instances_val2017.json")
    write_tiny_coco(os.path.join(root, "val2017"), ann, names, categories)


@pytest.fixture(scope="module")
def tiny_coco(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("coco"))
    _make_tiny_coco(root)
    return root + "/"


def _data_options(root: str) -> list:
    ann = root + "annotations/instances_val2017.json"
    return [
        f"train_dataloader.dataset.data_root={root}",
        f"val_dataloader.dataset.data_root={root}",
        f"test_dataloader.dataset.data_root={root}",
        f"val_evaluator.ann_file={ann}",
        f"test_evaluator.ann_file={ann}",
        "randomness.seed=1",
    ]


def _check_results(results):
    for task in ("bbox", "segm"):
        assert {"AP", "AP50", "AP75"} <= set(results[task]), results
        for metric in ("AP", "AP50", "AP75"):
            assert 0.0 <= results[task][metric] <= 100.0, results[task]


def _train_iters(work_dir: str) -> list:
    """Iterations logged with a training loss in the work dir, in logging order.

    Runs in one process share mmengine's visualizer, so a resumed run may append to the first
    run's scalars.json: collect all files, oldest first.
    """
    iters = []
    for path in sorted(glob.glob(os.path.join(work_dir, "*", "vis_data", "scalars.json"))):
        with open(path) as f:
            iters += [json.loads(line)["iter"] for line in f if '"loss"' in line]
    return iters


@pytest.mark.slow
def test_instant_train_eval_resume(converted, tiny_coco, tmp_path, capsys):
    """convert -> train (instant config) -> CocoMetric bbox + segm -> resume -> eval-only."""
    _, weights = converted
    work = str(tmp_path / "work")
    opts = _data_options(tiny_coco)
    wall, cpu = time.perf_counter(), time.process_time()
    results = mmdet_trainer.main(
        _args("mask_rcnn_C4_instant_test", "--work-dir", work, "--weights", weights,
              "--cfg-options", *opts)
    )  # fmt: skip
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    _check_results(results)
    printed = capsys.readouterr().out
    assert "MMDetection evaluation (results.json)" in printed
    with open(os.path.join(work, "results.json")) as f:
        saved = json.load(f)
    assert saved["results"]["bbox"]["AP"] == results["bbox"]["AP"]
    assert saved["weights"] == weights
    assert os.path.isfile(os.path.join(work, "iter_4.pth"))
    with open(os.path.join(work, "last_checkpoint")) as f:
        assert f.read().strip().endswith("iter_4.pth")
    assert _train_iters(work) == [1, 2, 3, 4]
    with capsys.disabled():
        print(
            f"\ninstant test (4 iters + eval): wall {wall:.1f} s, CPU {cpu:.1f} s; "
            f"bbox AP {results['bbox']['AP']:.2f}, segm AP {results['segm']['AP']:.2f}"
        )

    # Resume: continues after iteration 4 from iter_4.pth, trains to 6.
    results = mmdet_trainer.main(
        _args("mask_rcnn_C4_instant_test", "--work-dir", work, "--weights", weights, "--resume",
              "--cfg-options", *opts, "train_cfg.max_iters=6", "train_cfg.val_interval=6")
    )  # fmt: skip
    _check_results(results)
    # Training went on at iteration 5; a restart from scratch would log iterations 1-4 again.
    assert _train_iters(work) == [1, 2, 3, 4, 5, 6]

    # Eval-only on the trained detector.
    final = os.path.join(work, "iter_6.pth")
    results = mmdet_trainer.main(
        _args("mask_rcnn_C4_instant_test", "--work-dir", str(tmp_path / "eval"), "--eval-only",
              "--weights", final, "--cfg-options", *opts)
    )  # fmt: skip
    _check_results(results)
    assert os.path.isfile(os.path.join(tmp_path, "eval", "results.json"))

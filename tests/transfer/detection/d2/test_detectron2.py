"""Detectron2 transfer: loading check, instant training + evaluation + resume on CPU (skipped
when Detectron2 is not installed; tools/install_detectron2.py installs it)."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torchvision
from helpers import REPO, export_and_convert, load_tool, write_tiny_coco

pytest.importorskip("detectron2")
pytestmark = pytest.mark.detectron2

from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.data import DatasetCatalog  # noqa: E402
from detectron2.data.datasets import register_coco_instances  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from pycocotools import mask as mask_util  # noqa: E402

from transfer.detection.d2 import train as d2_train  # noqa: E402
from transfer.detection.d2 import trainer as d2_trainer  # noqa: E402
from transfer.detection.d2.ext import single_process_norm  # noqa: E402
from transfer.detection.d2.weights import (  # noqa: E402
    D2ConversionError,
    convert_torchvision_to_d2,
    read_d2_pickle,
    torchvision_key_to_d2,
    write_d2_pickle,
)

# The only parameters a converted backbone cannot provide: the untrained heads.
HEAD_PREFIXES = (
    "proposal_generator.rpn_head.",
    "roi_heads.box_predictor.",
    "roi_heads.mask_head.",
    "roi_heads.res5.norm.",  # the extra norm after res5 (Res5ROIHeadsExtraNorm)
)


class _Evil:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """This project's exported ResNet-50 backbone, converted by tools/convert_to_d2.py."""
    sd, path, summary = export_and_convert(tmp_path_factory.mktemp("w"), "convert_to_d2", "r50.pkl")
    print("\n" + summary)
    return sd, read_d2_pickle(path)["model"], summary, path


def _cfg_from(name: str, *opts: str):
    cfg = get_cfg()
    cfg.merge_from_file(d2_trainer.resolve_config(name))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", *opts])
    single_process_norm(cfg)
    return cfg


def test_resolve_config_names_and_paths():
    path = d2_trainer.resolve_config("mask_rcnn_C4_1x.yaml")
    assert path.endswith(os.path.join("transfer", "configs", "mask_rcnn_C4_1x.yaml"))
    assert d2_trainer.resolve_config("mask_rcnn_C4_1x") == path
    assert d2_trainer.resolve_config(path) == path
    with pytest.raises(d2_trainer.TrainNetError, match="nope.yaml"):
        d2_trainer.resolve_config("nope.yaml")


@pytest.mark.parametrize(
    "name",
    ["mask_rcnn_C4_1x.yaml", "mask_rcnn_C4_2x.yaml", "faster_rcnn_C4_voc0712.yaml"],
)
def test_configs_match_protocol(name):
    cfg = get_cfg()
    cfg.merge_from_file(d2_trainer.resolve_config(name))
    assert cfg.MODEL.RESNETS.NORM == "SyncBN"
    assert cfg.MODEL.RESNETS.STRIDE_IN_1X1 is False
    assert cfg.MODEL.BACKBONE.FREEZE_AT == 0
    assert cfg.MODEL.ROI_HEADS.NAME == "Res5ROIHeadsExtraNorm"
    assert cfg.TEST.PRECISE_BN.ENABLED
    assert cfg.INPUT.FORMAT == "RGB"
    assert cfg.MODEL.PIXEL_MEAN == [123.675, 116.28, 103.53]
    assert cfg.MODEL.PIXEL_STD == [58.395, 57.12, 57.375]
    assert cfg.SOLVER.IMS_PER_BATCH == 16
    assert cfg.SOLVER.WARMUP_ITERS > 0
    if name.startswith("mask"):
        assert cfg.MODEL.MASK_ON and cfg.SOLVER.BASE_LR == 0.1
        assert cfg.DATASETS.TRAIN == ("coco_2017_train",)
    if name == "mask_rcnn_C4_1x.yaml":
        assert (cfg.SOLVER.MAX_ITER, cfg.SOLVER.STEPS) == (90000, (60000, 80000))
    if name == "mask_rcnn_C4_2x.yaml":
        assert (cfg.SOLVER.MAX_ITER, cfg.SOLVER.STEPS) == (180000, (120000, 160000))
    if name.startswith("faster"):
        assert not cfg.MODEL.MASK_ON and cfg.MODEL.ROI_HEADS.NUM_CLASSES == 20


def test_single_process_norm_replaces_syncbn():
    cfg = get_cfg()
    cfg.merge_from_file(d2_trainer.resolve_config("mask_rcnn_C4_1x.yaml"))
    assert single_process_norm(cfg) == ["MODEL.RESNETS.NORM"]
    assert cfg.MODEL.RESNETS.NORM == "BN"


def test_loading_check_only_heads_missing(converted):
    """Build Mask R-CNN C4 from the 1x config and load the pkl: only untrained heads are left."""
    sd, blobs, _, path = converted
    model = build_model(_cfg_from("mask_rcnn_C4_1x.yaml"))
    checkpointer = DetectionCheckpointer(model)
    incompatible = checkpointer._load_model(checkpointer._load_file(path))
    missing = [k for k in incompatible.missing_keys if not k.endswith("num_batches_tracked")]
    assert missing, "the heads must be missing"
    assert all(k.startswith(HEAD_PREFIXES) for k in missing), missing
    for prefix in HEAD_PREFIXES:
        assert any(k.startswith(prefix) for k in missing), prefix
    assert incompatible.unexpected_keys == []
    assert incompatible.incorrect_shapes == []

    # Every converted tensor landed, with the source values: res5 in the ROI head (C4).
    model_sd = model.state_dict()
    assert "roi_heads.res5.0.conv1.weight" in model_sd
    assert not any(k.startswith("backbone.res5") for k in model_sd)
    n_checked = 0
    for tv_key, value in sd.items():
        if tv_key.startswith("fc.") or tv_key.endswith("num_batches_tracked"):
            continue
        d2_key = next(k for k in model_sd if k.endswith("." + torchvision_key_to_d2(tv_key)))
        assert d2_key.startswith(("backbone.", "roi_heads.res5.")), d2_key
        torch.testing.assert_close(model_sd[d2_key], value, rtol=0, atol=0)
        n_checked += 1
    assert n_checked == len(blobs) == 265
    print(f"\nloading check: {n_checked} tensors loaded, missing (untrained heads): {len(missing)}")


def test_safe_checkpointer_refuses_code_and_a_partial_fit(converted, tmp_path):
    """MODEL.WEIGHTS that would run code, or leave backbone tensors unloaded, is an error."""
    model = build_model(_cfg_from("mask_rcnn_C4_1x.yaml"))
    checkpointer = d2_trainer.SafeCheckpointer(model)
    marker, evil = tmp_path / "pwned", str(tmp_path / "evil.pkl")
    with open(evil, "wb") as f:
        pickle.dump({"model": {"stem.conv1.weight": _Evil(marker)}, "__author__": "x"}, f)
    with pytest.raises(D2ConversionError, match="system"):
        checkpointer.load(evil)
    assert not marker.exists()
    # A ResNet-18 converted without arch metadata (older tool): shapes fit only by luck.
    blobs, _ = convert_torchvision_to_d2(torchvision.models.resnet18().state_dict())
    r18 = str(tmp_path / "r18.pkl")
    write_d2_pickle(blobs, r18)
    plain = DetectionCheckpointer(model)
    loose = plain._load_model(plain._load_file(r18))  # Detectron2 itself only logs this
    n_trunk = sum(
        1
        for k in loose.missing_keys
        if ".res" in k and "res5.norm" not in k and "num_batches" not in k
    )
    with pytest.raises(D2ConversionError, match="backbone keys not loaded") as e:
        checkpointer.load(r18)
    assert f"({n_trunk})" in str(e.value) and "r18.pkl" in str(e.value)
    print(f"\nResNet-18 weights in R50-C4: {n_trunk} backbone tensors would stay random")
    checkpointer.load(converted[3])  # the matching ResNet-50 loads (only heads missing)


@pytest.mark.parametrize(
    "key, value",
    [
        ("stem.conv1.weight", float("nan")),
        ("res3.0.conv2.weight", float("inf")),
        ("res2.0.conv1.norm.running_var", -1.0),
        ("res4.1.conv1.norm.running_var", 0.0),
        ("res5.0.conv1.norm.running_mean", float("nan")),
    ],
)
def test_non_finite_weights_are_refused_naming_the_tensor(converted, tmp_path, key, value):
    blobs = {k: np.array(v, copy=True) for k, v in converted[1].items()}
    blobs[key].reshape(-1)[0] = value
    path = str(tmp_path / "bad.pkl")
    write_d2_pickle(blobs, path)
    model = build_model(_cfg_from("mask_rcnn_C4_1x.yaml"))
    with pytest.raises(D2ConversionError) as e:
        d2_trainer.SafeCheckpointer(model).load(path)
    assert key in str(e.value) and "bad.pkl" in str(e.value)


def test_startup_refuses_another_depth_and_prints_what_it_read(converted, tmp_path, capsys):
    src, r18 = str(tmp_path / "r18.pth"), str(tmp_path / "r18.pkl")
    torch.save(torchvision.models.resnet18().state_dict(), src)
    load_tool("convert_to_d2").convert(src, r18)
    argv = ["--config", "mask_rcnn_C4_instant_test.yaml", "OUTPUT_DIR", str(tmp_path / "o")]
    args = d2_train.build_parser().parse_args(argv + ["MODEL.WEIGHTS", r18])
    with pytest.raises(d2_trainer.TrainNetError, match="resnet18 backbone.*DEPTH 50"):
        d2_trainer.setup(args)
    cfg = _cfg_from("mask_rcnn_C4_instant_test.yaml", "MODEL.WEIGHTS", converted[3])
    label = d2_trainer.check_weights(cfg)
    assert "converted by IMSVD (arch resnet50, stem standard, from imsvd-backbone)" in label
    assert label in capsys.readouterr().out


def test_eval_only_with_a_code_carrying_pickle_runs_nothing(tmp_path, capsys):
    marker, evil = tmp_path / "pwned", str(tmp_path / "evil.pkl")
    with open(evil, "wb") as f:
        pickle.dump({"model": {}, "__author__": _Evil(marker)}, f)
    argv = ["--config", "mask_rcnn_C4_instant_test.yaml", "--eval-only", "MODEL.WEIGHTS", evil,
            "OUTPUT_DIR", str(tmp_path / "out"), "MODEL.DEVICE", "cpu"]  # fmt: skip
    assert d2_train.cli(argv) == 2
    err = capsys.readouterr().err
    assert f"{os.system.__module__}.system" in err and "--allow-unsafe" in err
    assert not marker.exists()


# ------------------------------- training: a tiny COCO-format dataset, a few 64x80 images with
# rectangles (polygon masks) and ellipses (RLE masks, one compressed and one uncompressed), two
# categories with non-contiguous ids


def _make_tiny_coco(root: str, n_images: int = 4) -> str:
    names = [f"img{i}.png" for i in range(n_images)]
    categories = [dict(id=1, name="box"), dict(id=3, name="blob")]
    ann = os.path.join(root, "annotations.json")
    return write_tiny_coco(os.path.join(root, "images"), ann, names, categories, True)


@pytest.fixture(scope="module")
def tiny_coco(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("tiny_coco"))
    ann = _make_tiny_coco(root)
    name = "imsvd_tiny_coco"
    if name not in DatasetCatalog.list():
        register_coco_instances(name, {}, ann, os.path.join(root, "images"))
    records = DatasetCatalog.get(name)
    assert len(records) == 4 and all(len(r["annotations"]) == 2 for r in records)
    return name


def _instant_args(weights: str, out: str, dataset: str, *extra: str, resume=False, eval_only=False):
    argv = ["--config", "mask_rcnn_C4_instant_test.yaml"]
    argv += ["--resume"] if resume else []
    argv += ["--eval-only"] if eval_only else []
    argv += [
        "MODEL.WEIGHTS", weights, "OUTPUT_DIR", out, "MODEL.DEVICE", "cpu",
        "DATASETS.TRAIN", f"('{dataset}',)", "DATASETS.TEST", f"('{dataset}',)",
        "MODEL.ROI_HEADS.NUM_CLASSES", "2", "SEED", "1",
        # Object masks given as RLE (not only polygons) need bitmask format in training.
        "INPUT.MASK_FORMAT", "bitmask", *extra,
    ]  # fmt: skip
    return d2_train.build_parser().parse_args(argv)


def _check_results(results, dataset):
    # Detectron2 returns {task: metrics} directly when there is a single test dataset.
    res = results.get(dataset, results)
    for task in ("bbox", "segm"):
        assert {"AP", "AP50", "AP75"} <= set(res[task]), res[task]
        for metric in ("AP", "AP50", "AP75"):  # APm/APl are NaN: there are no large objects
            assert 0.0 <= res[task][metric] <= 100.0, res[task]
    return res


def _train_iters(out: str) -> list:
    """Iterations logged with a training loss in OUTPUT_DIR/metrics.json."""
    with open(os.path.join(out, "metrics.json")) as f:
        rows = [json.loads(line) for line in f]
    return [r["iteration"] for r in rows if "total_loss" in r]


@pytest.mark.slow
def test_instant_train_eval_resume(converted, tiny_coco, tmp_path):
    """convert -> train (instant config) -> COCO eval (bbox+segm) -> resume -> eval-only."""
    _, _, _, weights = converted
    out = str(tmp_path / "out")
    wall, cpu = time.perf_counter(), time.process_time()
    results = d2_trainer.main(_instant_args(weights, out, tiny_coco))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    res = _check_results(results, tiny_coco)
    print(f"\ninstant test (4 iters + precise BN + eval): wall {wall:.1f} s, CPU {cpu:.1f} s")
    print("bbox AP %.2f  segm AP %.2f" % (res["bbox"]["AP"], res["segm"]["AP"]))
    assert os.path.isfile(os.path.join(out, "model_final.pth"))
    assert os.path.isfile(os.path.join(out, "config.yaml"))
    with open(os.path.join(out, "results.json")) as f:
        saved = json.load(f)["results"][tiny_coco]
    assert saved["bbox"]["AP"] == res["bbox"]["AP"] and saved["segm"]["APl"] is None
    with open(os.path.join(out, "last_checkpoint")) as f:
        assert f.read().strip() == "model_final.pth"
    first_run = _train_iters(out)
    assert first_run and max(first_run) == 3

    # Resume: continues at iteration 4 from model_final.pth, trains to 6.
    results = d2_trainer.main(
        _instant_args(weights, out, tiny_coco, "SOLVER.MAX_ITER", "6", resume=True)
    )
    _check_results(results, tiny_coco)
    resumed = _train_iters(out)[len(first_run) :]
    # Training went on from iteration 4 (a restart from scratch would log iterations < 4 again).
    assert resumed and min(resumed) >= 4 and max(resumed) == 5, resumed

    # Eval-only on the trained model.
    final = os.path.join(out, "model_final.pth")
    results = d2_trainer.main(
        _instant_args(final, str(tmp_path / "eval"), tiny_coco, eval_only=True)
    )
    _check_results(results, tiny_coco)


def test_eval_only_with_a_converted_backbone_names_the_missing_heads(
    converted, tiny_coco, tmp_path
):
    """A backbone without detector heads would score random heads (AP ~ 0): refused."""
    weights = converted[3]
    args = _instant_args(weights, str(tmp_path / "eval"), tiny_coco, eval_only=True)
    with pytest.raises(D2ConversionError) as e:
        d2_trainer.main(args)
    for part in ("proposal_generator.rpn_head", "roi_heads.box_predictor", "roi_heads.mask_head"):
        assert part in str(e.value)
    assert weights in str(e.value) and "fine-tune first" in str(e.value)
    # the command line: one error line, exit 2, no evaluation written
    assert d2_trainer.run(args) == 2
    assert not os.path.exists(os.path.join(str(tmp_path / "eval"), "results.json"))


def test_missing_weights_is_a_clear_error(tmp_path):
    args = d2_train.build_parser().parse_args(
        ["--config", "mask_rcnn_C4_instant_test.yaml", "MODEL.WEIGHTS", str(tmp_path / "x.pkl"),
         "OUTPUT_DIR", str(tmp_path)]
    )  # fmt: skip
    with pytest.raises(d2_trainer.TrainNetError, match="x.pkl"):
        d2_trainer.setup(args)
    for folder in (tmp_path, tmp_path / "w.pkl"):  # a directory is not "missing"
        folder.mkdir(exist_ok=True)
        args = d2_train.build_parser().parse_args(
            ["--config", "mask_rcnn_C4_instant_test.yaml", "MODEL.WEIGHTS", str(folder),
             "OUTPUT_DIR", str(tmp_path / "o")]
        )  # fmt: skip
        with pytest.raises(d2_trainer.TrainNetError, match="is a directory"):
            d2_trainer.setup(args)
    args = d2_train.build_parser().parse_args(
        ["--config", "mask_rcnn_C4_instant_test.yaml", "OUTPUT_DIR", str(tmp_path)]
    )
    with pytest.raises(d2_trainer.TrainNetError, match="MODEL.WEIGHTS is empty"):
        d2_trainer.setup(args)
    # --resume without a checkpoint to resume from is no excuse for random weights either.
    args = d2_train.build_parser().parse_args(
        ["--config", "mask_rcnn_C4_instant_test.yaml", "--resume", "OUTPUT_DIR", str(tmp_path)]
    )
    with pytest.raises(d2_trainer.TrainNetError, match="last_checkpoint"):
        d2_trainer.setup(args)


def test_cli_bad_config_and_help():
    script = str(REPO / "transfer" / "train_net.py")
    proc = subprocess.run(
        [sys.executable, script, "--config", "nope.yaml"], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "config 'nope.yaml' not found" in proc.stderr


def test_evaluator_scores_ground_truth_as_perfect(tiny_coco, tmp_path):
    """The evaluator train_net builds (official COCO API without the C++ ops) gives AP 100 on GT."""
    from detectron2.structures import BitMasks, Boxes, BoxMode, Instances

    cfg = _cfg_from("mask_rcnn_C4_instant_test.yaml", "OUTPUT_DIR", str(tmp_path))
    evaluator = d2_trainer.Trainer.build_evaluator(cfg, tiny_coco)
    evaluator.reset()
    for record in DatasetCatalog.get(tiny_coco):
        h, w = record["height"], record["width"]
        anns = record["annotations"]
        inst = Instances((h, w))
        boxes = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in anns]
        inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
        inst.scores = torch.ones(len(anns))
        inst.pred_classes = torch.tensor([a["category_id"] for a in anns])
        masks = []
        for a in anns:
            segm = a["segmentation"]
            if isinstance(segm, list):
                rle = mask_util.merge(mask_util.frPyObjects(segm, h, w))
            elif isinstance(segm["counts"], list):
                rle = mask_util.frPyObjects(segm, h, w)
            else:
                rle = segm
            masks.append(torch.from_numpy(mask_util.decode(rle).astype(bool)))
        inst.pred_masks = BitMasks(torch.stack(masks)).tensor
        evaluator.process([{"image_id": record["image_id"]}], [{"instances": inst}])
    res = evaluator.evaluate()
    assert res["bbox"]["AP"] == pytest.approx(100.0)
    assert res["segm"]["AP"] == pytest.approx(100.0)

"""train_net.py with one's own COCO-format data (--train-json/--train-images/--test-json/...).

Skipped when Detectron2 is not installed.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torchvision
from helpers import load_tool
from PIL import Image

pytest.importorskip("detectron2")
pytestmark = pytest.mark.detectron2

from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402

from pretrain.checkpoint import export_backbone  # noqa: E402
from transfer.detection.d2 import train as d2_train  # noqa: E402
from transfer.detection.d2 import trainer as d2_trainer  # noqa: E402

# three of the 80 official COCO categories, with their official ids
CATEGORIES = [
    {"id": 1, "name": "person", "supercategory": "person"},
    {"id": 3, "name": "car", "supercategory": "vehicle"},
    {"id": 18, "name": "dog", "supercategory": "animal"},
]


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> str:
    """A random ResNet-50 exported by this project and converted by tools/convert_to_d2.py."""
    torch.manual_seed(0)
    sd = {k: v for k, v in torchvision.models.resnet50().state_dict().items() if "fc." not in k}
    folder = tmp_path_factory.mktemp("w")
    exported, path = str(folder / "backbone.pth"), str(folder / "r50.pkl")
    export_backbone(exported, sd, arch="resnet50", stem="standard", epoch=1, config=None)
    load_tool("convert_to_d2").convert(exported, path)
    return path


def _write_coco(root, name, image_ids, categories=CATEGORIES, masks=True) -> str:
    """Images with coloured rectangles (polygon masks) of the given categories; returns json."""
    rng = np.random.default_rng(sum(image_ids))
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    images, anns = [], []
    h, w = 64, 80
    for i in image_ids:
        img = rng.integers(0, 50, size=(h, w, 3), dtype=np.uint8)
        for k, cat in enumerate(categories[:2] if i % 2 else categories[1:]):
            x0, y0 = int(rng.integers(2, 40)), int(rng.integers(2, 30))
            bw, bh = int(rng.integers(12, 36)), int(rng.integers(10, 30))
            bw, bh = min(bw, w - x0 - 1), min(bh, h - y0 - 1)
            img[y0 : y0 + bh, x0 : x0 + bw] = (200, 60 * (k + 1), 40)
            ann = {
                "id": len(anns) + 1,
                "image_id": i,
                "category_id": cat["id"],
                "bbox": [x0, y0, bw, bh],
                "area": float(bw * bh),
                "iscrowd": 0,
            }
            if masks:
                poly = [x0, y0, x0 + bw, y0, x0 + bw, y0 + bh, x0, y0 + bh]
                ann["segmentation"] = [[float(v) for v in poly]]
            anns.append(ann)
        file_name = f"img{i}.png"
        Image.fromarray(img).save(os.path.join(root, "images", file_name))
        images.append({"id": i, "file_name": file_name, "height": h, "width": w})
    path = os.path.join(root, f"{name}.json")
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": anns, "categories": categories}, f)
    return path


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("coco"))
    train = _write_coco(root, "train", [1, 2, 3, 4])
    test = _write_coco(root, "val", [5, 6])
    return root, train, test


def _args(weights, out, *flags, opts=(), eval_only=False):
    argv = ["--config", "mask_rcnn_C4_instant_test.yaml", *flags]
    argv += ["--eval-only"] if eval_only else []
    argv += ["MODEL.WEIGHTS", weights, "OUTPUT_DIR", str(out), "MODEL.DEVICE", "cpu", *opts]
    return d2_train.build_parser().parse_args(argv)


def _flags(coco, train=True, test=True):
    root, train_json, test_json = coco
    images = os.path.join(root, "images")
    flags = []
    flags += ["--train-json", train_json, "--train-images", images] if train else []
    flags += ["--test-json", test_json, "--test-images", images] if test else []
    return flags


def test_flags_register_the_data_and_replace_the_datasets(weights, coco, tmp_path):
    cfg = d2_trainer.setup(_args(weights, tmp_path / "o", *_flags(coco)))
    assert cfg.DATASETS.TRAIN == ("imsvd_coco_train",)
    assert cfg.DATASETS.TEST == ("imsvd_coco_test",)
    assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == 3  # follows the data (the config says 80)
    records = DatasetCatalog.get("imsvd_coco_train")
    assert len(records) == 4 and all(len(r["annotations"]) == 2 for r in records)
    assert records[0]["file_name"] == os.path.join(coco[0], "images", "img1.png")
    meta = MetadataCatalog.get("imsvd_coco_test")
    assert meta.json_file == coco[2] and meta.evaluator_type == "coco"
    DatasetCatalog.get("imsvd_coco_test")  # fills the class names in the metadata
    assert meta.thing_classes == ["person", "car", "dog"]
    # registering again (another run in the same process) replaces the earlier data
    other = _write_coco(str(tmp_path / "other"), "val", [7])
    args = _args(weights, tmp_path / "o2", "--test-json", other, "--test-images",
                 str(tmp_path / "other" / "images"), eval_only=True)  # fmt: skip
    cfg = d2_trainer.setup(args)
    assert cfg.DATASETS.TRAIN == ("coco_2017_val_100",)  # no --train-json: the config's
    assert len(DatasetCatalog.get("imsvd_coco_test")) == 1


def test_builtin_dataset_missing_names_path_and_flags(weights, tmp_path, monkeypatch, capsys):
    """The instant config's coco_2017_val_100 is not on this machine: a one-line error."""
    monkeypatch.chdir(tmp_path)  # Detectron2's default root ./datasets does not exist here
    code = d2_train.cli(
        ["--config", "mask_rcnn_C4_instant_test.yaml", "MODEL.WEIGHTS", weights,
         "OUTPUT_DIR", str(tmp_path / "o"), "MODEL.DEVICE", "cpu"]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2
    assert "'coco_2017_val_100'" in err and "instances_val2017_100.json" in err
    assert "DETECTRON2_DATASETS" in err and "--train-json" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c, tmp: ["--train-json", c[1]], "--train-json and --train-images"),
        (lambda c, tmp: ["--test-json", str(tmp / "no.json"), "--test-images", c[0]],
         "no.json' does not exist"),  # fmt: skip
        (lambda c, tmp: ["--test-json", c[2], "--test-images", str(tmp / "nodir")],
         "nodir' does not exist"),  # fmt: skip
    ],
)
def test_flag_errors(weights, coco, tmp_path, capsys, change, message):
    argv = ["--config", "mask_rcnn_C4_instant_test.yaml", *change(coco, tmp_path),
            "MODEL.WEIGHTS", weights, "OUTPUT_DIR", str(tmp_path / "o")]  # fmt: skip
    assert d2_train.cli(argv) == 2
    assert message in capsys.readouterr().err


def test_data_checks_name_the_file_and_the_fix(weights, coco, tmp_path):
    root = str(tmp_path)
    with pytest.raises(
        d2_trainer.TrainNetError,
        match=r"train.json has 3 categories .*is 2: pass MODEL.ROI_HEADS.NUM_CLASSES 3",
    ):
        d2_trainer.setup(_args(weights, tmp_path / "a", *_flags(coco),
                               opts=["MODEL.ROI_HEADS.NUM_CLASSES", "2"]))  # fmt: skip
    boxes = _write_coco(root, "boxes", [1, 2], masks=False)
    flags = ["--train-json", boxes, "--train-images", os.path.join(root, "images")]
    with pytest.raises(d2_trainer.TrainNetError, match="boxes.json: 4 annotations have no segm"):
        d2_trainer.setup(_args(weights, tmp_path / "b", *flags, *_flags(coco, train=False)))
    cfg = d2_trainer.setup(_args(weights, tmp_path / "c", *flags, *_flags(coco, train=False),
                                 opts=["MODEL.MASK_ON", "False"]))  # fmt: skip
    assert not cfg.MODEL.MASK_ON
    cats = [dict(c) for c in CATEGORIES]
    cats[2] = {"id": 19, "name": "horse", "supercategory": "animal"}
    horse = _write_coco(root, "horse", [8], categories=cats)
    flags = ["--test-json", horse, "--test-images", os.path.join(root, "images")]
    with pytest.raises(d2_trainer.TrainNetError, match=r"categories .* differ .*\[18\].*\[19\]"):
        d2_trainer.setup(_args(weights, tmp_path / "d", *_flags(coco, test=False), *flags))
    with open(tmp_path / "bad.json", "w") as f:
        json.dump({"images": []}, f)
    flags = ["--test-json", str(tmp_path / "bad.json"), "--test-images", root]
    with pytest.raises(d2_trainer.TrainNetError, match="bad.json is not a COCO instances json"):
        d2_trainer.setup(_args(weights, tmp_path / "e", *flags, eval_only=True))


@pytest.mark.slow
def test_instant_config_trains_and_evaluates_on_own_data(weights, coco, tmp_path):
    """The instant config, 2 iterations on CPU, on a tiny COCO json instead of coco_2017_val_100."""
    out = tmp_path / "out"
    opts = ["SOLVER.MAX_ITER", "2", "SOLVER.STEPS", "(1,)", "SOLVER.WARMUP_ITERS", "1"]
    results = d2_trainer.main(_args(weights, out, *_flags(coco), opts=opts))
    res = results.get("imsvd_coco_test", results)
    for task in ("bbox", "segm"):
        for metric in ("AP", "AP50", "AP75"):
            assert 0.0 <= res[task][metric] <= 100.0, res[task]
    with open(out / "results.json") as f:
        saved = json.load(f)["results"]
    assert set(saved) == {"imsvd_coco_test"}
    with open(out / "metrics.json") as f:
        iters = [json.loads(line)["iteration"] for line in f if "total_loss" in line]
    assert max(iters) == 1  # two iterations: 0 and 1
    assert (out / "model_final.pth").is_file()

#!/usr/bin/env python
"""Fine-tune a converted backbone with Detectron2 (Mask R-CNN / Faster R-CNN R50-C4).

Examples::

    python tools/convert_to_d2.py backbone.pth imsvd_r50.pkl
    python transfer/train_net.py --config mask_rcnn_C4_1x.yaml --num-gpus 8 \\
        MODEL.WEIGHTS imsvd_r50.pkl
    python transfer/train_net.py --config mask_rcnn_C4_1x.yaml --eval-only \\
        MODEL.WEIGHTS output/mask_rcnn_C4_1x/model_final.pth

A bare config name resolves inside transfer/configs/; a path works too. Trailing ``KEY VALUE``
pairs override the config as in Detectron2's own tools.

One's own COCO-format data (a json with images, annotations and categories, plus the image
folder) replaces DATASETS.TRAIN / DATASETS.TEST with ``--train-json J --train-images DIR`` and
``--test-json J --test-images DIR``; they are registered as ``imsvd_coco_train`` and
``imsvd_coco_test``::

    python transfer/train_net.py --config mask_rcnn_C4_instant_test.yaml \
        --train-json ann/train.json --train-images images/ \
        --test-json ann/val.json --test-images images/ MODEL.WEIGHTS imsvd_r50.pkl

MODEL.WEIGHTS (and the checkpoint of ``--resume``) is read without executing code from the file
(``--allow-unsafe`` lifts that for trusted files); converted weights must match
MODEL.RESNETS.DEPTH, and a weights file that leaves a backbone tensor unloaded or has a shape
mismatch is an error, not a warning.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import detectron2.utils.comm as comm
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode, get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.engine import (
    DefaultTrainer,
    default_argument_parser,
    default_setup,
    hooks,
    launch,
)
from detectron2.evaluation import (
    COCOEvaluator,
    DatasetEvaluator,
    PascalVOCDetectionEvaluator,
    verify_results,
)

from pretrain.checkpoint import add_weights_args
from pretrain.log import print_table, write_json_atomic
from transfer.d2_ext import has_cpp_ops, single_process_norm
from transfer.d2_weights import (
    D2ConversionError,
    check_arch,
    check_trunk_loaded,
    read_d2_weights,
)

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
logger = logging.getLogger("imsvd.train_net")

# Names under which --train-json / --test-json data are registered with Detectron2.
DATASET_NAMES = {"train": "imsvd_coco_train", "test": "imsvd_coco_test"}
DATA_FLAGS = "--train-json/--train-images and --test-json/--test-images"


class TrainNetError(ValueError):
    """Raised for a bad command line or config (missing config file, missing weights)."""


def resolve_config(name: str) -> str:
    """Find a config: an existing path as given, else a file of that name in transfer/configs/.

    Args:
        name: "mask_rcnn_C4_1x.yaml", "mask_rcnn_C4_1x" or a path.

    Returns:
        Path of the YAML file.

    Raises:
        TrainNetError: if neither exists.
    """
    if os.path.isfile(name):
        return name
    for candidate in (name, name + ".yaml"):
        path = os.path.join(CONFIG_DIR, candidate)
        if os.path.isfile(path):
            return path
    available = sorted(f for f in os.listdir(CONFIG_DIR) if f.endswith(".yaml"))
    raise TrainNetError(f"config {name!r} not found (as a path or in {CONFIG_DIR}: {available})")


@dataclass
class CocoSummary:
    """What a COCO-format json holds, as far as the start-up checks need it."""

    path: str
    categories: Dict[int, str]
    num_images: int
    num_annotations: int
    rle_masks: int = 0  # annotations whose segmentation is RLE (a dict)
    no_mask: int = 0  # non-crowd annotations without a segmentation
    problems: List[str] = field(default_factory=list)


def read_coco_summary(path: str) -> CocoSummary:
    """Read a COCO instances json and summarise its categories and mask types.

    Args:
        path: the json file.

    Returns:
        The summary.

    Raises:
        TrainNetError: unreadable file, not a COCO instances json, or no categories.
    """
    try:
        with open(path, "r", encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise TrainNetError(f"cannot read COCO json {path}: {exc}") from None
    if not isinstance(data, dict) or not all(
        isinstance(data.get(k), list) for k in ("images", "annotations", "categories")
    ):
        raise TrainNetError(
            f"{path} is not a COCO instances json: it needs the lists 'images', 'annotations' "
            "and 'categories'"
        )
    try:
        categories = {int(c["id"]): str(c["name"]) for c in data["categories"]}
    except (KeyError, TypeError, ValueError):
        raise TrainNetError(f"{path}: every entry of 'categories' needs an 'id' and a 'name'")
    if not categories:
        raise TrainNetError(f"{path}: 'categories' is empty")
    summary = CocoSummary(path, categories, len(data["images"]), len(data["annotations"]))
    for ann in data["annotations"]:
        segm = ann.get("segmentation")
        if isinstance(segm, dict):
            summary.rle_masks += 1
        elif not segm and not ann.get("iscrowd", 0):
            summary.no_mask += 1
        if ann.get("category_id") not in categories:
            summary.problems.append(
                f"annotation {ann.get('id')} has category_id {ann.get('category_id')!r}, "
                "which is not in 'categories'"
            )
    return summary


def data_args(args: argparse.Namespace) -> Dict[str, Tuple[str, str]]:
    """The (json, image folder) pairs given on the command line, checked for existence.

    Args:
        args: parsed command line (``train_json``, ``train_images``, ``test_json``,
            ``test_images``).

    Returns:
        {"train": (json, images), "test": (json, images)}, only the splits that were given.

    Raises:
        TrainNetError: half a pair, or a file / folder that does not exist.
    """
    pairs = {}
    for split in ("train", "test"):
        json_file = getattr(args, f"{split}_json", None)
        images = getattr(args, f"{split}_images", None)
        if json_file is None and images is None:
            continue
        if json_file is None or images is None:
            raise TrainNetError(f"--{split}-json and --{split}-images must be given together")
        if not os.path.isfile(json_file):
            raise TrainNetError(f"--{split}-json: file {json_file!r} does not exist")
        if not os.path.isdir(images):
            raise TrainNetError(f"--{split}-images: folder {images!r} does not exist")
        pairs[split] = (os.path.abspath(json_file), os.path.abspath(images))
    return pairs


def register_data(
    cfg: CfgNode, pairs: Dict[str, Tuple[str, str]], num_classes_given: bool = False
) -> Dict[str, CocoSummary]:
    """Register the given COCO-format data and point DATASETS.TRAIN / TEST at it.

    The flags win over DATASETS.TRAIN / TEST from the config or the overrides. A name registered
    before (an earlier call in the same process) is replaced. MODEL.ROI_HEADS.NUM_CLASSES
    follows the data's categories unless it was given on the command line (the heads are
    trained from scratch; another class count fails in the COCO evaluation).

    Args:
        cfg: the merged, not yet frozen config (changed in place).
        pairs: from :func:`data_args`.
        num_classes_given: MODEL.ROI_HEADS.NUM_CLASSES was an explicit override.

    Returns:
        The summary of each registered json, by split.

    Raises:
        TrainNetError: a MODEL.ROI_HEADS.NUM_CLASSES override other than the number of
            categories, train and test categories that differ, annotations with unknown
            categories, or masks the config cannot train on (no segmentation with
            MODEL.MASK_ON, RLE with polygon format).
    """
    summaries = {split: read_coco_summary(json_file) for split, (json_file, _) in pairs.items()}
    for s in summaries.values():
        if s.problems:
            more = f" (and {len(s.problems) - 1} more)" if len(s.problems) > 1 else ""
            raise TrainNetError(f"{s.path}: {s.problems[0]}{more}")
        if num_classes_given and len(s.categories) != cfg.MODEL.ROI_HEADS.NUM_CLASSES:
            raise TrainNetError(
                f"{s.path} has {len(s.categories)} categories but MODEL.ROI_HEADS.NUM_CLASSES is "
                f"{cfg.MODEL.ROI_HEADS.NUM_CLASSES}: pass MODEL.ROI_HEADS.NUM_CLASSES "
                f"{len(s.categories)}, or leave it out (it then follows the data)"
            )
    if "train" in summaries and "test" in summaries:
        train_c, test_c = summaries["train"].categories, summaries["test"].categories
        if train_c != test_c:
            raise TrainNetError(
                f"the categories of {summaries['train'].path} and {summaries['test'].path} "
                f"differ (ids only in train: {sorted(set(train_c) - set(test_c))}, only in "
                f"test: {sorted(set(test_c) - set(train_c))}, or names differ): the class "
                "indices of training and evaluation would not match"
            )
    train = summaries.get("train")
    if train is not None and cfg.MODEL.MASK_ON:
        if train.no_mask:
            raise TrainNetError(
                f"{train.path}: {train.no_mask} annotations have no segmentation but the config "
                "trains masks (MODEL.MASK_ON True): add MODEL.MASK_ON False for boxes only"
            )
        if train.rle_masks and cfg.INPUT.MASK_FORMAT == "polygon":
            raise TrainNetError(
                f"{train.path}: {train.rle_masks} annotations have RLE masks, which "
                "INPUT.MASK_FORMAT polygon cannot read: add INPUT.MASK_FORMAT bitmask"
            )
    for split, (json_file, image_root) in pairs.items():
        name = DATASET_NAMES[split]
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        register_coco_instances(name, {}, json_file, image_root)
        s = summaries[split]
        logger.info(
            "registered %s: %s (%d images, %d annotations, %d categories), images in %s",
            name, json_file, s.num_images, s.num_annotations, len(s.categories), image_root,
        )  # fmt: skip
    n_classes = len(next(iter(summaries.values())).categories)
    if cfg.MODEL.ROI_HEADS.NUM_CLASSES != n_classes:
        logger.info(
            "MODEL.ROI_HEADS.NUM_CLASSES %d -> %d (the categories of the data)",
            cfg.MODEL.ROI_HEADS.NUM_CLASSES, n_classes,
        )  # fmt: skip
        cfg.MODEL.ROI_HEADS.NUM_CLASSES = n_classes
    if "train" in pairs:
        cfg.DATASETS.TRAIN = (DATASET_NAMES["train"],)
    if "test" in pairs:
        cfg.DATASETS.TEST = (DATASET_NAMES["test"],)
    return summaries


def check_data_available(cfg: CfgNode, eval_only: bool = False) -> None:
    """Fail early, with the fix, when a dataset of the config has no files on this machine.

    Detectron2's built-in datasets (``coco_2017_val_100``, ``coco_2017_train``, ...) are read
    from ``$DETECTRON2_DATASETS`` (default ``./datasets``); without them Detectron2 would stop
    with a traceback after the model is built.

    Args:
        cfg: the config with its final DATASETS.
        eval_only: only DATASETS.TEST is needed.

    Raises:
        TrainNetError: naming the dataset, the missing path and the flags that avoid it.
    """
    keys = ["TEST"] if eval_only else ["TRAIN", "TEST"]
    for key in keys:
        for name in getattr(cfg.DATASETS, key):
            if name not in DatasetCatalog.list():
                raise TrainNetError(
                    f"DATASETS.{key}: dataset {name!r} is not registered; give your own "
                    f"COCO-format data with {DATA_FLAGS}"
                )
            meta = MetadataCatalog.get(name)
            for attr in ("json_file", "image_root", "dirname"):
                path = meta.get(attr, None)
                if path and not os.path.exists(path):
                    root = os.getenv("DETECTRON2_DATASETS", "datasets")
                    raise TrainNetError(
                        f"DATASETS.{key}: dataset {name!r} needs {path}, which does not exist "
                        f"(Detectron2's datasets live under $DETECTRON2_DATASETS, now {root!r}): "
                        f"put the data there, set DETECTRON2_DATASETS, or give your own "
                        f"COCO-format data with {DATA_FLAGS}"
                    )


class SafeCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer that reads weights without running code and refuses bad fits.

    Files are read by :func:`transfer.d2_weights.read_d2_weights` (restricted unpickling);
    after loading, a shape mismatch or a backbone tensor left unloaded raises instead of being
    logged (see :func:`transfer.d2_weights.check_trunk_loaded`).
    """

    def __init__(self, model, save_dir: str = "", *, allow_unsafe: bool = False, **kwargs):
        super().__init__(model, save_dir, **kwargs)
        self.allow_unsafe = allow_unsafe
        self._path = ""

    def _load_file(self, filename: str) -> Dict:
        data, label = read_d2_weights(filename, allow_unsafe=self.allow_unsafe)
        self._path = filename
        self.logger.info("read %s: %s", filename, label)
        return data

    def _load_model(self, checkpoint: Dict):
        incompatible = super()._load_model(checkpoint)
        check_trunk_loaded(incompatible.missing_keys, incompatible.incorrect_shapes, self._path)
        return incompatible


class Trainer(DefaultTrainer):
    """DefaultTrainer with the evaluators of the transfer benchmarks and the safe checkpointer."""

    def __init__(self, cfg: CfgNode, allow_unsafe: bool = False) -> None:
        super().__init__(cfg)
        plain = self.checkpointer
        self.checkpointer = SafeCheckpointer(
            plain.model, cfg.OUTPUT_DIR, allow_unsafe=allow_unsafe, trainer=weakref.proxy(self)
        )
        for hook in self._hooks:  # the periodic saver was built with the plain checkpointer
            if isinstance(hook, hooks.PeriodicCheckpointer):
                hook.checkpointer = self.checkpointer

    @classmethod
    def build_evaluator(
        cls, cfg: CfgNode, dataset_name: str, output_folder: Optional[str] = None
    ) -> DatasetEvaluator:
        """COCO (bbox, segm when MASK_ON) or PASCAL VOC evaluator, by the dataset's metadata."""
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type", "coco")
        if evaluator_type == "coco":
            # The fast evaluator needs Detectron2's C++ ops; the official COCO API gives the
            # same numbers, only slower.
            return COCOEvaluator(
                dataset_name, output_dir=output_folder, use_fast_impl=has_cpp_ops()
            )
        if evaluator_type == "pascal_voc":
            return PascalVOCDetectionEvaluator(dataset_name)
        raise TrainNetError(f"dataset {dataset_name!r}: no evaluator for type {evaluator_type!r}")


def setup(args: argparse.Namespace) -> CfgNode:
    """Build the frozen config from the file, the overrides and the launch arguments.

    Args:
        args: parsed command line.

    Returns:
        The config (also written to OUTPUT_DIR/config.yaml by default_setup).
    """
    # default_setup copies the config file next to the outputs: give it the resolved path.
    args.config_file = resolve_config(args.config_file)
    cfg = get_cfg()
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    pairs = data_args(args)
    if pairs:
        register_data(cfg, pairs, "MODEL.ROI_HEADS.NUM_CLASSES" in args.opts[::2])
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logger.warning("CUDA is not available: running on CPU")
        cfg.MODEL.DEVICE = "cpu"
    if args.num_gpus * args.num_machines == 1 or cfg.MODEL.DEVICE == "cpu":
        changed = single_process_norm(cfg)
        if changed:
            logger.warning("one process: SyncBN -> BN for %s", ", ".join(changed))
    resumable = args.resume and os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint"))
    if not cfg.MODEL.WEIGHTS and not resumable:
        # Never train from random weights by accident (Detectron2 would, silently).
        raise TrainNetError(
            "MODEL.WEIGHTS is empty and there is no OUTPUT_DIR/last_checkpoint to resume: pass "
            "MODEL.WEIGHTS path/to/weights.pkl (made by tools/convert_to_d2.py) or a trained "
            "model_final.pth"
        )
    if (
        cfg.MODEL.WEIGHTS
        and "://" not in cfg.MODEL.WEIGHTS
        and not os.path.isfile(cfg.MODEL.WEIGHTS)
    ):
        raise TrainNetError(f"MODEL.WEIGHTS file {cfg.MODEL.WEIGHTS!r} does not exist")
    if cfg.MODEL.WEIGHTS and not resumable:
        check_weights(cfg, getattr(args, "allow_unsafe", False))
    check_data_available(cfg, eval_only=args.eval_only)
    cfg.freeze()
    default_setup(cfg, args)
    return cfg


def check_weights(cfg: CfgNode, allow_unsafe: bool = False) -> str:
    """Read MODEL.WEIGHTS safely at start-up, print what it is and check it fits the config.

    Args:
        cfg: the merged config.
        allow_unsafe: permit a full unpickle of a trusted file the safe readers refuse.

    Returns:
        The description of what was read (also printed).

    Raises:
        TrainNetError: refused or unreadable file (accepted inputs listed), or converted
            weights of another ResNet depth / stem than the config builds.
    """
    path = cfg.MODEL.WEIGHTS
    if "://" in path:  # a URL: Detectron2 downloads it; the checkpointer reads it safely later
        return "URL (read when loading)"
    try:
        data, label = read_d2_weights(path, allow_unsafe=allow_unsafe)
        check_arch(data, cfg.MODEL.RESNETS.DEPTH, path)
    except D2ConversionError as exc:
        raise TrainNetError(str(exc)) from None
    if comm.is_main_process():
        print(f"train_net: MODEL.WEIGHTS {path}: {label}", flush=True)
    return label


def save_results(cfg: CfgNode, results: Dict, config_file: str = "") -> None:
    """Write the evaluation results to OUTPUT_DIR/results.json and print the headline table.

    Args:
        cfg: the run's config.
        results: Detectron2's results ({dataset: {task: metrics}} or, for a single test
            dataset, {task: metrics}).
        config_file: the config file the run started from (recorded).
    """
    if not results or not comm.is_main_process():
        return
    if len(cfg.DATASETS.TEST) == 1 and cfg.DATASETS.TEST[0] not in results:
        results = {cfg.DATASETS.TEST[0]: results}
    # NaN (e.g. APl on a set without large objects) is not valid JSON: write null instead.
    clean = {
        ds: {
            task: {k: (None if v != v else float(v)) for k, v in m.items()} for task, m in r.items()
        }
        for ds, r in results.items()
    }
    write_json_atomic(
        {"config_file": config_file, "weights": cfg.MODEL.WEIGHTS, "results": clean},
        os.path.join(cfg.OUTPUT_DIR, "results.json"),
    )  # fmt: skip
    rows = [
        {"dataset": ds, "task": task, **{k: m.get(k) for k in ("AP", "AP50", "AP75")}}
        for ds, r in clean.items()
        for task, m in r.items()
    ]
    print_table(rows, title="Detectron2 evaluation (results.json)")


def main(args: argparse.Namespace) -> Dict:
    """Train (or evaluate with --eval-only) and return the evaluation results.

    Args:
        args: parsed command line.

    Returns:
        Results dict (dataset -> task -> metric -> value) on the main process.
    """
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        SafeCheckpointer(
            model, save_dir=cfg.OUTPUT_DIR, allow_unsafe=getattr(args, "allow_unsafe", False)
        ).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        results = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, results)
        save_results(cfg, results, args.config_file)
        return results
    trainer = Trainer(cfg, allow_unsafe=getattr(args, "allow_unsafe", False))
    trainer.resume_or_load(resume=args.resume)
    trainer.train()
    # The final evaluation hook stores its results on the trainer.
    results = getattr(trainer, "_last_eval_results", None) or OrderedDict()
    save_results(cfg, results, args.config_file)
    return results


def build_parser() -> argparse.ArgumentParser:
    """Detectron2's argument parser, with ``--config`` as the documented spelling.

    Returns:
        The parser (--config/--config-file, --num-gpus, --num-machines, --machine-rank,
        --dist-url, --resume, --eval-only, --allow-unsafe, --train-json/--train-images,
        --test-json/--test-images, trailing KEY VALUE opts).
    """
    parser = default_argument_parser()
    add_weights_args(parser, layout_options=False)
    parser.add_argument(
        "--config", dest="config_file", metavar="FILE",
        help="config name in transfer/configs/ (e.g. mask_rcnn_C4_1x.yaml) or a path",
    )  # fmt: skip
    data = parser.add_argument_group(
        "own COCO-format data",
        f"registered as {DATASET_NAMES['train']} / {DATASET_NAMES['test']}; they replace "
        "DATASETS.TRAIN / DATASETS.TEST",
    )
    for split in ("train", "test"):
        data.add_argument(
            f"--{split}-json", metavar="JSON", help=f"COCO instances json of the {split} set"
        )
        data.add_argument(
            f"--{split}-images",
            metavar="DIR",
            help=f"folder that the file_name entries of --{split}-json are relative to",
        )
    return parser


def cli(argv: Optional[list] = None) -> int:
    """Parse arguments and launch one process per GPU (Detectron2's launch).

    Args:
        argv: arguments (defaults to sys.argv[1:]).

    Returns:
        Exit code: 0 on success, 2 on a bad config or weights file.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.config_file:
        parser.error("--config is required")
    try:
        resolve_config(args.config_file)  # fail before spawning workers
        data_args(args)
        launch(
            main,
            args.num_gpus,
            num_machines=args.num_machines,
            machine_rank=args.machine_rank,
            dist_url=args.dist_url,
            args=(args,),
        )
    except (TrainNetError, D2ConversionError) as exc:
        print(f"train_net: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())

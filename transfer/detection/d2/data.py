"""One's own COCO-format data for transfer/train_net.py (Detectron2).

``--train-json J --train-images DIR`` and ``--test-json J --test-images DIR`` register the files
with Detectron2's ``register_coco_instances`` as ``imsvd_coco_train`` / ``imsvd_coco_test`` and
replace DATASETS.TRAIN / DATASETS.TEST; the start-up checks (categories of both splits, masks when
MODEL.MASK_ON, built-in datasets present under $DETECTRON2_DATASETS) live here too.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances

from pretrain.errors import IMSVDError
from transfer.detection.stacks import DATASET_NAMES  # the command line names them too

logger = logging.getLogger("imsvd.train_net")

DATA_FLAGS = "--train-json/--train-images and --test-json/--test-images"


class TrainNetError(IMSVDError, ValueError):
    """Raised for a bad command line or config (missing config file, missing weights, data)."""


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


def _check_summaries(
    cfg: CfgNode, summaries: Dict[str, CocoSummary], num_classes_given: bool
) -> None:
    """The checks of :func:`register_data` before anything is registered (its Raises)."""
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
    _check_summaries(cfg, summaries, num_classes_given)
    for split, (json_file, image_root) in pairs.items():
        name = DATASET_NAMES[split]
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        register_coco_instances(name, {}, json_file, image_root)
        s = summaries[split]
        logger.info(
            "registered %s: %s (%d images, %d annotations, %d categories), images in %s",
            name,
            json_file,
            s.num_images,
            s.num_annotations,
            len(s.categories),
            image_root,
        )
    n_classes = len(next(iter(summaries.values())).categories)
    if cfg.MODEL.ROI_HEADS.NUM_CLASSES != n_classes:
        logger.info(
            "MODEL.ROI_HEADS.NUM_CLASSES %d -> %d (the categories of the data)",
            cfg.MODEL.ROI_HEADS.NUM_CLASSES,
            n_classes,
        )
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

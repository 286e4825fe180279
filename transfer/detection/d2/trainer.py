"""Detectron2 side of ``transfer/train_net.py``: config resolution, the trainer, the run.

Imported only once the command line is parsed and Detectron2 is known to import (see
:mod:`transfer.detection.d2.train`, the entry point, and :mod:`transfer.detection.stacks`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import weakref
from collections import OrderedDict
from typing import Dict, Optional

import detectron2.utils.comm as comm
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode, get_cfg
from detectron2.data import MetadataCatalog
from detectron2.engine import (
    DefaultTrainer,
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

from pretrain.checkpoint import NonFiniteWeightsError, check_finite_weights
from pretrain.errors import IMSVDError
from pretrain.fileio import write_json_atomic
from pretrain.log import print_table
from transfer.detection.d2.data import (
    TrainNetError,
    check_data_available,
    data_args,
    register_data,
)
from transfer.detection.d2.ext import has_cpp_ops, single_process_norm
from transfer.detection.d2.weights import (
    D2ConversionError,
    check_arch,
    check_heads_loaded,
    check_trunk_loaded,
    read_d2_weights,
)
from transfer.detection.stacks import CONFIG_DIR, find_config

logger = logging.getLogger("imsvd.train_net")


def resolve_config(name: str) -> str:
    """Find a config: an existing path as given, else a file of that name in transfer/configs/.

    Args:
        name: "mask_rcnn_C4_1x.yaml", "mask_rcnn_C4_1x" or a path.

    Returns:
        Path of the YAML file.

    Raises:
        TrainNetError: if neither exists.
    """
    return find_config(name, CONFIG_DIR, ".yaml", TrainNetError)


class SafeCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer that reads weights without running code and refuses bad fits.

    Files are read by :func:`transfer.detection.d2.weights.read_d2_weights` (restricted unpickling);
    after loading, a shape mismatch or a backbone tensor left unloaded raises instead of being
    logged (see :func:`transfer.detection.d2.weights.check_trunk_loaded`).
    """

    def __init__(
        self,
        model,
        save_dir: str = "",
        *,
        allow_unsafe: bool = False,
        require_all: bool = False,
        **kwargs,
    ):
        super().__init__(model, save_dir, **kwargs)
        self.allow_unsafe = allow_unsafe
        self.require_all = require_all  # evaluation: heads must come from the file too
        self._path = ""

    def _load_file(self, filename: str) -> Dict:
        data, label = read_d2_weights(filename, allow_unsafe=self.allow_unsafe)
        self._path = filename
        self.logger.info("read %s: %s", filename, label)
        return data

    def _load_model(self, checkpoint: Dict):
        incompatible = super()._load_model(checkpoint)
        check_trunk_loaded(incompatible.missing_keys, incompatible.incorrect_shapes, self._path)
        if self.require_all:
            check_heads_loaded(incompatible.missing_keys, incompatible.incorrect_shapes, self._path)
        try:  # NaN / inf tensors or a running_var <= 0 would give a plausible wrong AP
            check_finite_weights(self.model, self._path, "model")
        except NonFiniteWeightsError as exc:
            raise D2ConversionError(str(exc)) from None
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
    if cfg.MODEL.WEIGHTS and "://" not in cfg.MODEL.WEIGHTS:
        if os.path.isdir(cfg.MODEL.WEIGHTS):
            raise TrainNetError(
                f"MODEL.WEIGHTS {cfg.MODEL.WEIGHTS!r} is a directory, not a weights file"
            )
        if not os.path.isfile(cfg.MODEL.WEIGHTS):
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
    )
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
            model,
            save_dir=cfg.OUTPUT_DIR,
            allow_unsafe=getattr(args, "allow_unsafe", False),
            require_all=True,  # no evaluation of randomly initialised heads
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


def run(args: argparse.Namespace) -> int:
    """Check the config and data flags, then launch one process per GPU (Detectron2's launch).

    Args:
        args: the parsed command line of :func:`transfer.detection.d2.train.build_parser`.

    Returns:
        Exit code: 0 on success, 2 on a bad config or weights file.
    """
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
    except IMSVDError as exc:
        print(f"train_net: error: {exc}", file=sys.stderr)
        return 2
    return 0

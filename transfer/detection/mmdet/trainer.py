"""MMDetection side of ``imsvd-mmdet-train``: config resolution, set-up, the run.

Imported only once the command line is parsed and MMDetection is known to import (see
:mod:`transfer.detection.mmdet.train`, the entry point, and :mod:`transfer.detection.stacks`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, Dict, Optional

import torch
from mmengine.config import Config
from mmengine.dist import is_main_process
from mmengine.runner import Runner, find_latest_checkpoint

from pretrain.checkpoint import NonFiniteWeightsError, check_finite_tensors
from pretrain.errors import IMSVDError
from pretrain.fileio import write_json_atomic
from pretrain.log import print_table
from transfer.detection.mmdet.ext import (
    MetricsCapture,
    checkpoint_safe_globals,
    pretrained_checkpoints,
    set_pretrained_checkpoint,
    single_process_norm,
)
from transfer.detection.mmdet.weights import MMDetWeightsError, check_depth, read_mmdet_weights
from transfer.detection.stacks import CONFIG_DIR as DETECTION_CONFIGS
from transfer.detection.stacks import find_config

CONFIG_DIR = os.path.join(DETECTION_CONFIGS, "mmdet")
logger = logging.getLogger("imsvd.mmdet_train")

# Metric name suffixes of MMDetection's CocoMetric / VOCMetric -> reported names.
_COCO_KEYS = {"mAP": "AP", "mAP_50": "AP50", "mAP_75": "AP75", "mAP_s": "APs", "mAP_m": "APm"}
_COCO_KEYS["mAP_l"] = "APl"
_VOC_KEYS = {"mAP": "AP", "AP50": "AP50", "AP75": "AP75"}


class MMDetTrainError(IMSVDError, ValueError):
    """Raised for a bad command line, config or weights file."""


def resolve_config(name: str) -> str:
    """Find a config: an existing path as given, else a file in transfer/configs/mmdet/.

    Args:
        name: "mask_rcnn_C4_1x.py", "mask_rcnn_C4_1x" or a path.

    Returns:
        Path of the config file.

    Raises:
        MMDetTrainError: if neither exists.
    """
    return find_config(name, CONFIG_DIR, ".py", MMDetTrainError)


def _check_weights(path: str, cfg: Config, trained: bool) -> None:
    """Read a weights file safely and check it against the config (arch depth, heads)."""
    safe = checkpoint_safe_globals() if trained else ()
    sd, meta = read_mmdet_weights(path, safe_globals=safe)
    depth = int(cfg.model.backbone.depth)
    n = check_depth(sd, meta, depth, path)
    try:  # NaN / inf tensors or a running_var <= 0 would give a plausible wrong AP
        check_finite_tensors(sd, path, "detector" if trained else "backbone")
    except NonFiniteWeightsError as exc:
        raise MMDetWeightsError(str(exc)) from None
    if trained and not any(k.startswith(("rpn_head.", "roi_head.bbox_head.")) for k in sd):
        raise MMDetWeightsError(
            f"{path}: no detection heads (rpn_head.*, roi_head.bbox_head.*); --eval-only needs a "
            "trained detector, not converted backbone weights"
        )
    logger.info("weights %s: %d ResNet tensors, depth %d checked", path, n, depth)


def setup(args: argparse.Namespace) -> Config:
    """Build the config from the file, the overrides and the command line; check the weights.

    Args:
        args: parsed command line.

    Returns:
        The config the Runner is built from.

    Raises:
        MMDetTrainError / MMDetWeightsError: on a missing config, missing or unsafe weights, or
            weights whose arch does not match the config.
    """
    config_path = resolve_config(args.config)
    cfg = Config.fromfile(config_path)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    cfg.launcher = args.launcher
    stem = os.path.splitext(os.path.basename(config_path))[0]
    cfg.work_dir = args.work_dir or cfg.get("work_dir") or os.path.join("output", "mmdet", stem)
    if args.launcher == "none":
        changed = single_process_norm(cfg)
        if changed:
            logger.warning("one process: SyncBN -> BN in %d norm configs", len(changed))

    if args.eval_only:
        if not args.weights:
            raise MMDetTrainError("--eval-only needs --weights path/to/trained_checkpoint.pth")
        _check_weights(args.weights, cfg, trained=True)
        cfg.load_from = args.weights
        return cfg

    resumable = None
    if args.resume:
        resumable = find_latest_checkpoint(cfg.work_dir)
        if resumable is None:
            raise MMDetTrainError(
                f"--resume: no checkpoint to resume in {cfg.work_dir} (no last_checkpoint file)"
            )
        # Checked as strictly as any other file before mmengine unpickles it.
        read_mmdet_weights(resumable, safe_globals=checkpoint_safe_globals())
        cfg.resume = True
    _set_pretrained(cfg, args, resuming=resumable is not None)
    return cfg


def _set_pretrained(cfg: Config, args: argparse.Namespace, resuming: bool) -> None:
    """Point the Pretrained init_cfg entries at --weights, clear them for --no-weights, or check
    the checkpoints the config names (none is an error unless the run resumes)."""
    if args.weights:
        _check_weights(args.weights, cfg, trained=False)
        set_pretrained_checkpoint(cfg, args.weights)
    elif args.no_weights:
        logger.warning("--no-weights: the backbone and shared head start from random weights")
        for node in (cfg.model.backbone, cfg.model.roi_head.get("shared_head")):
            init = node.get("init_cfg") if node is not None else None
            if isinstance(init, dict) and init.get("type") == "Pretrained":
                node.init_cfg = None
    else:
        pending = pretrained_checkpoints(cfg)
        unset = [k for k, v in pending.items() if not v]
        if unset and not resuming:
            # Never train from random weights by accident.
            raise MMDetTrainError(
                f"no pretrained weights: {', '.join(unset)} has no checkpoint. Pass --weights "
                "path/to/weights.pth (made by tools/convert_to_mmdet.py), or --no-weights to "
                "train from random initialisation on purpose"
            )
        for path in sorted({v for v in pending.values() if v}):
            _check_weights(path, cfg, trained=False)


def metrics_to_results(metrics: Dict[str, Any]) -> Dict[str, Dict[str, Optional[float]]]:
    """Turn MMDetection metrics (fractions) into {task: {AP, AP50, ...}} in percent.

    Args:
        metrics: e.g. {"coco/bbox_mAP": 0.393, "coco/segm_mAP_50": 0.558, ...} or
            {"pascal_voc/mAP": 0.5, "pascal_voc/AP50": 81.0, ...}.

    Returns:
        task -> metric -> percent (None where COCO reports -1: no object of that size).
    """
    results: Dict[str, Dict[str, Optional[float]]] = {}
    for key, value in metrics.items():
        prefix, _, name = key.rpartition("/")
        if prefix.endswith("coco") and "_" in name:
            task, _, metric = name.partition("_")
            if metric in _COCO_KEYS:
                v = float(value)
                results.setdefault(task, {})[_COCO_KEYS[metric]] = None if v < 0 else 100.0 * v
        elif prefix.endswith("pascal_voc") and name in _VOC_KEYS:
            # VOCMetric reports mAP as a fraction and the per-IoU APs as fractions too.
            results.setdefault("bbox", {})[_VOC_KEYS[name]] = 100.0 * float(value)
    return results


def save_results(cfg: Config, results: Dict, config_file: str, weights: Optional[str]) -> None:
    """Write work_dir/results.json and print the headline table (main process only).

    Args:
        cfg: the run's config.
        results: task -> metric -> percent.
        config_file: the config the run started from (recorded).
        weights: the weights the run started from (recorded).
    """
    if not results or not is_main_process():
        return
    write_json_atomic(
        {"config_file": config_file, "weights": weights, "results": results},
        os.path.join(cfg.work_dir, "results.json"),
    )
    rows = [
        {"task": task, **{k: m.get(k) for k in ("AP", "AP50", "AP75")}}
        for task, m in results.items()
    ]
    print_table(rows, title="MMDetection evaluation (results.json)")


def main(args: argparse.Namespace) -> Dict[str, Dict[str, Optional[float]]]:
    """Train (or evaluate with --eval-only) and return the evaluation results.

    Args:
        args: parsed command line.

    Returns:
        task -> metric -> percent ({} on processes other than the main one).
    """
    cfg = setup(args)
    runner = Runner.from_cfg(cfg)
    capture = MetricsCapture()
    runner.register_hook(capture, priority="LOWEST")
    # mmengine reads checkpoints with torch.load, whose default is weights_only=True: allow the
    # few mmengine/numpy classes its own checkpoints hold, nothing else.
    with torch.serialization.safe_globals(checkpoint_safe_globals()):
        if args.eval_only:
            metrics = runner.test()
        else:
            runner.train()
            metrics = capture.metrics or {}
    results = metrics_to_results(metrics or {})
    if not results and is_main_process():
        logger.warning("the evaluation returned no AP (no detections, or no evaluator ran)")
    save_results(cfg, results, resolve_config(args.config), args.weights)
    return results


def run(args: argparse.Namespace) -> int:
    """Run :func:`main` on the parsed command line; errors of config or weights are one line.

    Args:
        args: the parsed command line of :func:`transfer.detection.mmdet.train.build_parser`.

    Returns:
        Exit code: 0 on success, 2 on a bad config or weights file.
    """
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        main(args)
    except IMSVDError as exc:
        print(f"mmdet_train: error: {exc}", file=sys.stderr)
        return 2
    return 0

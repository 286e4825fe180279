"""The one runner of the evaluation entry points (kNN, linear probe, VOC07 SVM, code analysis).

A tool describes itself with an :class:`Evaluation` (its recipe, a cross-field check of the
config, the run itself and how its results read as a table); this module does everything
they share, once:

* the command line (:mod:`transfer.eval.evalcfg`): ``--config`` + flags + dotted overrides;
* the set-up (:func:`setup`): process group (torchrun variables), the output folder, logging
  to ``OUTPUT_DIR/log.txt`` (rank 0 also to stdout), seeding, the resolved config written as
  ``OUTPUT_DIR/config.yaml``;
* the weights (:meth:`EvalContext.load_model`): one read of the file through
  :func:`pretrain.models.build.model_from_checkpoint`, the backbone frozen;
* feature extraction (:meth:`EvalContext.features`), behind the cache when there is an output
  folder;
* the results (:func:`report`): a printed table, the results JSON and a
  "results written to PATH" line.
"""

from __future__ import annotations

import logging
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from pretrain.checkpoint import CheckpointError, NonFiniteWeightsError, with_accepted_inputs
from pretrain.config import ConfigError, save_config
from pretrain.data.images import max_image_pixels
from pretrain.dist import DistInfo, all_reduce_sum, init_distributed
from pretrain.engine.checkpointer import RunFolder, take_output_folder
from pretrain.errors import IMSVDError
from pretrain.fileio import write_json_atomic
from pretrain.log import LOGGER_NAME, setup_logging
from pretrain.models.build import model_from_checkpoint
from transfer.eval.evalcfg import build_parser, load_eval_config
from transfer.eval.feature_cache import cached_features
from transfer.eval.features import FeatureError, extract_features, freeze
from transfer.eval.inputs import check_weights, log_weights_notes

logger = logging.getLogger(LOGGER_NAME)


@dataclass(frozen=True)
class Evaluation:
    """What a tool tells the runner about itself.

    Attributes:
        name: the recipes' ``evaluation`` value; default output folder ``outputs/<name>``.
        prog: console-script name shown in the usage line.
        description: one line for ``--help``.
        default_config: recipe used without ``--config``.
        results_name: file name of the results JSON inside the output folder.
        validate: ``validate(cfg)`` raises ConfigError on a bad combination of keys (called
            before anything is read or written).
        run: ``run(ctx) -> results`` (rank 0 returns the results dict, other ranks ``{}``).
        summary: ``summary(results) -> str``: the printed table(s).
        output_required: False: an empty or unwritable ``output_dir`` is allowed (results
            printed only, nothing cached).
        config_at_setup: False: the run writes ``config.yaml`` itself, once it has accepted
            the output folder (a supervised run after its resume check, so a refused resume
            leaves the folder's config as it was).
    """

    name: str
    prog: str
    description: str
    default_config: str
    results_name: str
    validate: Callable[[dict], None]
    run: Callable[["EvalContext"], dict]
    summary: Callable[[dict], str]
    output_required: bool = True
    config_at_setup: bool = True

    def main(self, argv: list[str] | None = None) -> int:
        """The tool's entry point (its console script): :func:`main` of this tool; returns the
        exit code (2 for user errors)."""
        return main(self, argv)


@dataclass
class EvalContext:
    """The state :func:`setup` hands to a tool's run.

    Attributes:
        cfg: the resolved config.
        info: process group facts (rank, world size, device).
        out: the output folder, or None when the tool runs without one.
        lock: the output folder's lock (one run per folder), or None without a folder.
    """

    cfg: dict
    info: DistInfo
    out: Path | None
    lock: RunFolder | None = None

    def write_config(self) -> None:
        """Write the resolved config to ``OUTPUT_DIR/config.yaml`` (rank 0; no folder: nothing)."""
        if self.out is not None and self.info.is_main:
            save_config(self.cfg, self.out / "config.yaml")
            logger.info(
                "%s: resolved config written to %s",
                self.cfg["evaluation"],
                self.out / "config.yaml",
            )

    def release(self) -> None:
        """Release the output folder's lock (idempotent)."""
        if self.lock is not None:
            self.lock.__exit__(None, None, None)
            self.lock = None

    @property
    def device(self) -> torch.device:
        """This process's compute device."""
        return self.info.device

    @property
    def is_main(self) -> bool:
        """True on rank 0."""
        return self.info.is_main

    def load_model(self) -> tuple[nn.Module, nn.Module | None, dict[str, Any]]:
        """Read ``model.weights`` once: the frozen backbone, the projector when the file has
        one (eval mode, on the device) and the reader's meta.

        Returns:
            (backbone, projector or None, meta with ``arch``, ``stem``, ``sha256``, ...).

        Raises:
            ConfigError: no weights given, or not a file. CheckpointError: unreadable file (its
                message ends with the accepted inputs). NonFiniteWeightsError: a NaN / inf
                parameter or buffer, or a BatchNorm running_var <= 0 (one line naming the tensor
                and the file).
        """
        m = self.cfg["model"]
        check_weights(self.cfg)  # also in each tool's validate, before the folder is made
        try:
            backbone, projector, meta = model_from_checkpoint(
                m["weights"],
                device=self.device,
                allow_unsafe=bool(m["allow_unsafe"]),
                checkpoint_key=m["checkpoint_key"] or None,
                prefix=m["prefix"] or None,
                stem=m["stem"] or None,
            )
        except NonFiniteWeightsError:
            raise
        except CheckpointError as e:  # the file's problem; any other error keeps its traceback
            raise type(e)(with_accepted_inputs(e)) from None
        if projector is not None:
            projector.eval()
        logger.info(
            "weights %s: %s, %s (stem %s), sha256 %s",
            m["weights"],
            meta["source_format"],
            meta["arch"],
            meta["stem"],
            meta["sha256"][:16],
        )
        log_weights_notes(meta, self.cfg["data"])
        return freeze(backbone), projector, meta

    def total_rows(self, rows: int) -> int:
        """Sum of ``rows`` over the ranks, on every rank (``rows`` itself for one process);
        every rank must call."""
        if not self.info.distributed:
            return int(rows)
        return int(all_reduce_sum(torch.tensor([int(rows)], device=self.device)).item())

    def features(
        self,
        split: str,
        model: nn.Module,
        dataset: Dataset,
        weights_sha256: str,
        gather: str = "all",
    ) -> tuple[np.ndarray, np.ndarray]:
        """Features of a dataset, cached under OUTPUT_DIR/features.

        Args:
            split: split name (cache file names, progress label).
            model: the frozen backbone.
            dataset: yields (image tensor, label); unreadable images (None) are left out.
            weights_sha256: content hash of the weights (cache key).
            gather: "all" (every rank the whole arrays), "main" (rank 0 alone) or "shard"
                (each rank its contiguous rows): see :func:`transfer.eval.features.
                extract_features`.

        Returns:
            (features float32 (N, D), labels int64 (N,)), N = readable images (this rank's
            share as ``gather`` says).

        Raises:
            FeatureError: a feature is NaN / inf on any rank (naming the split and
                ``model.weights``; raised on every rank).
        """
        kw = dict(
            layer=self.cfg["features"]["layer"],
            batch_size=int(self.cfg["data"]["batch_size"]),
            device=self.device,
            num_workers=int(self.cfg["data"]["num_workers"]),
            precision=str(self.cfg["features"]["precision"]),
            channels_last=bool(self.cfg["features"]["channels_last"]),
            gather=gather,
        )
        if self.out is None:
            feats, labels = extract_features(model, dataset, desc=f"{split} features", **kw)
        else:
            check = str(self.cfg["features"]["cache_check"])
            feats, labels = cached_features(
                self.out / "features", split, model, dataset, weights_sha256, check=check, **kw
            )
        bad, rows = _nonfinite_rows(feats), feats.shape[0]
        if gather != "all" and self.info.distributed:  # each rank holds a part
            bad, rows = (
                int(v) for v in all_reduce_sum(torch.tensor([bad, rows], device=self.device))
            )
        if bad:
            raise FeatureError(
                f"the {split} features of weights {self.cfg['model']['weights']} hold NaN/inf "
                f"({bad} of {rows} images): these weights cannot be evaluated"
            )
        return feats, labels


def _nonfinite_rows(feats: np.ndarray, block: int = 65536) -> int:
    """Rows of ``feats`` holding NaN or inf, checked block by block (no N x D mask)."""
    return sum(
        int((~np.isfinite(feats[lo : lo + block])).any(axis=1).sum())
        for lo in range(0, feats.shape[0], block)
    )


def usable_dir(path: str) -> Path | None:
    """``path`` created if needed, or None when it is empty or cannot be written."""
    if not path:
        return None
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write_test{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError:
        return None
    return out


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (same seed on every rank)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup(ev: Evaluation, cfg: dict) -> EvalContext:
    """Process group, output folder, logging, seed, resolved config (Detectron2's default_setup).

    Args:
        ev: the tool.
        cfg: its resolved config.

    Returns:
        The context of the run.

    Raises:
        ConfigError: the tool needs an output folder and ``output_dir`` is empty or cannot be
            written. RunFolderBusyError: another run uses the output folder (an flock on
            ``OUTPUT_DIR/.lock``, as pretraining), before anything is written there; raised on
            every rank (:func:`pretrain.engine.checkpointer.take_output_folder`).
        PixelLimitError: a malformed ``IMSVD_MAX_IMAGE_PIXELS`` (on every rank, before any
            image is read).
    """
    max_image_pixels()
    info = init_distributed(cfg["device"])
    out = usable_dir(cfg["output_dir"])
    if out is None and ev.output_required:
        what = "is empty" if not cfg["output_dir"] else "cannot be written"
        raise ConfigError(f"config key 'output_dir' {what} (use --output-dir)")
    lock = take_output_folder(out, info)  # on every rank: a busy folder stops them all
    ctx = EvalContext(cfg=cfg, info=info, out=out, lock=lock)
    try:
        setup_logging(str(out) if out else None, rank=info.rank)
        if cfg["output_dir"] and out is None:
            logger.warning(
                "output_dir %r cannot be written: no feature cache, no results file",
                cfg["output_dir"],
            )
        seed_everything(int(cfg["seed"]))
        if ev.config_at_setup:
            ctx.write_config()
    except BaseException:
        ctx.release()
        raise
    return ctx


def report(ev: Evaluation, ctx: EvalContext, results: dict) -> Path | None:
    """Print the tool's table, write the results JSON, say where (rank 0 only).

    Returns:
        The results file, or None when it was not written (no usable output folder).
    """
    print(ev.summary(results), flush=True)
    if ctx.out is None:
        return None
    path = ctx.out / ev.results_name
    try:
        write_json_atomic(results, path)
    except OSError as e:
        logger.warning("%s results NOT written to %s: %s", ev.name, path, e)
        return None
    logger.info("%s results written to %s", ev.name, path)
    return path


def run_config(ev: Evaluation, cfg: dict) -> dict:
    """Validate, set up, run and report one evaluation from a resolved config.

    Args:
        ev: the tool.
        cfg: its resolved config (e.g. from :func:`pretrain.config.load_config`).

    Returns:
        The results (rank 0; ``{}`` on other ranks).
    """
    ev.validate(cfg)
    ctx = setup(ev, cfg)
    try:
        results = ev.run(ctx)
        if ctx.is_main:
            report(ev, ctx, results)
    finally:
        ctx.release()
    return results


def main(ev: Evaluation, argv: list[str] | None = None) -> int:
    """The entry point of a tool: parse, load the recipe, run; user errors exit with 2.

    Args:
        ev: the tool.
        argv: arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit code.
    """
    parser = build_parser(ev.prog, ev.description, ev.default_config)
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after flags
    try:
        cfg, _ = load_eval_config(ev.name, args)
        run_config(ev, cfg)
    except IMSVDError as e:  # a user error; anything else is a bug and keeps its traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0

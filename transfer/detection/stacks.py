"""The optional detection stacks (Detectron2, MMDetection) as the entry points see them.

The command lines of ``imsvd-d2-train`` / ``transfer/train_net.py`` and ``imsvd-mmdet-train``
are built with the pieces here, without importing either stack, so ``--help`` and argument
errors work in an environment that has neither (``pip install imsvd`` without the
set-up). A run then checks its stack with :func:`require`: one ``error:`` line naming the
missing package and the command that installs it, exit status 2, no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from dataclasses import dataclass
from typing import Optional, Tuple

# The folder of the detection configs, transfer/configs/ (Detectron2 YAMLs; mmdet/: MMDetection's).
CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
# The names under which --train-json / --test-json data is registered in Detectron2.
DATASET_NAMES = {"train": "imsvd_coco_train", "test": "imsvd_coco_test"}


@dataclass(frozen=True)
class Stack:
    """One optional stack: its display name, the modules a run imports, how to install it."""

    name: str
    modules: Tuple[str, ...]
    install: str


STACKS = {
    "detectron2": Stack(
        "Detectron2",
        ("detectron2", "fvcore", "iopath", "pycocotools"),
        "`make setup` in the IMSVD source tree (or `python3 tools/install_detectron2.py "
        "--python <your python>` and `pip install 'imsvd[detectron2]'`)",
    ),
    "mmdet": Stack(
        "MMDetection",
        ("mmengine", "mmcv.ops", "mmdet"),
        "`make setup` in the IMSVD source tree (or `python3 tools/install_mmdet.py "
        "--python <your python>`)",
    ),
}


def find_config(name: str, folder: str, suffix: str, error: type) -> str:
    """Find a detector config: an existing path as given, else ``name`` or ``name + suffix``
    in ``folder`` (the shipped configs).

    Args:
        name: e.g. "mask_rcnn_C4_1x", "mask_rcnn_C4_1x" + suffix, or a path.
        folder: the folder of the shipped configs.
        suffix: their file suffix (".yaml" for Detectron2, ".py" for MMDetection).
        error: the exception class raised when nothing is found.

    Returns:
        Path of the config file.

    Raises:
        error: neither exists (the message lists the shipped configs).
    """
    if os.path.isfile(name):
        return name
    for candidate in (name, name + suffix):
        path = os.path.join(folder, candidate)
        if os.path.isfile(path):
            return path
    available = sorted(f for f in os.listdir(folder) if f.endswith(suffix))
    raise error(f"config {name!r} not found (as a path or in {folder}: {available})")


def missing_module(stack: str) -> Optional[str]:
    """The first module of ``STACKS[stack]`` that does not import, with the reason, or None.

    Args:
        stack: "detectron2" or "mmdet".

    Returns:
        e.g. "detectron2 (No module named 'detectron2')", or None when all import.
    """
    for module in STACKS[stack].modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            return f"{module} ({exc})"
    return None


def require(stack: str, prog: str) -> bool:
    """Print the one-line error for a stack that does not import; True when it does.

    Args:
        stack: "detectron2" or "mmdet".
        prog: the command's name for the message.

    Returns:
        True when every module of the stack imports; False after printing to stderr
        ``<prog>: error: <Stack> is not installed: <module> (<reason>); install it with ...``.
    """
    gone = missing_module(stack)
    if gone is None:
        return True
    entry = STACKS[stack]
    print(
        f"{prog}: error: {entry.name} is not installed: {gone}; install it with {entry.install}",
        file=sys.stderr,
    )
    return False


def detectron2_base_parser() -> argparse.ArgumentParser:
    """Detectron2's ``default_argument_parser()``, or one with the same options without it.

    The stand-in only serves ``--help`` and argument errors when Detectron2 is not installed
    (a run stops at :func:`require`): --config-file, --resume, --eval-only, --num-gpus,
    --num-machines, --machine-rank, --dist-url and the trailing ``opts`` (KEY VALUE pairs).
    """
    try:
        from detectron2.engine import default_argument_parser
    except ImportError:
        pass
    else:
        return default_argument_parser()
    parser = argparse.ArgumentParser(
        description="Detectron2 training (Detectron2 is not installed: --help only)"
    )
    parser.add_argument("--config-file", default="", metavar="FILE", help="path to config file")
    parser.add_argument("--resume", action="store_true", help="resume from the last checkpoint")
    parser.add_argument("--eval-only", action="store_true", help="perform evaluation only")
    parser.add_argument("--num-gpus", type=int, default=1, help="number of GPUs per machine")
    parser.add_argument("--num-machines", type=int, default=1, help="total number of machines")
    parser.add_argument("--machine-rank", type=int, default=0, help="the rank of this machine")
    parser.add_argument("--dist-url", default="auto", help="initialization URL for torch DDP")
    parser.add_argument(
        "opts", default=None, nargs=argparse.REMAINDER, help="config KEY VALUE pairs at the end"
    )
    return parser


class CfgOptionsAction(argparse.Action):
    """``--cfg-options k=v ...`` parsed by mmengine's ``DictAction`` (numbers, lists, tuples, as
    MMDetection's own tools); the raw strings when mmengine is not installed (a run then stops
    at :func:`require`)."""

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            from mmengine.config import DictAction
        except ImportError:
            setattr(namespace, self.dest, list(values))
            return
        DictAction(self.option_strings, self.dest)(parser, namespace, values, option_string)

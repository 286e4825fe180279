"""Config loading shared by the evaluation entry points (VOC07 SVM, kNN, linear probes)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Mapping

from pretrain.config import load_config, resolve_config_path

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "eval"


def load_eval_config(args: argparse.Namespace, flags: Mapping[str, str]) -> dict:
    """Load ``args.config`` (a path or a name in configs/eval/) with ``args.overrides``.

    Args:
        args: parsed CLI arguments with ``config`` and ``overrides``.
        flags: convenience flag attribute -> dotted config key; flags left as None are ignored.

    Returns:
        The resolved config.
    """
    cfg = load_config(resolve_config_path(args.config, CONFIG_DIR), args.overrides)
    for flag, dotted in flags.items():
        value = getattr(args, flag, None)
        if value is None:
            continue
        node = cfg
        *parents, last = dotted.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
    return cfg

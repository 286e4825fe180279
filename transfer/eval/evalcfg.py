"""The one command-line grammar of the evaluation entry points, and their config loading.

Every evaluation (kNN, linear probe, VOC07 SVM, code analysis) is called as::

    TOOL [--config NAME|PATH] [--weights W] [--output-dir DIR]
         [--allow-unsafe] [--checkpoint-key KEY] [--prefix PREFIX] [--stem STEM]
         [key.sub=value ...]

``--config`` is a recipe shipped in ``configs/eval`` (by name) or a YAML path. The flags are
short names for config keys and go through the same typed override path as the dotted
overrides (applied first, so a dotted override given after them wins): the only defaults are the
recipe's.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from pretrain.checkpoint import add_weights_args
from pretrain.config import ConfigError, config_names, find_config, load_config

KIND = "eval"

# flag attribute -> the config key it sets
FLAG_KEYS = {
    "weights": "model.weights",
    "output_dir": "output_dir",
    "allow_unsafe": "model.allow_unsafe",
    "checkpoint_key": "model.checkpoint_key",
    "prefix": "model.prefix",
    "stem": "model.stem",
}


def build_parser(prog: str, description: str, default_config: str) -> argparse.ArgumentParser:
    """The parser every evaluation entry point uses.

    Args:
        prog: program name shown in the usage line (the console script).
        description: one line on what the tool does.
        default_config: recipe used without ``--config``.

    Returns:
        The parser (its namespace holds ``config``, the flags of :data:`FLAG_KEYS` and
        ``overrides``).
    """
    p = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog="Overrides: any key of the recipe, dotted (e.g. data.num_workers=8 "
        "device=cpu); every key is documented in configs/eval/base.yaml and the tool's "
        f"recipe. Shipped recipes: {', '.join(config_names(KIND))}.",
    )
    p.add_argument(
        "--config",
        default=default_config,
        help=f"recipe: a name in configs/eval/ or a YAML path (default: {default_config})",
    )
    p.add_argument("--weights", metavar="W", help="weights file (sets model.weights)")
    p.add_argument(
        "--output-dir", metavar="DIR", help="output folder (sets output_dir; default: the recipe's)"
    )
    add_weights_args(p)
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted config overrides")
    return p


def flag_overrides(args: argparse.Namespace) -> list[str]:
    """The given flags as ``key=value`` overrides (values quoted, so a path stays a string).

    Args:
        args: namespace of :func:`build_parser`.

    Returns:
        One override per flag that was given (unset flags add nothing).
    """
    out = []
    for attr, key in FLAG_KEYS.items():
        value: Any = getattr(args, attr, None)
        if value is None or value is False:
            continue
        out.append(f"{key}={'true' if value is True else json.dumps(str(value))}")
    return out


def load_eval_config(tool: str, args: argparse.Namespace) -> tuple[dict, Path]:
    """Resolve ``--config``, apply the flags then the dotted overrides, check the tool.

    Args:
        tool: the evaluation (the recipe's ``evaluation`` key must name it).
        args: namespace of :func:`build_parser`.

    Returns:
        (resolved config, recipe path).

    Raises:
        ConfigError: unknown recipe, key or type (naming the key and file / override), or a
            recipe written for another tool.
    """
    path = find_config(args.config, KIND)
    cfg = load_config(path, flag_overrides(args) + list(args.overrides))
    if cfg["evaluation"] != tool:
        mine = [n for n in config_names(KIND) if _tool_of(n) == tool]
        raise ConfigError(
            f"config {path} is a recipe for '{cfg['evaluation'] or 'no tool'}', not for "
            f"'{tool}' (its recipes: {', '.join(mine)})"
        )
    return cfg, path


def _tool_of(name: str) -> str:
    try:
        return str(load_config(find_config(name, KIND))["evaluation"])
    except ConfigError:
        return ""

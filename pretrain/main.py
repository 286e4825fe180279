"""Command line for IMSVD pretraining (launched by tools/pretrain.sh through torchrun).

python -m pretrain.main --config configs/pretrain/imsvd_r50_100ep.yaml data.root=/imagenet/train
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pretrain.config import ConfigError, load_config, resolve_config_path

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "pretrain"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse ``--config FILE`` and trailing ``key.sub=value`` overrides."""
    parser = argparse.ArgumentParser(
        description="IMSVD pretraining",
        epilog="Overrides: dotted keys of the config, e.g. train.epochs=200 data.root=/data",
    )
    parser.add_argument(
        "--config", required=True, help="YAML recipe (path, or a name inside configs/pretrain/)"
    )
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = parse_args(argv)
    try:
        cfg = load_config(resolve_config_path(args.config, CONFIG_DIR), args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from pretrain.engine import train  # heavy imports after the config is known to be valid

    try:
        summary = train(cfg)
    except (ValueError, FileNotFoundError) as e:  # user errors: data paths, shapes, formats
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"pretraining {summary['status']} at step {summary['step']}", flush=True)
    if summary["backbone"]:
        print(f"backbone: {summary['backbone']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

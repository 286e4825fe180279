"""Command line for IMSVD pretraining (launched by tools/pretrain.sh through torchrun).

python -m pretrain.main --config imsvd_r50_100ep data.root=/imagenet/train
imsvd-pretrain --config imsvd_smoke --output-dir outputs/smoke train.max_steps=4

``--output-dir DIR`` sets ``checkpoint.output_dir``; giving both is an error, and so is an empty
or null folder (tools/pretrain.sh passes its ``--output-dir`` here, so the rule is the same for
both entry points). ``--check`` only checks: the config, the cross-field rules for
``--world-size`` processes and the data paths (tools/pretrain.sh runs it before torchrun).

A problem with the input or the environment (:class:`pretrain.errors.IMSVDError`: config, data,
checkpoint files, the run folder, a diverged run) is one ``error:`` line and exit status 2; any
other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from pretrain.config import ConfigError, find_config, load_config
from pretrain.errors import IMSVDError
from pretrain.log import LOGGER_NAME


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse ``--config NAME|FILE``, ``--output-dir DIR`` and ``key.sub=value`` overrides."""
    parser = argparse.ArgumentParser(
        description="IMSVD pretraining",
        epilog="Overrides: dotted keys of the config, e.g. train.epochs=200 data.root=/data",
    )
    parser.add_argument(
        "--config", required=True, help="YAML recipe (path, or a name inside configs/pretrain/)"
    )
    parser.add_argument(
        "--output-dir", metavar="DIR", help="run folder (sets checkpoint.output_dir)"
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="check the config, the overrides and the data paths, run nothing",
    )
    parser.add_argument(
        "--world-size",
        type=int,
        default=1,
        metavar="N",
        help="with --check: the processes the run will have (train.batch_size must divide)",
    )
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted overrides")
    return parser.parse_intermixed_args(argv)


OUTPUT_KEY = "checkpoint.output_dir"


def overrides_of(args: argparse.Namespace) -> list[str]:
    """The flags as ``key=value`` overrides (values quoted), then the dotted overrides.

    Raises:
        ConfigError: ``--output-dir`` empty or null, or given together with a
            ``checkpoint.output_dir=`` override (one place names the run folder).
    """
    flags = []
    if args.output_dir is not None:
        value = str(args.output_dir)
        if value.strip() in ("", "null", "Null", "NULL", "~"):
            raise ConfigError(f"--output-dir {value!r}: give the run folder (a path)")
        given = [o for o in args.overrides if o.split("=", 1)[0].strip() == OUTPUT_KEY]
        if given:
            raise ConfigError(
                f"--output-dir {value!r} and the override '{given[0]}' both name the run "
                "folder: give one of them"
            )
        flags.append(f"{OUTPUT_KEY}={json.dumps(value)}")
    return flags + list(args.overrides)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = parse_args(argv)
    try:
        cfg = load_config(find_config(args.config, "pretrain"), overrides_of(args))
    except IMSVDError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # heavy imports after the config is known to be valid
    from pretrain.data.images import max_image_pixels
    from pretrain.engine.preflight import preflight
    from pretrain.engine.trainer import train

    if args.check:
        try:
            preflight(cfg, args.world_size)
            max_image_pixels()
        except IMSVDError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0

    try:
        max_image_pixels()  # checked before any image is read
        summary = train(cfg)
    except IMSVDError as e:  # config values, data, checkpoints, run folder, a diverged run
        logging.getLogger(LOGGER_NAME).error("%s", e)  # also in OUTPUT_DIR/log.txt
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"pretraining {summary['status']} at step {summary['step']}", flush=True)
    if summary["backbone"]:
        print(f"backbone: {summary['backbone']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The pretraining command line: named recipes, --output-dir as checkpoint.output_dir, errors."""

from __future__ import annotations

from pretrain.config import find_config, load_config
from pretrain.main import main, overrides_of, parse_args


def test_output_dir_is_an_alias_of_checkpoint_output_dir():
    args = parse_args(["--config", "imsvd_smoke", "train.max_steps=1", "--output-dir", "o: 1"])
    assert args.config == "imsvd_smoke"
    cfg = load_config(find_config(args.config, "pretrain"), overrides_of(args))
    assert cfg["checkpoint"]["output_dir"] == "o: 1" and cfg["train"]["max_steps"] == 1
    # a dotted key given too wins (it comes after the flag)
    args = parse_args(["--config", "imsvd_smoke", "--output-dir", "a", "checkpoint.output_dir=b"])
    cfg = load_config(find_config(args.config, "pretrain"), overrides_of(args))
    assert cfg["checkpoint"]["output_dir"] == "b"


def test_config_errors_exit_2_and_name_the_problem(capsys):
    assert main(["--config", "no_such_recipe"]) == 2
    err = capsys.readouterr().err
    assert "no_such_recipe" in err and "imsvd_smoke" in err  # the shipped names are listed
    assert main(["--config", "imsvd_smoke", "train.epochz=3"]) == 2
    assert "unknown config key 'train.epochz'" in capsys.readouterr().err

"""The pretraining command line: named recipes, --output-dir as checkpoint.output_dir, errors."""

from __future__ import annotations

import pytest

from pretrain.config import find_config, load_config
from pretrain.main import main, overrides_of, parse_args


def test_output_dir_is_an_alias_of_checkpoint_output_dir():
    args = parse_args(["--config", "imsvd_smoke", "train.max_steps=1", "--output-dir", "o: 1"])
    assert args.config == "imsvd_smoke"
    cfg = load_config(find_config(args.config, "pretrain"), overrides_of(args))
    assert cfg["checkpoint"]["output_dir"] == "o: 1" and cfg["train"]["max_steps"] == 1
    for text in ("runs/run #2", "a: b", 'say "hi"', "it's"):  # the text arrives intact
        args = parse_args(["--config", "imsvd_smoke", "--output-dir", text])
        cfg = load_config(find_config(args.config, "pretrain"), overrides_of(args))
        assert cfg["checkpoint"]["output_dir"] == text


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--output-dir", "a", "checkpoint.output_dir=b"], "give one of them"),
        (["checkpoint.output_dir=b", "--output-dir", "a"], "give one of them"),
        (["--output-dir", ""], "--output-dir ''"),
        (["--output-dir", "null"], "--output-dir 'null'"),
        (["--output-dir", "~"], "--output-dir '~'"),
        (["checkpoint.output_dir="], "checkpoint.output_dir"),
        (["checkpoint.output_dir=null"], "checkpoint.output_dir"),
        (["checkpoint.output_dir=~/runs"], "checkpoint.output_dir"),
        (["data.root=~/imagenet"], "data.root"),
    ],
)
def test_run_folder_rules(argv, needle, capsys):
    assert main(["--config", "imsvd_smoke", "--check"] + argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and needle in err[0], err


def test_check_only_runs_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--config", "imsvd_smoke", "--check", "--output-dir", str(out)]) == 0
    assert not out.exists()


def test_config_errors_exit_2_and_name_the_problem(capsys):
    assert main(["--config", "no_such_recipe"]) == 2
    err = capsys.readouterr().err
    assert "no_such_recipe" in err and "imsvd_smoke" in err  # the shipped names are listed
    assert main(["--config", "imsvd_smoke", "train.epochz=3"]) == 2
    assert "unknown config key 'train.epochz'" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["1e9", "many", "0"])
def test_malformed_pixel_limit_is_one_error_line(tmp_path, capsys, monkeypatch, bad):
    monkeypatch.setenv("IMSVD_MAX_IMAGE_PIXELS", bad)
    out = tmp_path / "run"
    assert main(["--config", "imsvd_smoke", "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "IMSVD_MAX_IMAGE_PIXELS" in err[0]
    assert not out.exists()  # refused before the run folder is made


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["model.out_norm=batchnorm"], "config key 'model.out_norm': 'batchnorm' is not one of"),
        (["data.kind=imagefolder", "data.root=no/such/dir"], "data.root='no/such/dir' does not"),
        (["data.kind=list", "data.list_file=nope.txt"], "data.list_file='nope.txt'"),
        (["eval.every_steps=2", "eval.bank_root=b", "eval.query_root=q"], "eval.bank_root='b'"),
        (["--world-size", "3"], "global batch 16 must be a positive multiple of the number of"),
    ],
)
def test_check_finds_what_would_stop_every_process(tmp_path, capsys, monkeypatch, extra, needle):
    """--check (tools/pretrain.sh runs it before torchrun) catches the cross-field rules for the
    run's process count and the missing data paths, not only the schema."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    assert main(["--config", "imsvd_smoke", "--check", "--output-dir", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and needle in err[0], err
    assert not out.exists()
    assert main(["--config", "imsvd_smoke", "--check", "--world-size", "4"]) == 0  # 16 / 4

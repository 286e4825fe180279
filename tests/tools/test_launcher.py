"""tools/pretrain.sh: caller-relative paths, config errors before torchrun, signal forwarding."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import REPO, free_port

from pretrain.checkpoint import latest_checkpoint, load_training_state

LAUNCHER = REPO / "tools" / "pretrain.sh"
SMOKE = REPO / "configs" / "pretrain" / "imsvd_smoke.yaml"


def _env(**extra: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "NPROC_PER_NODE": "1"}
    env.update(extra)
    return env


def _processes_mentioning(text: str) -> list[tuple[int, str]]:
    """Live processes whose command line contains ``text`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmdline and state != "Z":
            found.append((int(entry.name), cmdline))
    return found


def test_bad_key_in_relative_config_is_reported_without_traceback(tmp_path):
    """A relative config path from another directory resolves; its bad key is the only error."""
    (tmp_path / "mine.yaml").write_text(f"_base_: {SMOKE}\ntrain:\n  bogus_key: 3\n")
    res = subprocess.run(
        ["bash", str(LAUNCHER), "mine.yaml", "--output-dir", "out"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
    )
    out = res.stdout + res.stderr
    assert res.returncode == 2, out
    assert "unknown config key 'train.bogus_key'" in res.stderr
    assert str(tmp_path / "mine.yaml") in res.stderr  # the file the key came from
    assert "Traceback" not in out and "torch.distributed" not in out
    assert not (tmp_path / "out").exists()  # nothing started


def test_bad_override_is_reported_before_launch(tmp_path):
    res = subprocess.run(
        ["bash", str(LAUNCHER), str(SMOKE), "train.epochs=many"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
    )
    assert res.returncode == 2
    assert "train.epochs" in res.stderr and "Traceback" not in res.stdout + res.stderr


def test_missing_config_names_what_was_looked_for(tmp_path):
    res = subprocess.run(
        ["bash", str(LAUNCHER), "no_such_recipe.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
    )
    assert res.returncode == 2
    assert "no_such_recipe.yaml" in res.stderr and "not found" in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGUSR1 to the launcher", "Ctrl-C to the process group"])
def test_a_stop_signal_checkpoints_and_exits_cleanly(tmp_path, how):
    """SIGUSR1 to the launcher, or SIGINT to every process as a terminal's Ctrl-C sends it
    (torchrun must not catch it and kill the workers), reaches the trainer: checkpoint, exit
    0, no orphaned worker."""
    work = tmp_path / "cwd"
    work.mkdir()
    (work / "recipe.yaml").write_text(f"_base_: {SMOKE}\n")
    proc = subprocess.Popen(
        [
            "bash",
            str(LAUNCHER),
            "recipe.yaml",  # relative to the caller's directory
            "train.epochs=50",
            "checkpoint.every_steps=0",
            "--output-dir",
            "rel_out",  # relative to the caller's directory
        ],
        cwd=work,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_env(MASTER_PORT=str(free_port())),
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )
    lines = []
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if " step 1/" in line:
                break
        assert any(" step 1/" in ln for ln in lines), "".join(lines)[-3000:]
        if how.startswith("SIGUSR1"):
            proc.send_signal(signal.SIGUSR1)
        else:
            os.killpg(proc.pid, signal.SIGINT)
        rest, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = "".join(lines) + rest
    out = work / "rel_out"
    assert proc.returncode == 0, text[-3000:]
    assert "preempted" in text
    sent = "SIGUSR1" if how.startswith("SIGUSR1") else "SIGTERM"  # SIGINT is sent as SIGTERM
    assert f"{sent} sent to the training processes" in text
    assert "Traceback" not in text
    state = load_training_state(latest_checkpoint(out))
    assert 1 <= state["step"] < 100  # stopped early, at a step boundary
    # no worker survives its launcher (it would otherwise keep training)
    time.sleep(1.0)
    assert _processes_mentioning(str(out)) == []


def _launch_recorded(tmp_path, *args, home=None):
    """Run the launcher with a PYTHON that runs the config check for real but records the
    torchrun command instead of training; returns (result, config the workers would load)."""
    import shlex
    import sys

    record = tmp_path / "argv.bin"
    fake = tmp_path / "python"
    real = shlex.quote(sys.executable)
    fake.write_text(
        "#!/usr/bin/env bash\n"
        f'if [ "$1" = -m ] && [ "$2" = pretrain.main ]; then exec {real} "$@"; fi\n'
        f"printf '%s\\0' \"$@\" > {shlex.quote(str(record))}\n"
    )
    fake.chmod(0o755)
    work = tmp_path / "cwd"
    work.mkdir(exist_ok=True)
    env = _env(PYTHON=str(fake), HOME=str(home or tmp_path / "home"))
    res = subprocess.run(["bash", str(LAUNCHER), str(SMOKE), *args], cwd=work,
                         capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    if res.returncode != 0 or not record.exists():
        return res, None
    argv = record.read_bytes().decode().split("\0")[:-1]
    worker = argv[argv.index("pretrain.main") + 1 :]
    from pretrain.config import find_config, load_config
    from pretrain.main import overrides_of, parse_args

    parsed = parse_args(worker)
    return res, load_config(find_config(parsed.config, "pretrain"), overrides_of(parsed))


@pytest.mark.parametrize("name", ["run #2", "a: b", 'say "hi"', "it's", "x #y: z", "#start"])
def test_values_arrive_intact(tmp_path, name):
    res, cfg = _launch_recorded(tmp_path, "--output-dir", f"runs/{name}", f"data.root=imgs {name}",
                                f"log.wandb_project={name}")  # fmt: skip
    assert res.returncode == 0, res.stderr
    work = tmp_path / "cwd"
    assert cfg["checkpoint"]["output_dir"] == f"{work}/runs/{name}"
    assert cfg["data"]["root"] == f"{work}/imgs {name}"
    assert cfg["log"]["wandb_project"] == name  # a free-text key (projector specs are checked)


def test_leading_tilde_is_home_or_refused(tmp_path):
    home = tmp_path / "home"
    res, cfg = _launch_recorded(tmp_path, "--output-dir", "~/runs/a", "data.root=~", home=home)
    assert res.returncode == 0, res.stderr
    assert cfg["checkpoint"]["output_dir"] == f"{home}/runs/a" and cfg["data"]["root"] == str(home)
    res, cfg = _launch_recorded(tmp_path, "data.root=~someone/imgs")
    assert res.returncode == 2 and cfg is None and "~someone/imgs" in res.stderr


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--output-dir", ""], "--output-dir"),
        (["--output-dir", "null"], "--output-dir"),
        (["checkpoint.output_dir="], "checkpoint.output_dir"),
        (["checkpoint.output_dir=null"], "checkpoint.output_dir"),
        (["checkpoint.output_dir=b", "--output-dir", "a"], "give one of them"),
        (["--output-dir", "a", "checkpoint.output_dir=b"], "give one of them"),
        (["--output-dir", "a", "--output-dir", "b"], "given twice"),
    ],
)
def test_run_folder_rules_are_those_of_imsvd_pretrain(tmp_path, args, needle):
    res, cfg = _launch_recorded(tmp_path, *args)
    assert res.returncode == 2 and cfg is None, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], lines
    assert "Traceback" not in res.stderr


def test_a_failing_training_process_is_one_error_and_status_2(tmp_path):
    """An error only the training processes meet (a data root without images) is their error
    line and status 2 from the launcher, not torchrun's traceback and status 1."""
    (tmp_path / "empty" / "c0").mkdir(parents=True)
    argv = ["bash", str(LAUNCHER), str(SMOKE), "--output-dir", str(tmp_path / "run"),
            "data.kind=imagefolder", f"data.root={tmp_path / 'empty'}"]  # fmt: skip
    res = subprocess.run(argv, capture_output=True, text=True, env=_env(), timeout=300)
    assert res.returncode == 2, res.stderr
    assert "error: data root" in res.stderr and "no images" in res.stderr
    assert "Traceback" not in res.stderr and "ChildFailedError" not in res.stderr
    assert "failed (rank 0: status 2) (its error is above)" in res.stderr

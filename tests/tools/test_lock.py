"""The lock (constraints.txt): it pins every package the set-up asks for, within the ranges that
setup.cfg and the installers state, and tools/lock_check.py finds what is installed off it."""

from __future__ import annotations

import configparser
import re
from importlib.metadata import version

from helpers import REPO, load_tool
from packaging.requirements import Requirement
from packaging.version import Version

lock_check = load_tool("lock_check")
# Built from sdists by the installers (hash-pinned there), or this package itself.
SOURCE_BUILDS = {"imsvd", "pb1-detectron2", "mmcv", "mmdet", "mmengine"}


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _lock() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text(encoding="utf-8").splitlines():
        spec = line.split("#")[0].strip()
        if spec:
            name, sep, pinned = spec.partition("==")
            assert sep and pinned, f"constraints.txt: {line!r} is not an exact pin"
            pins[_canonical(name)] = pinned
    return pins


def _requested() -> list[Requirement]:
    """What the set-up asks pip for: setup.cfg's requirements and extras, and the installers'."""
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    lines = cfg["options"]["install_requires"].splitlines()
    for extra in ("dev", "detectron2"):
        lines += cfg["options.extras_require"][extra].splitlines()
    lines += load_tool("install_detectron2").RUNTIME_REQUIREMENTS
    lines += load_tool("install_mmdet").RUNTIME_REQUIREMENTS
    lines += ["torch==2.14.1", "torchvision==0.29.1"]  # tools/setup_env.sh
    return [Requirement(x) for x in lines if x.strip() and not x.strip().startswith("#")]


def test_the_lock_pins_every_requested_package_within_its_range():
    pins = _lock()
    assert not SOURCE_BUILDS & set(pins), "source builds are pinned by their installers"
    for req in _requested():
        name = _canonical(req.name)
        assert name in pins, f"{req} is not in constraints.txt"
        assert req.specifier.contains(
            Version(pins[name]), prereleases=True
        ), f"constraints.txt pins {name}=={pins[name]}, outside {req}"


def test_lock_check_reports_installed_packages_off_the_lock():
    have = version("pytest")
    text = (
        "# a comment\n"
        f"pytest=={have}\n"
        "numpy==0.0.1  # installed, another version\n"
        "surely-not-an-installed-package==1.0\n"
    )
    assert lock_check.off_lock(text) == ["numpy==0.0.1"]


def test_lock_check_accepts_a_local_label_against_a_plain_pin(monkeypatch):
    installed = {"torch": "2.14.1+cpu", "torchvision": "0.29.1", "numpy": "2.4.6+local"}
    monkeypatch.setattr(lock_check, "version", lambda name: installed[name])
    text = "torch==2.14.1\ntorchvision==0.29.2\nnumpy==2.4.6+other\n"
    assert lock_check.off_lock(text) == ["torchvision==0.29.2", "numpy==2.4.6+other"]

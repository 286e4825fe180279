"""The tests mirror the packages, and pytest collects every test file of the tree."""

from __future__ import annotations

import subprocess
import sys

from helpers import REPO

TESTS = REPO / "tests"


def _packages(root: str) -> set[str]:
    """Sub-package folders of ``root`` (relative, e.g. ``pretrain/models``), configs left out."""
    return {
        str(init.parent.relative_to(REPO))
        for init in (REPO / root).rglob("__init__.py")
        if init.parent != REPO / root and "configs" not in init.parts
    }


def test_every_package_has_its_test_folder():
    packages = _packages("pretrain") | _packages("transfer")
    assert {"pretrain/dist", "pretrain/engine", "transfer/detection/d2"} <= packages
    missing = sorted(p for p in packages - {"transfer/detection"} if not (TESTS / p).is_dir())
    assert not missing, f"no tests/<package> folder for {missing}"
    for p in packages - {"transfer/detection"}:
        assert list((TESTS / p).glob("test_*.py")), f"tests/{p} holds no test file"


def test_pytest_collects_every_test_file():
    # pytest skips folders named like build outputs ("dist", "build") unless told otherwise
    files = {str(p.relative_to(REPO)) for p in TESTS.rglob("test_*.py")}
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    collected = {line.split("::")[0] for line in res.stdout.splitlines() if "::" in line}
    assert "tests/pretrain/dist/test_dist.py" in files
    assert files == collected, sorted(files ^ collected)

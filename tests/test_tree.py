"""The tests mirror the packages, pytest collects every test file of the tree, and the code stays
in readable pieces (module and function sizes, the tests' own included)."""

from __future__ import annotations

import ast
import subprocess
import sys

from helpers import REPO

TESTS = REPO / "tests"
CODE = ("pretrain", "transfer", "tools", "benchmarks")
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60  # from ``def`` to its last line, docstring included


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


def oversized(path) -> list[str]:
    """What in one file is over the limits: "file: N lines", "file:LINE name(): N lines"."""
    text = path.read_text(encoding="utf-8")
    rel = path.relative_to(REPO)
    found = []
    if text.count("\n") > MAX_MODULE_LINES:
        found.append(f"{rel}: {text.count(chr(10))} lines")
    for node in ast.walk(ast.parse(text, filename=str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            if length > MAX_FUNCTION_LINES:
                found.append(f"{rel}:{node.lineno} {node.name}(): {length} lines")
    return found


def test_oversized_finds_long_modules_and_functions(tmp_path, monkeypatch):
    f = tmp_path / "m.py"
    body = "".join(f"    x{i} = {i}\n" for i in range(60))
    f.write_text("def short():\n    pass\n\n\ndef long():\n" + body + "\n" * 400)
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    assert oversized(f) == ["m.py: 465 lines", "m.py:5 long(): 61 lines"]


def test_no_module_over_400_lines_and_no_function_over_60():
    files = [p for root in (*CODE, "tests") for p in sorted((REPO / root).rglob("*.py"))]
    assert len(files) > 100
    found = [hit for p in files for hit in oversized(p)]
    assert not found, found

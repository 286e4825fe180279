"""Shared steps of the source-build installers ``install_detectron2.py`` and ``install_mmdet.py``.

Both download a pinned sdist with pip, check its SHA-256, extract it safely, apply a few edits
that must each match exactly, build a wheel with ``pip wheel --no-build-isolation`` and keep it
in a cache folder shared by the two (``$IMSVD_CACHE/wheels``, default ``~/.cache/imsvd/wheels``).
Standard library only, so any Python 3 can run the installers.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple


class InstallError(RuntimeError):
    """Raised when a step of an install recipe cannot be completed."""


def log(tool: str, msg: str) -> None:
    """Print a progress line prefixed with the installer's name."""
    print(f"[{tool}] {msg}", flush=True)


def run(tool: str, cmd: Sequence[str], **kwargs) -> subprocess.CompletedProcess:
    """Run a command, echoing it, and raise InstallError if it fails.

    Args:
        tool: installer name for the echo line.
        cmd: argument list.
        **kwargs: passed to subprocess.run.

    Returns:
        The completed process.
    """
    log(tool, "$ " + " ".join(str(c) for c in cmd))
    proc = subprocess.run(list(cmd), **kwargs)
    if proc.returncode != 0:
        raise InstallError(f"command failed with exit code {proc.returncode}: {' '.join(cmd)}")
    return proc


def for_tool(tool: str) -> Tuple[Callable[[str], None], Callable[..., subprocess.CompletedProcess]]:
    """An installer's ``log(msg)`` and ``run(cmd, **kwargs)``: :func:`log` and :func:`run` with
    its name."""
    return functools.partial(log, tool), functools.partial(run, tool)


def exit_with(tool: str, main: Callable[[], int]) -> None:
    """Run an installer's ``main()`` and exit with its code; an :class:`InstallError` is one
    ``TOOL: error: ...`` line on stderr and exit code 1 (anything else keeps its traceback)."""
    try:
        code = main()
    except InstallError as exc:
        print(f"{tool}: error: {exc}", file=sys.stderr)
        code = 1
    sys.exit(code)


def probe_import(python: str, code: str) -> Optional[str]:
    """Run ``code`` in the target interpreter; return the last line it printed, or None if it fails.

    Args:
        python: path of the target interpreter.
        code: Python source that imports the package and prints its version.

    Returns:
        The version line ("unknown" if nothing was printed), or None when the code raises.
    """
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        return None
    out = proc.stdout.strip()
    return out.splitlines()[-1] if out else "unknown"


def torch_tag(python: str) -> str:
    """Return the target's torch release (without a local label), e.g. "2.14.1".

    Args:
        python: target interpreter.

    Returns:
        The release string.

    Raises:
        InstallError: when torch does not import there (it must be installed first).
    """
    proc = subprocess.run(
        [python, "-c", "import torch; print(torch.__version__.split('+')[0])"],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise InstallError(f"torch does not import with {python}; install torch first")
    return proc.stdout.strip()


def python_tag(python: str) -> str:
    """Return the CPython wheel tag of the target interpreter, e.g. "cp311"."""
    proc = subprocess.run(
        [python, "-c", "import sys; print(f'cp{sys.version_info[0]}{sys.version_info[1]}')"],
        capture_output=True,
        text=True,
        check=True,
    )
    return proc.stdout.strip()


def sha256_of(path: Path) -> str:
    """Return the lowercase hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify(path: Path, hashes: Dict[str, str]) -> str:
    """Check a downloaded file against the recorded SHA-256 of its name.

    Args:
        path: the file; its name selects the expected hash.
        hashes: file name -> expected hex SHA-256.

    Returns:
        The verified digest.

    Raises:
        InstallError: on a file name without a recorded hash, or a mismatch.
    """
    expected = hashes.get(path.name)
    if expected is None:
        raise InstallError(f"{path}: no recorded hash for this file name")
    got = sha256_of(path)
    if got != expected:
        raise InstallError(
            f"{path}: SHA-256 {got} does not match the expected {expected}; refusing to use it"
        )
    return got


def replace_exact(text: str, old: str, new: str, path: str, count: int = 1) -> str:
    """Source edit that must find ``old`` exactly ``count`` times (a different file is an error).

    Raises:
        InstallError: naming ``path``, the text looked for and how often it was found.
    """
    found = text.count(old)
    if found != count:
        raise InstallError(f"patch of {path}: expected {count} x {old!r}, found {found}")
    return text.replace(old, new)


def cache_dir() -> Path:
    """The wheel cache: ``$IMSVD_CACHE/wheels`` (default ``~/.cache/imsvd/wheels``)."""
    return Path(os.environ.get("IMSVD_CACHE", Path.home() / ".cache" / "imsvd")) / "wheels"


def extract(archive: Path, dest: str) -> None:
    """Extract a .tar.gz sdist into ``dest``; refuses links and paths outside it (3.11.4+)."""
    with tarfile.open(archive, "r:gz") as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, filter="data")
        else:
            tar.extractall(dest)


def build_into_cache(
    tool: str, python: str, src: Path, build_out: Path, out_dir: Path, env: Dict[str, str]
) -> Path:
    """Build one wheel from a source tree and move it into the cache atomically.

    Args:
        tool: installer name for the log.
        python: interpreter whose pip / setuptools build the wheel (no build isolation, so the
            installed torch is the one compiled against).
        src: the extracted, patched source tree.
        build_out: scratch folder for pip's output.
        out_dir: the wheel cache.
        env: environment of the build.

    Returns:
        The cached wheel's path (copied under a temporary name, then renamed, so a crash never
        leaves a truncated wheel in the cache).
    """
    run(
        tool,
        [python, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
         str(build_out), str(src)],
        env=env,
    )  # fmt: skip
    wheels = list(build_out.glob("*.whl"))
    if len(wheels) != 1:
        raise InstallError(f"expected one wheel in {build_out}, found {wheels}")
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / wheels[0].name
    partial = out_dir / (wheels[0].name + ".partial")
    shutil.copyfile(wheels[0], partial)
    os.replace(partial, final)
    return final

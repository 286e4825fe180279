#!/usr/bin/env python3
"""Install MMDetection 3.3.0 (with mmengine 0.10.7 and mmcv 2.1.0 built with its C++ ops).

MMDetection 3.3.0 needs ``mmcv>=2.0.0rc4,<2.2.0``; mmcv 2.1.0 is published as an sdist only, so
its C++ ops (RoIAlign, NMS, ... used by Mask R-CNN) are compiled here, for CPU by default. The
recipe:

1. skip everything when ``import mmdet, mmcv.ops`` already works in the target Python (for
   example an mmcv the user built with CUDA ops);
2. download the two wheels (mmengine, mmdet) and the mmcv sdist with pip and check each file's
   SHA-256 against the value recorded below;
3. reuse the cached mmcv wheel for this recipe, torch version and Python, or build it: extract
   the sdist, apply the edits of ``mmcv_patches()`` (tools/mmcv_patches.py) and compile the ops with
   ``MMCV_WITH_OPS=1 FORCE_CUDA=0``, then cache the wheel. Two op sets (``--ops``):

   - ``shipped`` (the default set-up's): only the C++ ops the toolkit's MMDetection configs run
     (``SHIPPED_OPS``: NMS and RoIAlign, plus mmcv's build-info functions), 6 C++ files, about
     3 minutes on 2 cores. mmcv's op loader is edited so that an op outside the set raises
     ``RuntimeError`` naming the op and ``make setup-mmdet`` when it is called (it asserts at
     import today, so every op must otherwise be present);
   - ``all`` (``make setup-mmdet``): every CPU op of mmcv, 77 C++ files, the long build.

   A cached ``all`` wheel is preferred when both exist;
4. install the runtime dependencies first (``opencv-python-headless`` in place of the
   ``opencv-python`` that mmengine names, so no GUI libraries are needed), then the three
   packages without their dependency lists.

The cache is ``$IMSVD_CACHE/wheels`` (default ``~/.cache/imsvd/wheels``), shared with
``install_detectron2.py``. The mmcv wheel carries a local version label naming this recipe and
the torch release it was compiled against (``2.1.0+imsvd.1.torch2.14.1``), so a wheel built for
another torch is never reused; ``mmcv.__version__`` stays ``2.1.0``.

Usage::

    python3 tools/install_mmdet.py [--python .venv/bin/python] [--ops shipped|all] [--jobs N]
                                   [--force] [--rebuild] [--wait] [--cached-only]

Exit codes: 0 installed (or already working), 1 error, 3 deferred: another process is building
mmcv into the same cache right now (``--wait`` waits for it instead), 4 skipped: ``--cached-only``
and no cached mmcv wheel. Measured on a 2-core machine: the ``all`` build 1939 s with
``--jobs 2``; the install from a cached wheel 23 s.

This script uses the standard library only, so any Python 3 can run it.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Optional, Sequence

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import wheel_cache  # noqa: E402  (tools/ is not a package)
from mmcv_patches import mmcv_patches  # noqa: E402
from wheel_cache import InstallError  # noqa: E402

TOOL = "install_mmdet"

SKIPPED = 4
BUILD_MINUTES = {"all": 32, "shipped": 3}  # measured cold builds on 2 cores (module docstring)
MMENGINE_VERSION = "0.10.7"
MMDET_VERSION = "3.3.0"
MMCV_VERSION = "2.1.0"
# SHA-256 of the files as served by PyPI.
HASHES: Dict[str, str] = {
    # 452720 bytes
    "mmengine-0.10.7-py3-none-any.whl": (
        "262ac976a925562f78cd5fd14dd1bc9b680ed0aa81f0d85b723ef782f99c54ee"
    ),
    # 2231444 bytes
    "mmdet-3.3.0-py3-none-any.whl": (
        "2e23e291281ac57e7dccf8678e957da45fbe560ce78a1f5ded6afeccd3730f17"
    ),
    # 471435 bytes
    "mmcv-2.1.0.tar.gz": "d387bcab66b467479b6660310e23746cfc79c6e57acf04094680adb499a5cd3f",
}
# Exit code when another process is building mmcv into the same cache (nothing was installed).
DEFERRED = 3
# Bump when mmcv_patches() change: it is part of the cached wheel's name (the shipped-ops wheels
# add ".shipped", so the all-ops wheels built before the shipped set existed stay valid).
RECIPE = "imsvd.1"
OP_SETS = ("shipped", "all")
# Runtime needs of the three packages (their own lists, with opencv-python swapped for the
# headless build and OpenCV kept below 5, which mmcv 2.1.0 predates).
RUNTIME_REQUIREMENTS = [
    "addict",
    "matplotlib",
    "numpy",
    "packaging",
    "Pillow",
    "pyyaml",
    "rich",
    "termcolor",
    "yapf",
    "opencv-python-headless>=4.5,<5",
    "pycocotools",
    "scipy",
    "shapely",
    "six",
    "terminaltables",
    "tqdm",
]

log, run = wheel_cache.for_tool(TOOL)  # progress lines and echoed commands


def mmdet_works(python: str) -> Optional[str]:
    """Return "mmdet X / mmcv Y / mmengine Z" if the mmcv ops run in the target Python, else None.

    Y is mmcv's distribution version, with the local label of this recipe's wheels
    ("2.1.0+imsvd.1.shipped.torch2.14.1"), so a shipped-ops build can be told from a full one.

    Args:
        python: path of the target interpreter.

    Returns:
        A version string, or None when the imports fail.
    """
    # The compiled ops are run, not only imported: NMS keeps the higher of two overlapping boxes,
    # RoIAlign of a constant map is that constant.
    probe = (
        "import importlib.metadata as md, torch, mmdet, mmcv, mmengine\n"
        "from mmcv.ops import batched_nms, roi_align\n"
        "b = torch.tensor([[0., 0., 10., 10.], [1., 1., 10., 10.], [20., 20., 30., 30.]])\n"
        "_, keep = batched_nms(b, torch.tensor([0.9, 0.8, 0.7]), torch.zeros(3), "
        "dict(iou_threshold=0.5))\n"
        "assert keep.tolist() == [0, 2], keep\n"
        "out = roi_align(torch.full((1, 1, 8, 8), 3.), torch.tensor([[0., 1., 1., 6., 6.]]), "
        "(2, 2), 1.0, 2, 'avg', True)\n"
        "assert torch.allclose(out, torch.full_like(out, 3.)), out\n"
        'print(f\'mmdet {mmdet.__version__} / mmcv {md.version("mmcv")} / '
        "mmengine {mmengine.__version__}')"
    )
    return wheel_cache.probe_import(python, probe)


def verify(path: Path) -> None:
    """Check a downloaded file against HASHES.

    Args:
        path: the file; its name selects the expected hash.

    Raises:
        InstallError: on an unknown file name or a hash mismatch.
    """
    wheel_cache.verify(path, HASHES)
    log(f"hash verified: {path.name}")


def fetch(python: str, cache_dir: Path, need_sdist: bool) -> Dict[str, Path]:
    """Make sure the two wheels (and, if needed, the mmcv sdist) are in the cache, verified.

    Files already in the cache are only re-hashed, so a second run needs no network. Preparing
    the sdist's metadata runs its setup.py in pip's isolated environment; that setup.py imports
    pkg_resources, so a constraint keeps setuptools below 81 there (for that step only).

    Args:
        python: interpreter whose pip downloads.
        cache_dir: the wheel cache.
        need_sdist: also fetch the mmcv sdist (only when mmcv must be built).

    Returns:
        File name -> path for the files fetched.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    wanted = {
        f"mmengine-{MMENGINE_VERSION}-py3-none-any.whl": [
            "--only-binary", ":all:", f"mmengine=={MMENGINE_VERSION}"
        ],
        f"mmdet-{MMDET_VERSION}-py3-none-any.whl": [
            "--only-binary", ":all:", f"mmdet=={MMDET_VERSION}"
        ],
    }  # fmt: skip
    if need_sdist:
        wanted[f"mmcv-{MMCV_VERSION}.tar.gz"] = ["--no-binary", ":all:", f"mmcv=={MMCV_VERSION}"]
    files = {}
    for name, spec in wanted.items():
        path = cache_dir / name
        if not path.is_file():
            with tempfile.TemporaryDirectory(prefix="mmdl-") as tmp:
                constraint = Path(tmp) / "build-constraints.txt"
                constraint.write_text("setuptools<81\n", encoding="utf-8")
                env = dict(os.environ, PIP_CONSTRAINT=str(constraint), MMCV_WITH_OPS="1")
                run([python, "-m", "pip", "download", "--no-deps", *spec, "-d", tmp], env=env)
                got = Path(tmp) / name
                if not got.is_file():
                    raise InstallError(f"pip download did not produce {name}")
                verify(got)
                partial = cache_dir / (name + ".partial")
                shutil.copyfile(got, partial)
                os.replace(partial, path)
        verify(path)
        files[name] = path
    return files


def local_label(ops: str, torch_release: str) -> str:
    """The "+..." version label of this recipe's mmcv wheel, e.g. "+imsvd.1.shipped.torch2.14.1".

    Args:
        ops: "all" or "shipped" (OP_SETS).
        torch_release: the torch it is compiled against.
    """
    return f"+{RECIPE}{'.shipped' if ops == 'shipped' else ''}.torch{torch_release}"


def cached_wheel(cache_dir: Path, python: str, ops: str) -> Optional[Path]:
    """The cached mmcv wheel for this recipe, torch and Python: the ``all`` one if there is one,
    else (``ops="shipped"``) the shipped one; None when neither is cached.
    """
    release, tag = wheel_cache.torch_tag(python), wheel_cache.python_tag(python)
    for kind in ("all",) if ops == "all" else ("all", "shipped"):
        found = sorted(
            cache_dir.glob(f"mmcv-{MMCV_VERSION}{local_label(kind, release)}-{tag}-*.whl")
        )
        if found:
            return found[-1]
    return None


def build_mmcv(python: str, sdist: Path, out_dir: Path, ops: str, jobs: int) -> Path:
    """Extract, patch and compile mmcv (ops for CPU) into a wheel placed in out_dir.

    Args:
        python: interpreter (with torch) that builds the wheel.
        sdist: the verified mmcv sdist.
        out_dir: the wheel cache.
        ops: "all" or "shipped" (OP_SETS): which C++ ops are compiled.
        jobs: parallel compile jobs (MAX_JOBS).

    Returns:
        Path of the cached wheel.
    """
    with tempfile.TemporaryDirectory(prefix="mmcvbuild-") as tmp:
        wheel_cache.extract(sdist, tmp)
        src = Path(tmp) / f"mmcv-{MMCV_VERSION}"
        patches = mmcv_patches(local_label(ops, wheel_cache.torch_tag(python)), ops)
        for rel, fn in patches:
            path = src / rel
            path.write_text(fn(path.read_text(encoding="utf-8"), rel), encoding="utf-8")
        log(f"applied {len(patches)} source edits")
        env = dict(
            os.environ,
            MMCV_WITH_OPS="1",
            FORCE_CUDA="0",
            MAX_JOBS=str(jobs),
            # A GPU on the build machine must not switch setup.py to a CUDA build.
            CUDA_VISIBLE_DEVICES="",
        )
        start = time.monotonic()
        final = wheel_cache.build_into_cache(TOOL, python, src, Path(tmp) / "dist", out_dir, env)
        log(f"mmcv ({ops} ops) built in {time.monotonic() - start:.0f} s with {jobs} job(s)")
    return final


def build_parser() -> argparse.ArgumentParser:
    """The command line of this script (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--python",
        default=os.environ.get("IMSVD_PYTHON", ".venv/bin/python"),
        help="interpreter of the target environment (default: $IMSVD_PYTHON or .venv/bin/python)",
    )
    parser.add_argument(
        "--ops",
        choices=OP_SETS,
        default="shipped",
        help="mmcv C++ ops to compile: those of the toolkit's MMDetection configs (shipped, "
        f"about {BUILD_MINUTES['shipped']} min on 2 cores; the default) or all of them (about "
        f"{BUILD_MINUTES['all']} min)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=int(os.environ.get("MAX_JOBS", "0")) or (os.cpu_count() or 1),
        help="parallel compile jobs for mmcv (default: $MAX_JOBS or the number of CPUs)",
    )
    parser.add_argument("--force", action="store_true", help="install even if mmdet imports")
    parser.add_argument(
        "--wait",
        action="store_true",
        help=f"wait for a build in progress in the same cache (default: exit {DEFERRED})",
    )
    parser.add_argument(
        "--rebuild", action="store_true", help="ignore the cached mmcv wheel and build it again"
    )
    parser.add_argument(
        "--cached-only",
        action="store_true",
        help=f"install only from a cached mmcv wheel; without one, skip (exit {SKIPPED}) "
        "instead of compiling",
    )
    return parser


def provide_wheel(python: str, cache_dir: Path, args: argparse.Namespace) -> Optional[Path]:
    """The mmcv wheel to install: cached, or built now (one build at a time per cache).

    Returns:
        The wheel, or None when another process holds the build lock and ``--wait`` is not set
        (a set-up that finds a build in progress does not start a second one on the same cores).
    """
    with open(cache_dir / ".mmcv-build.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not args.wait:
                log(f"another install is building mmcv into {cache_dir}: deferred (exit 3)")
                return None
            log(f"another install is building mmcv into {cache_dir}; waiting for it")
            fcntl.flock(lock, fcntl.LOCK_EX)
        cached = None if args.rebuild else cached_wheel(cache_dir, python, args.ops)
        files = fetch(python, cache_dir, need_sdist=cached is None)
        if cached is not None:
            log(f"reusing cached wheel {cached}")
            return cached
        sdist = files[f"mmcv-{MMCV_VERSION}.tar.gz"]
        wheel = build_mmcv(python, sdist, cache_dir, args.ops, args.jobs)
        log(f"built and cached {wheel}")
        return wheel


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point: see the module docstring.

    Args:
        argv: command-line arguments (defaults to sys.argv[1:]).

    Returns:
        Process exit code.
    """
    args = build_parser().parse_args(argv)
    t0 = time.monotonic()
    python = args.python
    if shutil.which(python) is None and not Path(python).is_file():
        raise InstallError(f"target python {python!r} not found")
    version = None if args.force else mmdet_works(python)
    if version is not None and not (args.ops == "all" and ".shipped." in version):
        log(f"{version} already importable by {python}; nothing to do")
        return 0
    cache_dir = wheel_cache.cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    if args.cached_only and cached_wheel(cache_dir, python, args.ops) is None:
        log(
            f"no cached mmcv wheel in {cache_dir}: MMDetection not installed, its tests skip "
            f"(`make setup-mmdet` builds it: about {BUILD_MINUTES[args.ops]} minutes on 2 cores)"
        )
        return SKIPPED
    # Dependencies first: the mmcv build reads which OpenCV distribution is installed.
    run([python, "-m", "pip", "install", "-q", *RUNTIME_REQUIREMENTS])
    mmcv_wheel = provide_wheel(python, cache_dir, args)
    if mmcv_wheel is None:
        return DEFERRED
    files = fetch(python, cache_dir, need_sdist=False)
    run(
        [python, "-m", "pip", "install", "--force-reinstall", "--no-deps", str(mmcv_wheel),
         str(files[f"mmengine-{MMENGINE_VERSION}-py3-none-any.whl"]),
         str(files[f"mmdet-{MMDET_VERSION}-py3-none-any.whl"])]
    )  # fmt: skip
    version = mmdet_works(python)
    if version is None:
        raise InstallError(f"mmdet / mmcv.ops were installed but do not work with {python}")
    log(f"{version} installed into {python} in {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    wheel_cache.exit_with(TOOL, main)

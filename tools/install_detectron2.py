#!/usr/bin/env python3
"""Install Detectron2 (pure-Python build of v0.6) into a virtual environment.

Detectron2 is not published on PyPI under its own name. The sdist ``pb1-detectron2==0.6`` holds
the upstream v0.6 Python sources without the C++ extension sources and without the model-zoo
YAMLs in its wheel. This script turns it into a working, pure-Python wheel:

1. skip everything when ``import detectron2`` already works in the target Python (for example an
   upstream Detectron2 the user built with CUDA ops);
2. otherwise reuse a cached wheel, or download the sdist with pip, verify its SHA-256, apply a
   few small compatibility edits (listed in ``PATCHES``), build the wheel without extension
   modules and cache it;
3. install the wheel plus its pure-Python runtime dependencies into the target Python.

The C++ ops (deformable conv, rotated boxes, the fast COCO evaluator) are absent in this build;
Mask R-CNN / Faster R-CNN R50-C4 and FPN need none of them (ROIAlign and NMS come from
torchvision) and ``transfer/train_net.py`` selects the official COCO API evaluator.

Usage::

    python3 tools/install_detectron2.py [--python .venv/bin/python] [--sdist FILE] [--force]

Environment: ``IMSVD_CACHE`` (default ``~/.cache/imsvd``) holds ``wheels/``.
This script uses the standard library only, so any Python 3 can run it.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import wheel_cache  # noqa: E402  (tools/ is not a package)
from wheel_cache import InstallError, replace_exact  # noqa: E402

TOOL = "install_detectron2"

SDIST_NAME = "pb1-detectron2"
SDIST_VERSION = "0.6"
SDIST_FILE = f"{SDIST_NAME}-{SDIST_VERSION}.tar.gz"
# SHA-256 of pb1-detectron2-0.6.tar.gz as served by PyPI (518688 bytes).
SDIST_SHA256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"
# Bump when PATCHES or RUNTIME_REQUIREMENTS change: it names the cached wheel (a PEP 440 local
# version label), so a stale wheel from an older recipe is never reused.
RECIPE = "imsvd.1"
# Pins that satisfy Detectron2 0.6's own ranges (fvcore>=0.1.5,<0.1.6, iopath>=0.1.7,<0.1.10).
RUNTIME_REQUIREMENTS = [
    "Pillow>=7.1",
    "matplotlib",
    "pycocotools>=2.0.2",
    "termcolor>=1.1",
    "yacs>=0.1.8",
    "tabulate",
    "cloudpickle",
    "tqdm>4.29.0",
    "tensorboard",
    "fvcore==0.1.5.post20221221",
    "iopath==0.1.9",
    "omegaconf>=2.1",
]

log, run = wheel_cache.for_tool(TOOL)  # progress lines and echoed commands


def detectron2_works(python: str) -> Optional[str]:
    """Return the installed Detectron2 version if the target Python can import it, else None."""
    return wheel_cache.probe_import(
        python, "import detectron2, detectron2.engine; print(detectron2.__version__)"
    )


# --------------------------------------------------------------------------------------------
# Source edits. Each one asserts that what it replaces is present, so a different sdist (which
# the hash check already rules out) can never be half-patched silently.
# --------------------------------------------------------------------------------------------


_replace = replace_exact


_TOLERANT_C_IMPORT = (
    "try:\n"
    "    from detectron2 import _C\n"
    "except ImportError:  # pure-Python build: the C++ ops are not compiled\n"
    "    _C = None\n"
)


def _tolerant_c_import(text: str, path: str) -> str:
    return _replace(text, "from detectron2 import _C\n", _TOLERANT_C_IMPORT, path)


def _numpy2_aliases(text: str, path: str) -> str:
    # np.bool / np.int / np.float / np.str were removed in numpy 1.24+; builtins are the same dtype.
    new, n = re.subn(r"\bnp\.(bool|int|float|str)\b(?![_\d])", r"\1", text)
    if n == 0:
        raise InstallError(f"patch of {path}: no numpy alias found")
    return new


def _setup_py(text: str, path: str) -> str:
    text = _replace(text, "    ext_modules=get_extensions(),\n", "    ext_modules=[],\n", path)
    text = _replace(
        text,
        '    cmdclass={"build_ext": torch.utils.cpp_extension.BuildExtension},\n',
        "",
        path,
    )
    start = text.index("    install_requires=[\n")
    end = text.index("    extras_require={", start)
    reqs = "".join(f"        {r!r},\n" for r in RUNTIME_REQUIREMENTS)
    # Upstream also lists black==21.4b2, hydra-core, future and pydot, needed only for LazyConfig
    # formatting/overrides and caffe2 export; pinning black would downgrade the dev tools.
    return text[:start] + "    install_requires=[\n" + reqs + "    ],\n" + text[end:]


def _model_zoo(text: str, path: str) -> str:
    # pkg_resources is gone from setuptools >= 81; the configs sit next to this module.
    text = _replace(text, "import pkg_resources\n", "", path)
    return _replace(
        text,
        "    cfg_file = pkg_resources.resource_filename(\n"
        '        "detectron2.model_zoo", os.path.join("configs", config_path)\n'
        "    )\n",
        '    cfg_file = os.path.join(os.path.dirname(__file__), "configs", config_path)\n',
        path,
    )


PATCHES: List[Tuple[str, Callable[[str, str], str]]] = [
    ("setup.py", _setup_py),
    ("detectron2/layers/deform_conv.py", _tolerant_c_import),
    ("detectron2/layers/rotated_boxes.py", _tolerant_c_import),
    ("detectron2/layers/roi_align_rotated.py", _tolerant_c_import),
    ("detectron2/evaluation/fast_eval_api.py", _tolerant_c_import),
    (
        "detectron2/layers/mask_ops.py",
        lambda t, p: _replace(t, "np.array(mask, copy=False)", "np.asarray(mask)", p),
    ),
    (
        # Pillow >= 10 removed the LINEAR alias of BILINEAR.
        "detectron2/data/transforms/transform.py",
        lambda t, p: _replace(t, "interp=Image.LINEAR", "interp=Image.BILINEAR", p),
    ),
    (
        # Python 3.11: random.sample no longer accepts a set.
        "detectron2/data/common.py",
        lambda t, p: _replace(
            t,
            "self._rng.sample(self._fallback_candidates, k=1)",
            "self._rng.sample(sorted(self._fallback_candidates), k=1)",
            p,
        ),
    ),
    ("detectron2/model_zoo/model_zoo.py", _model_zoo),
    ("detectron2/evaluation/pascal_voc_evaluation.py", _numpy2_aliases),
    ("detectron2/evaluation/sem_seg_evaluation.py", _numpy2_aliases),
    ("detectron2/structures/masks.py", _numpy2_aliases),
    ("detectron2/data/datasets/pascal_voc.py", _numpy2_aliases),
    ("detectron2/data/build.py", _numpy2_aliases),
    ("detectron2/utils/visualizer.py", _numpy2_aliases),
    ("detectron2/utils/video_visualizer.py", _numpy2_aliases),
]


def patch_tree(src: Path) -> None:
    """Apply the compatibility edits and move the model-zoo configs where setup.py ships them.

    Args:
        src: the extracted sdist folder.
    """
    for rel, fn in PATCHES:
        path = src / rel
        text = path.read_text(encoding="utf-8")
        path.write_text(fn(text, rel), encoding="utf-8")
    # setup.py packages top-level configs/ as detectron2/model_zoo/configs (it links it there).
    zoo = src / "detectron2" / "model_zoo" / "configs"
    if not zoo.is_dir():
        raise InstallError(f"{zoo} missing from the sdist")
    shutil.move(str(zoo), str(src / "configs"))
    log(f"applied {len(PATCHES)} source edits; model-zoo configs moved to configs/")


def download_sdist(python: str, dest: Path) -> Path:
    """Download the sdist with the target Python's pip (torch must already be installed there).

    Args:
        python: target interpreter.
        dest: folder to download into.

    Returns:
        Path of the downloaded archive.
    """
    run(
        [python, "-m", "pip", "download", "--no-deps", "--no-build-isolation", "--no-binary",
         ":all:", f"{SDIST_NAME}=={SDIST_VERSION}", "-d", str(dest)]
    )  # fmt: skip
    path = dest / SDIST_FILE
    if not path.is_file():
        raise InstallError(f"pip download did not produce {path}")
    return path


def build_wheel(python: str, sdist: Path, out_dir: Path) -> Path:
    """Verify, extract, patch and build the sdist into a wheel.

    Args:
        python: interpreter whose setuptools builds the wheel.
        sdist: the pb1-detectron2 archive.
        out_dir: folder that receives the wheel.

    Returns:
        Path of the built wheel.
    """
    got = wheel_cache.verify(sdist, {sdist.name: SDIST_SHA256})
    log(f"sdist hash verified: {got}")
    with tempfile.TemporaryDirectory(prefix="d2build-") as tmp:
        wheel_cache.extract(sdist, tmp)
        src = Path(tmp) / f"{SDIST_NAME}-{SDIST_VERSION}"
        patch_tree(src)
        env = dict(os.environ, D2_VERSION_SUFFIX=f"+{RECIPE}")
        return wheel_cache.build_into_cache(TOOL, python, src, Path(tmp) / "dist", out_dir, env)


def cached_wheel(cache_dir: Path) -> Optional[Path]:
    """Return the cached wheel for this recipe, if present.

    Args:
        cache_dir: the wheels folder.

    Returns:
        The wheel path or None.
    """
    pattern = f"pb1_detectron2-{SDIST_VERSION}+{RECIPE.replace('-', '_')}-py3-none-any.whl"
    path = cache_dir / pattern
    return path if path.is_file() else None


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point: see the module docstring.

    Args:
        argv: command-line arguments (defaults to sys.argv[1:]).

    Returns:
        Process exit code.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--python",
        default=os.environ.get("IMSVD_PYTHON", ".venv/bin/python"),
        help="interpreter of the target environment (default: $IMSVD_PYTHON or .venv/bin/python)",
    )
    parser.add_argument("--sdist", help=f"use this local {SDIST_FILE} instead of downloading it")
    parser.add_argument(
        "--force", action="store_true", help="install even if detectron2 already imports"
    )
    parser.add_argument(
        "--rebuild", action="store_true", help="ignore the cached wheel and build it again"
    )
    args = parser.parse_args(argv)

    python = args.python
    if shutil.which(python) is None and not Path(python).is_file():
        raise InstallError(f"target python {python!r} not found")
    if not args.force:
        version = detectron2_works(python)
        if version is not None:
            log(f"detectron2 {version} already importable by {python}; nothing to do")
            return 0

    wheel_dir = wheel_cache.cache_dir()
    wheel = None if args.rebuild else cached_wheel(wheel_dir)
    if wheel is not None:
        log(f"reusing cached wheel {wheel}")
    else:
        with tempfile.TemporaryDirectory(prefix="d2sdist-") as tmp:
            sdist = Path(args.sdist) if args.sdist else download_sdist(python, Path(tmp))
            wheel = build_wheel(python, sdist, wheel_dir)
        log(f"built and cached {wheel}")

    run([python, "-m", "pip", "install", "--force-reinstall", "--no-deps", str(wheel)])
    # Dependencies separately, so --force-reinstall never touches torch or numpy.
    run([python, "-m", "pip", "install", *RUNTIME_REQUIREMENTS])
    version = detectron2_works(python)
    if version is None:
        raise InstallError(f"detectron2 was installed but does not import with {python}")
    log(f"detectron2 {version} installed into {python}")
    return 0


if __name__ == "__main__":
    wheel_cache.exit_with(TOOL, main)

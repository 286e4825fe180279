"""The edits applied to the mmcv 2.1.0 sources before ``tools/install_mmdet.py`` compiles them.

Each edit asserts that what it replaces is present exactly once (a different mmcv is an error,
never a silently different build). ``mmcv_patches(label, "all")``: the build fixes every build
needs; ``mmcv_patches(label, "shipped")`` adds the three edits that compile only the ops of the
toolkit's MMDetection configs (``SHIPPED_OPS``). Standard library only (tools/ is not a package).
"""

from __future__ import annotations

from typing import Callable, Dict, List, Tuple

from wheel_cache import InstallError, replace_exact

# The mmcv ops that the toolkit's MMDetection configs (transfer/configs/mmdet/) run: name -> (C++
# files under mmcv/ops/csrc/pytorch/, the Python bindings they define). RPN and test-time NMS
# (mmcv.ops.nms / batched_nms), the RoI heads' RoIAlign, and "info", mmcv's build report
# (mmcv.ops.get_compiler_version, read by mmengine's collect_env).
SHIPPED_OPS: Dict[str, Tuple[Tuple[str, ...], Tuple[str, ...]]] = {
    "info": (("info.cpp",), ("get_compiler_version", "get_compiling_cuda_version")),
    "nms": (("nms.cpp", "cpu/nms.cpp"), ("nms", "softnms", "nms_match")),
    "roi_align": (
        ("roi_align.cpp", "cpu/roi_align.cpp"),
        ("roi_align_forward", "roi_align_backward"),
    ),
}


_replace = replace_exact


def _make_setup_patch(local_version: str) -> Callable[[str, str], str]:
    def patch(text: str, path: str) -> str:
        # setuptools >= 81 has no pkg_resources: the same three names from the standard library
        # and packaging.
        text = _replace(
            text,
            "from pkg_resources import DistributionNotFound, get_distribution, parse_version\n",
            "from importlib.metadata import PackageNotFoundError as DistributionNotFound\n"
            "from importlib.metadata import distribution as get_distribution\n"
            "from packaging.version import parse as parse_version\n",
            path,
        )
        # torch >= 2.10 headers refuse anything below C++20 (ATen.h: "#error C++20 or later").
        text = _replace(
            text,
            "                extra_compile_args['cxx'] = ['-std=c++17']\n",
            "                extra_compile_args['cxx'] = ['-std=c++20']\n",
            path,
        )
        text = _replace(
            text,
            "                extra_compile_args['nvcc'] += ['-std=c++17']\n",
            "                extra_compile_args['nvcc'] += ['-std=c++20']\n",
            path,
        )
        # The distribution version carries the recipe; mmcv.__version__ (checked by mmdet) not.
        return _replace(
            text,
            "    version=get_version(),\n",
            f"    version=get_version() + {local_version!r},\n",
            path,
        )

    return patch


def _pixel_group(text: str, path: str) -> str:
    # numpy >= 1.24 removed the np.float alias.
    return _replace(text, "dtype=np.float))", "dtype=np.float64))", path)


_CPU_SOURCES = (
    "            print(f'Compiling {ext_name} only with CPU')\n"
    "            op_files = glob.glob('./mmcv/ops/csrc/pytorch/*.cpp') + \\\n"
    "                glob.glob('./mmcv/ops/csrc/pytorch/cpu/*.cpp')\n"
)
_LOADER_ASSERT = "            assert hasattr(ext, fun), f'{fun} miss in module {name}'\n"


def _shipped_sources(text: str, path: str) -> str:
    # setup.py's CPU-only branch: the files of SHIPPED_OPS and the bindings file, not the glob.
    files = ["pybind.cpp"] + [f for sources, _ in SHIPPED_OPS.values() for f in sources]
    listed = ", ".join(repr(f"./mmcv/ops/csrc/pytorch/{f}") for f in files)
    return _replace(
        text,
        _CPU_SOURCES,
        "            print(f'Compiling {ext_name} only with CPU "
        f"(ops: {', '.join(SHIPPED_OPS)})')\n"
        f"            op_files = [{listed}]\n",
        path,
    )


def _shipped_bindings(text: str, path: str) -> str:
    # pybind.cpp binds every op in one module block of m.def(...) statements: keep those of
    # SHIPPED_OPS (a binding of an op that is not compiled would not link).
    head, sep, body = text.partition("PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {\n")
    if not sep or not body.rstrip().endswith("}"):
        raise InstallError(f"patch of {path}: no PYBIND11_MODULE block")
    keep = sorted(name for _, names in SHIPPED_OPS.values() for name in names)
    kept = []
    for statement in body.rstrip()[:-1].split(";\n"):
        parts = statement.split('"')
        if statement.strip().startswith("m.def(") and len(parts) > 1 and parts[1] in keep:
            kept.append(statement)
    found = sorted(st.split('"')[1] for st in kept)
    if found != keep:
        raise InstallError(f"patch of {path}: bindings {keep} expected, found {found}")
    return head + sep + ";\n".join(kept) + ";\n}\n"


_LOADER_BRANCH = "if torch.__version__ != 'parrots':\n"
_NOT_COMPILED = (
    "def _not_compiled(fun):\n\n"
    "    def missing(*args, **kwargs):\n"
    "        raise RuntimeError(\n"
    "            f'mmcv op {{fun}} is not compiled in this build (it has the ops of the IMSVD '\n"
    "            'MMDetection configs only: {ops}); build every op with `make setup-mmdet`')\n\n"
    "    return missing\n\n\n"
)


def _tolerant_loader(text: str, path: str) -> str:
    # mmcv.utils.ext_loader asserts at import that every op a module names is compiled; with the
    # shipped set an absent op becomes a function that raises RuntimeError naming it when called.
    text = _replace(
        text,
        _LOADER_ASSERT,
        "            if not hasattr(ext, fun):\n"
        "                setattr(ext, fun, _not_compiled(fun))\n",
        path,
    )
    ops = ", ".join(SHIPPED_OPS)
    return _replace(text, _LOADER_BRANCH, _NOT_COMPILED.format(ops=ops) + _LOADER_BRANCH, path)


def mmcv_patches(
    local_version: str, ops: str = "all"
) -> List[Tuple[str, Callable[[str, str], str]]]:
    """Return the (relative path, edit) list applied to the mmcv sources before the build.

    Args:
        local_version: the "+..." label appended to the distribution version.
        ops: "all" (every CPU op) or "shipped" (SHIPPED_OPS only, with the tolerant op loader).

    Returns:
        The edits, in order.
    """
    patches = [
        ("setup.py", _make_setup_patch(local_version)),
        ("mmcv/ops/pixel_group.py", _pixel_group),
    ]
    if ops == "shipped":
        patches += [
            ("setup.py", _shipped_sources),
            ("mmcv/ops/csrc/pytorch/pybind.cpp", _shipped_bindings),
            ("mmcv/utils/ext_loader.py", _tolerant_loader),
        ]
    return patches

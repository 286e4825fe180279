"""House rules on imports, read from the source with ``ast`` (every import statement, top level or
inside a function) and checked by importing with the frameworks blocked:

* the pretraining library never imports ``transfer``;
* the lower modules of ``pretrain`` keep their layer order (:data:`LAYERS`): the I/O module
  ``pretrain.fileio`` imports nothing of the project but the errors, and the config and log
  modules import it at their top (the three import without torch); ``pretrain.checkpoint``
  reads and writes state dicts and imports no model; the model layer builds modules on it;
* no function of ``pretrain`` imports a project module, but for the few reasons of
  :data:`IN_FUNCTION_IMPORTS` (an import inside a function that dodges a cycle hides the order);
* only the Detectron2-facing modules import detectron2, only the MMDetection-facing modules
  import MMDetection (mmdet, mmcv, mmengine), and each of them does;
* everything else imports without those frameworks installed.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
D2_MODULES = {f"transfer.detection.d2.{m}" for m in ("trainer", "ext", "data")}
MMDET_MODULES = {f"transfer.detection.mmdet.{m}" for m in ("trainer", "ext")}
MMDET = ("mmdet", "mmcv", "mmengine")
# Builds the detection command lines with either stack or without: imports them inside
# try/except ImportError only (checked below by importing it with both blocked).
STACK_PROBES = {"transfer.detection.stacks"}
PROJECT = ("pretrain", "transfer")
# The plain file I/O under every other module (atomic writes, JSON, YAML).
IO_MODULE = "pretrain.fileio"
# Modules that write configs, logs and results without importing torch.
TORCH_FREE = (
    "pretrain.errors",
    IO_MODULE,
    "pretrain.keytypes",
    "pretrain.config",
    "pretrain.log",
    "pretrain.progress",
)
# The layers of pretrain/, lowest first: a module imports project modules of its own layer or a
# lower one only (a package name covers its sub-modules; the longest listed name decides). Every
# module of pretrain/ is in one (checked below); all of transfer/ sits above them.
LAYERS = (
    ("errors", ("pretrain.errors",)),
    ("plain file I/O", (IO_MODULE,)),
    ("config", ("pretrain.keytypes", "pretrain.config")),
    ("logs and progress", ("pretrain.log", "pretrain.progress")),
    ("process group and collectives", ("pretrain.dist",)),
    ("torchvision ResNets", ("pretrain.models.resnet",)),
    ("checkpoint files: state dicts and metadata", ("pretrain.checkpoint",)),
    ("models, also built from checkpoints", ("pretrain.models",)),
    ("the lean off-block sweep", ("pretrain.losses.offblock",)),
    ("losses and their monitors", ("pretrain.losses",)),
    ("methods: one module each, the registry", ("pretrain.methods",)),
    ("data: images, datasets, views, loader", ("pretrain.data",)),
    ("the kNN and the online probe", ("pretrain.probe",)),
    ("the engine: loop, hooks, checkpoint policy, optimizer", ("pretrain.engine",)),
    ("command lines", ("pretrain.main", "pretrain.launch", "pretrain.export", "pretrain.curves")),
)
# Imports of project modules inside a function, anywhere in the code (pretrain/, transfer/,
# tools/, benchmarks/), each with its reason. An import that only dodges an import cycle does not
# belong here: the cycle is a layering error.
IN_FUNCTION_IMPORTS = {
    (
        "pretrain.main",
        "pretrain.engine.trainer",
    ): "torch is loaded once the config is read (a bad key is an error at once)",
    (
        "pretrain.main",
        "pretrain.engine.preflight",
    ): "torch is loaded once the config is read (a bad key is an error at once)",
    ("pretrain.main", "pretrain.data.images"): "PIL is loaded after the config check (--check)",
    (
        "transfer.detection.d2.train",
        "transfer.detection.d2.trainer",
    ): "detectron2 is loaded only to train: --help and the stack check run without it",
    (
        "transfer.detection.mmdet.train",
        "transfer.detection.mmdet.trainer",
    ): "MMDetection is loaded only to train: --help and the stack check run without it",
}
CODE = ("pretrain", "transfer", "tools", "benchmarks")


def _module_files(package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every module of a package and its sub-packages."""
    out = {}
    for path in sorted((REPO / package).rglob("*.py")):
        rel = path.relative_to(REPO).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        if "configs" in parts:  # framework config files, not library modules
            continue
        out[".".join(parts)] = path
    return out


def imported_names(path: Path) -> set[str]:
    """Absolute module names a file imports anywhere in it (relative imports resolved)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    rel = path.relative_to(REPO).with_suffix("").parts
    package = rel[:-1]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package[: len(package) - node.level + 1])
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def _hits(names: set[str], roots: tuple[str, ...]) -> list[str]:
    return sorted(n for n in names if any(n == r or n.startswith(r + ".") for r in roots))


def _library() -> dict[str, Path]:
    return {**_module_files("pretrain"), **_module_files("transfer")}


def test_module_discovery_sees_the_sub_packages():
    mods = _library()
    for name in ("transfer.eval.voc07_svm", "transfer.analysis.analyze", "pretrain.engine.trainer"):
        assert name in mods
    assert D2_MODULES | MMDET_MODULES <= set(mods)


def test_imports_are_resolved_from_the_source(tmp_path, monkeypatch):
    pkg = tmp_path / "pretrain" / "sub"
    pkg.mkdir(parents=True)
    f = pkg / "m.py"
    f.write_text("import os\nfrom . import x\nfrom ..y import z\ndef g():\n    import transfer.a\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    names = imported_names(f)
    assert {"os", "pretrain.sub.x", "pretrain.y.z", "transfer.a"} <= names
    assert _hits(names, ("transfer",)) == ["transfer.a"]


def test_pretrain_never_imports_transfer():
    bad = {m: _hits(imported_names(p), ("transfer",)) for m, p in _module_files("pretrain").items()}
    assert not {m: h for m, h in bad.items() if h}


def _top_level_names(path: Path) -> set[str]:
    """Module names imported by the statements at the top of a file (not in a function)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return {
        node.module if isinstance(node, ast.ImportFrom) else alias.name
        for node in tree.body
        if isinstance(node, (ast.Import, ast.ImportFrom)) and not getattr(node, "level", 0)
        for alias in node.names
    }


def _owner(name: str, modules: set[str]) -> str | None:
    """The module of the project an imported name belongs to (the longest matching module)."""
    hits = [m for m in modules if name == m or name.startswith(m + ".")]
    return max(hits, key=len) if hits else None


def _layer(module: str) -> int:
    """The index of the layer of ``module`` (the longest listed name that covers it), or
    ``len(LAYERS)`` when none does."""
    hits = [
        (len(m), i)
        for i, (_, members) in enumerate(LAYERS)
        for m in members
        if module == m or module.startswith(m + ".")
    ]
    return max(hits)[1] if hits else len(LAYERS)


def test_every_module_of_pretrain_has_a_layer():
    assert _layer("pretrain.models.resnet") < _layer("pretrain.checkpoint.common")
    assert _layer("pretrain.checkpoint") < _layer("pretrain.models.build")
    unlisted = sorted(
        m for m in _module_files("pretrain") if m != "pretrain" and _layer(m) == len(LAYERS)
    )
    assert not unlisted, unlisted


def test_modules_keep_the_layer_order():
    mods = _library()
    bad = {}
    for module, path in _module_files("pretrain").items():
        level = _layer(module)
        if level == len(LAYERS):
            continue
        owners = {_owner(n, set(mods)) for n in _hits(imported_names(path), PROJECT)}
        owners -= {None, *PROJECT}  # the empty package roots; their sub-modules are named too
        above = sorted(o for o in owners if _layer(o) > level)
        if above:
            bad[f"{module} ({LAYERS[level][0]})"] = above
    assert not bad, bad


def test_checkpoint_files_import_no_model():
    for module, path in _module_files("pretrain").items():
        if module == "pretrain.checkpoint" or module.startswith("pretrain.checkpoint."):
            models = _hits(imported_names(path), ("pretrain.models",))
            resnet = "pretrain.models.resnet"  # below checkpoint/: architectures, no modules built
            assert all(n == resnet or n.startswith(resnet + ".") for n in models), (module, models)


def in_function_imports(path: Path) -> set[str]:
    """Absolute names of what a file imports from the project inside a function (a module, or
    ``module.name`` for ``from module import name``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    rel = path.relative_to(REPO).with_suffix("").parts
    package = rel[:-1]
    names = set()
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        for node in ast.walk(fn):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = list(package[: len(package) - node.level + 1]) if node.level else []
                module = ".".join(base + ([node.module] if node.module else []))
                names.update(f"{module}.{alias.name}" for alias in node.names)
    return set(_hits(names, PROJECT))


def test_in_function_imports_are_found(tmp_path, monkeypatch):
    pkg = tmp_path / "pretrain" / "sub"
    pkg.mkdir(parents=True)
    f = pkg / "m.py"
    f.write_text(
        "import pretrain.a\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
        "    from pretrain import b\ndef g():\n    from .. import c\n    import tqdm\n"
        "    def h():\n        from transfer.d import e\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    assert in_function_imports(f) == {"pretrain.c", "transfer.d.e"}


def test_no_project_import_inside_a_function_but_the_listed_ones():
    mods = set(_library())
    found = {
        (module, _owner(name, mods) or name)
        for root in CODE
        for module, path in _module_files(root).items()
        for name in in_function_imports(path)
    }
    assert found <= set(IN_FUNCTION_IMPORTS), sorted(found - set(IN_FUNCTION_IMPORTS))
    assert set(IN_FUNCTION_IMPORTS) <= found, "stale entries: " + str(
        sorted(set(IN_FUNCTION_IMPORTS) - found)
    )


def test_the_io_module_imports_nothing_of_the_project_but_errors():
    mods = _module_files("pretrain")
    assert _hits(imported_names(mods[IO_MODULE]), PROJECT) in ([], ["pretrain.errors"])


def test_config_and_log_import_the_io_module_at_the_top():
    mods = _module_files("pretrain")
    for module in ("pretrain.config", "pretrain.log"):
        assert IO_MODULE in _top_level_names(mods[module]), module


@pytest.mark.parametrize(
    "framework, owners", [(("detectron2",), D2_MODULES), (MMDET, MMDET_MODULES)]
)
def test_frameworks_are_imported_only_by_their_own_modules(framework, owners):
    found = {m: _hits(imported_names(p), framework) for m, p in _library().items()}
    users = {m for m, h in found.items() if h} - STACK_PROBES
    assert users == owners, {m: found[m] for m in users ^ owners}


def test_detectron2_modules_do_not_import_mmdetection():
    for module in D2_MODULES:
        assert not _hits(imported_names(_library()[module]), MMDET)


def _blocked_run(body: str, blocked: str | tuple[str, ...]) -> subprocess.CompletedProcess:
    """Run ``body`` in a fresh Python where importing any of ``blocked`` raises ImportError."""
    names = (blocked,) if isinstance(blocked, str) else tuple(blocked)
    code = f"""
import importlib, sys
def hit(name):
    return any(name == b or name.startswith(b + ".") for b in {names!r})
class Block:
    def find_spec(self, name, path=None, target=None):
        if hit(name):
            raise ImportError("blocked by the layering test: " + name)
        return None
sys.meta_path.insert(0, Block())
""" + body
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300
    )


def _import_in_subprocess(
    modules: list[str], blocked: str | tuple[str, ...]
) -> subprocess.CompletedProcess:
    body = f"""
for m in {modules!r}:
    importlib.import_module(m)
leaked = [m for m in sys.modules if hit(m)]
assert not leaked, leaked
print("imported", len({modules!r}))
"""
    return _blocked_run(body, blocked)


def test_the_library_imports_without_detectron2_and_mmdetection():
    mods = sorted(set(_library()) - D2_MODULES - MMDET_MODULES)
    assert "transfer.detection.mmdet.weights" in mods and "transfer.eval.runner" in mods
    res = _import_in_subprocess(mods, ("detectron2",) + MMDET)
    assert res.returncode == 0, res.stderr[-2000:]


def test_pretrain_imports_without_transfer():
    res = _import_in_subprocess(sorted(_module_files("pretrain")), "transfer")
    assert res.returncode == 0, res.stderr[-2000:]


def test_configs_logs_and_files_are_written_without_torch():
    res = _import_in_subprocess(list(TORCH_FREE), ("torch", "torchvision", "numpy"))
    assert res.returncode == 0, res.stderr[-2000:]


@pytest.mark.parametrize(
    "module, run_argv, flag, stack, first_module",
    [
        ("transfer.detection.d2.train", ["--config", "mask_rcnn_C4_1x.yaml"], "--train-json",
         "Detectron2", "detectron2"),
        ("transfer.detection.mmdet.train", ["mask_rcnn_C4_1x", "--weights", "w.pth"],
         "--cfg-options", "MMDetection", "mmengine"),
    ],
)  # fmt: skip
def test_detection_entry_points_without_their_stack(module, run_argv, flag, stack, first_module):
    # --help works and a run is one error line naming the package and the install command
    body = f"""
import contextlib, io, json
cli = importlib.import_module({module!r}).cli
out = io.StringIO()
with contextlib.redirect_stdout(out):
    try:
        code = cli(["--help"])
    except SystemExit as e:
        code = e.code
err = io.StringIO()
with contextlib.redirect_stderr(err):
    run = cli({run_argv!r})
print(json.dumps([code, out.getvalue(), run, err.getvalue()]))
"""
    res = _blocked_run(body, ("detectron2",) + MMDET)
    assert res.returncode == 0, res.stderr[-2000:]
    code, usage, run, err = json.loads(res.stdout.strip().splitlines()[-1])
    assert code == 0 and usage.startswith("usage:") and flag in usage
    assert run == 2 and len(err.strip().splitlines()) == 1, err
    assert f"error: {stack} is not installed: {first_module} (" in err and "make setup" in err
    assert "Traceback" not in err + res.stderr

"""House rules on imports: only the Detectron2-facing modules import detectron2, only the
MMDetection-facing modules import MMDetection (mmdet, mmcv, mmengine), and the pretraining
library does not depend on transfer/."""

import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
D2_MODULES = {"transfer.train_net", "transfer.d2_ext"}
MMDET_MODULES = {"transfer.mmdet_train", "transfer.mmdet_ext"}


def _modules(package: str) -> list[str]:
    return [f"{package}.{m.name}" for m in pkgutil.iter_modules([str(REPO / package)])]


def _import_in_subprocess(
    modules: list[str], blocked: str | tuple[str, ...]
) -> subprocess.CompletedProcess:
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
for m in {modules!r}:
    importlib.import_module(m)
leaked = [m for m in sys.modules if hit(m)]
assert not leaked, leaked
print("imported", len({modules!r}))
"""
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300
    )


def test_everything_but_the_detectron2_modules_imports_without_detectron2():
    mods = [
        m
        for m in _modules("pretrain") + _modules("transfer")
        if m not in D2_MODULES | MMDET_MODULES
    ]
    assert "transfer.voc07_svm" in mods and "pretrain.engine" in mods
    res = _import_in_subprocess(mods, "detectron2")
    assert res.returncode == 0, res.stderr[-2000:]


def test_everything_but_the_mmdet_modules_imports_without_mmdetection():
    mods = [
        m
        for m in _modules("pretrain") + _modules("transfer")
        if m not in D2_MODULES | MMDET_MODULES
    ]
    assert "transfer.mmdet_weights" in mods and "transfer.resnet_keys" in mods
    res = _import_in_subprocess(mods, ("mmdet", "mmcv", "mmengine"))
    assert res.returncode == 0, res.stderr[-2000:]


def test_detectron2_modules_do_not_import_mmdetection():
    res = _import_in_subprocess(sorted(D2_MODULES), ("mmdet", "mmcv", "mmengine"))
    assert res.returncode == 0, res.stderr[-2000:]


def test_pretrain_does_not_import_transfer():
    res = _import_in_subprocess(_modules("pretrain"), "transfer")
    assert res.returncode == 0, res.stderr[-2000:]


@pytest.mark.parametrize("module", sorted(D2_MODULES | MMDET_MODULES))
def test_framework_modules_exist(module):
    assert (REPO / (module.replace(".", "/") + ".py")).is_file()

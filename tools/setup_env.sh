#!/usr/bin/env bash
# Create .venv (if needed) and install everything the toolkit, its tests and its demo need:
# torch/torchvision (pinned), the package with its dev extras, Detectron2 (pure-Python build,
# cached wheel; skipped when a working Detectron2 is already installed) and MMDetection (mmengine,
# mmdet, and mmcv with its C++ ops compiled for CPU once and cached; skipped when it already
# imports; IMSVD_SKIP_MMDET=1 leaves it out and the MMDetection tests skip).
# Re-running is cheap: a stamp keyed on setup.cfg and the two install recipes skips finished work
# (not written while the MMDetection step is deferred because another set-up is building mmcv).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
PY_BOOT=${PYTHON_BOOTSTRAP:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY_BOOT --version)"
  "$PY_BOOT" -m venv .venv
fi
stamp=".venv/.imsvd-setup-$(cat setup.cfg pyproject.toml tools/install_detectron2.py tools/install_mmdet.py tools/wheel_cache.py | sha256sum | cut -c1-16)"
if [ -f "$stamp" ]; then
  exit 0
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
echo "[setup] installing torch==2.14.1 torchvision==0.29.1"
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import torch, torchvision" || { echo "[setup] torch install failed" >&2; exit 1; }
echo "[setup] installing the imsvd package (editable) with dev extras"
.venv/bin/python -m pip install -q -e ".[dev,detectron2]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import pretrain, transfer, sklearn, yaml" || { echo "[setup] package install failed" >&2; exit 1; }
echo "[setup] Detectron2"
.venv/bin/python tools/install_detectron2.py --python .venv/bin/python
mmdet_rc=0
if [ "${IMSVD_SKIP_MMDET:-0}" = "1" ]; then
  echo "[setup] MMDetection skipped (IMSVD_SKIP_MMDET=1)"
else
  # from a cached mmcv wheel only: compiling mmcv's C++ ops is `make setup-mmdet` (long)
  echo "[setup] MMDetection (from a cached mmcv wheel, if there is one)"
  .venv/bin/python tools/install_mmdet.py --python .venv/bin/python --cached-only || mmdet_rc=$?
  if [ "$mmdet_rc" = "3" ]; then
    echo "[setup] MMDetection deferred: another set-up is building mmcv; its tests skip until then"
  elif [ "$mmdet_rc" = "4" ]; then
    mmdet_rc=0  # skipped on purpose: the set-up is complete without it
  elif [ "$mmdet_rc" != "0" ]; then
    echo "[setup] MMDetection install failed" >&2
    exit 1
  fi
fi
rm -f .venv/.imsvd-setup-*
if [ "$mmdet_rc" = "0" ]; then
  touch "$stamp"
fi
echo "[setup] done"

#!/usr/bin/env bash
# Create .venv (if needed) and install everything the toolkit, its tests and its demo need, at the
# exact versions of the lock (constraints.txt, applied to every pip call as PIP_CONSTRAINT):
# torch/torchvision, the package with its dev extras, Detectron2 (pure-Python build, cached
# wheel; skipped when a working Detectron2 is already installed) and MMDetection (mmengine, mmdet,
# and mmcv with the C++ ops of the shipped configs compiled for CPU once and cached: about 3
# minutes on 2 cores; skipped when it already works; IMSVD_SKIP_MMDET=1 leaves it out and the
# MMDetection tests skip).
# Re-running is cheap: a stamp keyed on the lock, setup.cfg and the install recipes skips
# finished work; a changed lock reinstalls (not written while the MMDetection step is deferred
# because another set-up is building mmcv).
# IMSVD_VENV=DIR sets another venv; IMSVD_NO_LOCK=1 installs without the lock (`make lock`).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
venv="${IMSVD_VENV:-.venv}"
py="$venv/bin/python"
PY_BOOT=${PYTHON_BOOTSTRAP:-python3}
if [ ! -x "$py" ]; then
  echo "[setup] creating $venv with $($PY_BOOT --version)"
  "$PY_BOOT" -m venv "$venv"
fi
lock="$here/constraints.txt"
# the lock pins torch / torchvision like every other package; without it, the project's pins
torch_spec=(torch torchvision)
if [ "${IMSVD_NO_LOCK:-0}" = "1" ]; then
  lock=/dev/null
  torch_spec=("torch==2.14.1" "torchvision==0.29.1")
  echo "[setup] without the lock (IMSVD_NO_LOCK=1): the newest versions the ranges allow"
elif [ ! -f "$lock" ]; then
  echo "[setup] the lock $lock is missing (make lock writes it)" >&2
  exit 1
else
  # every pip install below, the installers' and the isolated build environments' included
  export PIP_CONSTRAINT="$lock"
fi
recipe=(setup.cfg pyproject.toml tools/setup_env.sh tools/lock_check.py tools/install_detectron2.py
  tools/install_mmdet.py tools/mmcv_patches.py tools/wheel_cache.py)
skip_mmdet="${IMSVD_SKIP_MMDET:-0}"
stamp="$venv/.imsvd-setup-$({ cat "$lock" "${recipe[@]}"; echo "skip_mmdet=$skip_mmdet"; } \
  | sha256sum | cut -c1-16)"
if [ -f "$stamp" ]; then
  exit 0
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
quiet() { grep -v "^WARNING: Location" || true; }
echo "[setup] installing ${torch_spec[*]}"
"$py" -m pip install -q "${torch_spec[@]}" 2>&1 | quiet
"$py" -c "import torch, torchvision" || { echo "[setup] torch install failed" >&2; exit 1; }
echo "[setup] installing the imsvd package (editable) with dev extras"
"$py" -m pip install -q -e ".[dev,detectron2]" 2>&1 | quiet
"$py" -c "import pretrain, transfer, imsvd_configs, sklearn, yaml" || { echo "[setup] package install failed" >&2; exit 1; }
echo "[setup] Detectron2"
"$py" tools/install_detectron2.py --python "$py"
mmdet_rc=0
if [ "$skip_mmdet" = "1" ]; then
  echo "[setup] MMDetection skipped (IMSVD_SKIP_MMDET=1)"
else
  echo "[setup] MMDetection (mmcv with the shipped configs' ops: built once, then cached)"
  "$py" tools/install_mmdet.py --python "$py" || mmdet_rc=$?
  if [ "$mmdet_rc" = "3" ]; then
    echo "[setup] MMDetection deferred: another set-up is building mmcv; its tests skip until then"
  elif [ "$mmdet_rc" != "0" ]; then
    # the rest of the toolkit works without it: go on, and retry on the next set-up
    echo "[setup] WARNING: MMDetection could not be installed (see above: a C++ compiler and" \
      "the Python headers are needed); its tests skip; IMSVD_SKIP_MMDET=1 leaves it out" >&2
  fi
fi
if [ "$lock" != /dev/null ]; then
  # A venv made before this lock keeps packages that no step above reinstalled (a step that
  # found its stack working): bring each locked package that is installed to its locked version.
  off="$("$py" tools/lock_check.py "$lock")"
  if [ -n "$off" ]; then
    echo "[setup] to the lock's versions: $off"
    # shellcheck disable=SC2086
    "$py" -m pip install -q $off 2>&1 | quiet
    off="$("$py" tools/lock_check.py "$lock")"
    [ -z "$off" ] || { echo "[setup] still not at the lock's versions: $off" >&2; exit 1; }
  fi
fi
rm -f "$venv"/.imsvd-setup-*
if [ "$mmdet_rc" = "0" ]; then
  touch "$stamp"
fi
echo "[setup] done"

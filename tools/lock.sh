#!/usr/bin/env bash
# Refresh constraints.txt, the lock of every package the set-up installs (`make lock`).
#
# The set-up (tools/setup_env.sh) runs once without the lock into a throwaway venv, so it installs
# the newest versions the registry serves today within the ranges of setup.cfg and the two
# installers; `pip freeze` of that venv becomes the new lock. Left out: the editable imsvd
# package, pip (the venv's own), and the three source builds whose versions the installers pin
# with hashes and local labels (pb1-detectron2, mmcv, plus mmdet / mmengine). Then run
# `make test` (it reinstalls: the set-up's stamp includes the lock) and commit the lock with the
# fixes the new versions need.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
unset IMSVD_SKIP_MMDET  # the lock covers MMDetection's dependencies too
IMSVD_VENV="$tmp/venv" IMSVD_NO_LOCK=1 bash tools/setup_env.sh
if ! compgen -G "$tmp/venv/.imsvd-setup-*" >/dev/null; then
  echo "[lock] the set-up did not complete (MMDetection deferred or failed): lock not written" >&2
  exit 1
fi
{
  echo "# The lock: exact versions of everything tools/setup_env.sh installs (pip constraints)."
  echo "# Made by \`make lock\` (tools/lock.sh) on $(date -u +%Y-%m-%d) with $("$tmp/venv/bin/python" --version),"
  echo "# $(uname -m); setup.cfg keeps the compatible ranges for installs into other environments."
  "$tmp/venv/bin/python" -m pip freeze --all --exclude-editable \
    | grep -v -i -E '^(#|-e |pip==|pb1-detectron2|mmcv|mmdet|mmengine|imsvd)' \
    | LC_ALL=C sort -f
} > constraints.txt.partial
mv constraints.txt.partial constraints.txt
echo "[lock] constraints.txt: $(grep -c '==' constraints.txt) pinned packages"

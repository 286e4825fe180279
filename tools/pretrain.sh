#!/usr/bin/env bash
# Launch IMSVD pretraining with torchrun on this node (all GPUs, or one CPU process).
#
#   tools/pretrain.sh CONFIG [key.sub=value ...]
#
# Multi-node: set NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT on every node (same values except
# NODE_RANK). NPROC_PER_NODE overrides the process count (default: number of visible GPUs, or 1).
# PYTHON selects the interpreter (default: .venv/bin/python when present, else python3).
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: $0 CONFIG [key.sub=value ...]" >&2
  exit 2
fi
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$here/.venv/bin/python" ]; then PYTHON="$here/.venv/bin/python"; else PYTHON=python3; fi
fi
config="$1"
shift
if [ -z "${NPROC_PER_NODE:-}" ]; then
  NPROC_PER_NODE=$("$PYTHON" -c "import torch; print(max(torch.cuda.device_count(), 1))")
fi
cd "$here"
exec "$PYTHON" -m torch.distributed.run \
  --nnodes="${NNODES:-1}" \
  --node_rank="${NODE_RANK:-0}" \
  --nproc_per_node="$NPROC_PER_NODE" \
  --master_addr="${MASTER_ADDR:-127.0.0.1}" \
  --master_port="${MASTER_PORT:-29500}" \
  -m pretrain.main --config "$config" "$@"

#!/usr/bin/env bash
# Launch IMSVD pretraining with torchrun on this node (all GPUs, or one CPU process).
#
#   tools/pretrain.sh CONFIG [--output-dir DIR] [key.sub=value ...]
#
# CONFIG is a path (relative to the current directory) or a name in configs/pretrain/. Paths given
# on the command line (CONFIG, --output-dir, data.root=, data.list_file=, checkpoint.output_dir=,
# eval.bank_root=, eval.query_root=) are relative to the directory the command is run from;
# relative paths written inside a config file are relative to the repository root.
# --output-dir DIR is the same as checkpoint.output_dir=DIR (giving both is an error; an empty
# or null folder is refused). Values arrive intact whatever they contain (" #", ": ", quotes);
# a leading "~" or "~/" in those paths is this user's home, "~user" is refused.
#
# The config and the overrides (their cross-field rules for the run's process count, the data
# paths) are checked before torchrun starts: a bad key, value or path prints one error line
# naming it and exits with status 2; so does a failure only the training processes meet
# (pretrain.launch reports their status instead of torchrun's traceback).
#
# Signals: SIGTERM, SIGUSR1 and SIGINT (Ctrl-C) sent to this launcher reach the training
# processes (SIGINT as SIGTERM): every rank stops at the same step, writes a checkpoint and exits
# with status 0, and so does this launcher. A scheduler should send SIGUSR1 (or SIGTERM) to this
# launcher some time before a time limit or preemption; the next start resumes automatically.
#
# Multi-node: set NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT on every node (same values except
# NODE_RANK). NPROC_PER_NODE overrides the process count (default: number of visible GPUs, or 1).
# PYTHON selects the interpreter (default: .venv/bin/python when present, else python3).
set -euo pipefail

usage() {
  echo "usage: $0 CONFIG [--output-dir DIR] [key.sub=value ...]" >&2
  exit 2
}

caller="$PWD"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$here/.venv/bin/python" ]; then PYTHON="$here/.venv/bin/python"; else PYTHON=python3; fi
fi

# A path given relative to the caller's directory, made absolute; null, "" and absolute paths are
# kept as they are (the config check refuses what is not allowed); "~" and "~/..." are $HOME.
caller_path() {
  case "$1" in
    "" | null | Null | NULL | /*) printf '%s' "$1" ;;
    "~") printf '%s' "$HOME" ;;
    "~/"*) printf '%s/%s' "$HOME" "${1#\~/}" ;;
    "~"*)
      echo "error: '$1': only ~ and ~/ are expanded, write the full path" >&2
      exit 2
      ;;
    *) printf '%s/%s' "$caller" "${1#./}" ;;
  esac
}

config=""
overrides=()
outdir=()
add_outdir() {
  if [ ${#outdir[@]} -gt 0 ]; then
    echo "error: --output-dir given twice" >&2
    exit 2
  fi
  local path
  path="$(caller_path "$1")" || exit 2
  outdir=(--output-dir "$path")
}
while [ $# -gt 0 ]; do
  case "$1" in
    -h | --help) usage ;;
    --output-dir)
      [ $# -ge 2 ] || usage
      add_outdir "$2"
      shift 2
      ;;
    --output-dir=*)
      add_outdir "${1#*=}"
      shift
      ;;
    data.root=* | data.list_file=* | checkpoint.output_dir=* | eval.bank_root=* | eval.query_root=*)
      value="$(caller_path "${1#*=}")" || exit 2
      overrides+=("${1%%=*}=$value")
      shift
      ;;
    -*)
      echo "$0: unknown option $1" >&2
      usage
      ;;
    *)
      if [ -z "$config" ]; then config="$1"; else overrides+=("$1"); fi
      shift
      ;;
  esac
done
[ -n "$config" ] || usage
# an existing file relative to the caller; otherwise a name (or path) inside the repository
if [ -f "$config" ]; then config="$(caller_path "$config")"; fi

cd "$here"

if [ -z "${NPROC_PER_NODE:-}" ]; then
  NPROC_PER_NODE=$("$PYTHON" -c "import torch; print(max(torch.cuda.device_count(), 1))")
fi
# the run's process count, for the config check (train.batch_size must divide it); elastic
# values (NNODES=MIN:MAX, NPROC_PER_NODE=gpu|auto) leave that rule to the training processes
world_size=1
if [[ "${NNODES:-1}" =~ ^[1-9][0-9]*$ && "$NPROC_PER_NODE" =~ ^[1-9][0-9]*$ ]]; then
  world_size=$(( ${NNODES:-1} * NPROC_PER_NODE ))
fi

# Check the recipe, for the run's process count, and its data paths before starting any process
# (the same rules as pretrain.main, which checks again in every worker): one error line, not a
# torchrun traceback around it.
"$PYTHON" -m pretrain.main --check --world-size "$world_size" \
  --config "$config" ${outdir[@]+"${outdir[@]}"} ${overrides[@]+"${overrides[@]}"}

# torchrun ignores SIGUSR1 and SIGINT (SIGUSR1 would kill it and orphan its workers); this shell
# forwards them to the workers instead. The workers install their own handlers.
# (torchrun reads --signals-to-handle from PET_SIGNALS_TO_HANDLE and, for older versions,
# TORCHELASTIC_SIGNALS_TO_HANDLE: its default list would catch SIGINT and kill the workers)
export TORCHELASTIC_SIGNALS_TO_HANDLE="${TORCHELASTIC_SIGNALS_TO_HANDLE:-SIGTERM,SIGHUP,SIGQUIT}"
export PET_SIGNALS_TO_HANDLE="${PET_SIGNALS_TO_HANDLE:-$TORCHELASTIC_SIGNALS_TO_HANDLE}"
(
  trap '' USR1 INT
  exec "$PYTHON" -m pretrain.launch \
    --nnodes="${NNODES:-1}" \
    --node_rank="${NODE_RANK:-0}" \
    --nproc_per_node="$NPROC_PER_NODE" \
    --master_addr="${MASTER_ADDR:-127.0.0.1}" \
    --master_port="${MASTER_PORT:-29500}" \
    -m pretrain.main --config "$config" ${outdir[@]+"${outdir[@]}"} ${overrides[@]+"${overrides[@]}"}
) &
torchrun_pid=$!

# A signal that arrives before torchrun has started its workers is kept and sent once they exist.
pending=""
forward_pending() {
  if [ -n "$pending" ] && pkill "-$pending" -P "$torchrun_pid" 2>/dev/null; then
    echo "pretrain.sh: SIG$pending sent to the training processes" >&2
    pending=""
  fi
}
on_signal() {
  pending="$1"
  forward_pending
}
trap 'on_signal TERM' TERM
trap 'on_signal USR1' USR1
trap 'on_signal TERM' INT

# `wait` returns early when a trapped signal arrives: keep waiting while torchrun runs.
while kill -0 "$torchrun_pid" 2>/dev/null; do
  if [ -n "$pending" ]; then
    sleep 1
    forward_pending
  else
    wait "$torchrun_pid" || true
  fi
done
status=0
wait "$torchrun_pid" || status=$?
exit "$status"

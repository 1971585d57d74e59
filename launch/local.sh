#!/usr/bin/env bash
# N processes of `bigjax train` on this machine, each with its own simulated CPU devices, joined by
# JAX's coordinator on localhost: the multi-host path without a cluster.
#
# Needs: bigjax installed for $PYTHON (default: python3).
# Usage: launch/local.sh N CONFIG [key=value ...]
# Example:
#   launch/local.sh 2 configs/gpt_tiny.yaml train.steps=20 run.dir=runs/two_hosts
#
# Environment:
#   XLA_FLAGS                 a --xla_force_host_platform_device_count in it is kept; otherwise
#                             each process gets 4 devices
#   BIGJAX_COORDINATOR_PORT   coordinator port (default: a free one)
#   BIGJAX_LOG_DIR            per-process logs process-<i>.log (default: a new temporary dir)
#   PYTHON                    the interpreter that has bigjax (default: python3)
# Process 0's output also goes to this terminal. The exit status is the first non-zero status of
# any process; Ctrl-C (or SIGTERM) is passed on to every process, which checkpoint and stop.
set -euo pipefail

usage() { sed -n '5,6p' "$0" | sed 's/^# //' >&2; exit 2; }
[[ $# -ge 2 ]] || usage
n=$1
shift
[[ $n =~ ^[1-9][0-9]*$ ]] || { echo "local.sh: N must be a positive integer, got '$n'" >&2; exit 2; }
[[ -f $1 ]] || { echo "local.sh: config file '$1' does not exist" >&2; exit 2; }

python=${PYTHON:-python3}
flags=${XLA_FLAGS:-}
if [[ $flags != *--xla_force_host_platform_device_count* ]]; then
  flags="$flags --xla_force_host_platform_device_count=4"
fi
port=${BIGJAX_COORDINATOR_PORT:-$("$python" -c \
  'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
log_dir=${BIGJAX_LOG_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/bigjax-local.XXXXXX")}
mkdir -p "$log_dir"

pids=()
# shellcheck disable=SC2317  # called from the traps below
forward() { kill -"$1" "${pids[@]}" 2>/dev/null || true; }
trap 'forward INT' INT
trap 'forward TERM' TERM

# Create every log before any process starts: `tail -f` on a file not yet there gives up at once,
# and the background process opens its log only when the shell gets to it.
for ((i = 0; i < n; i++)); do
  : >"$log_dir/process-$i.log"
done
for ((i = 0; i < n; i++)); do
  log="$log_dir/process-$i.log"
  # BIGJAX_* variables win over any cluster variables in this shell (see bigjax/distributed.py)
  env XLA_FLAGS="${flags# }" JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}" \
    BIGJAX_COORDINATOR="localhost:$port" BIGJAX_NUM_PROCESSES="$n" BIGJAX_PROCESS_ID="$i" \
    "$python" -u -m bigjax.cli train "$@" >"$log" 2>&1 &
  pids+=($!)
  echo "local.sh: process $i pid $! log $log" >&2
done
tail -n +1 -f "$log_dir/process-0.log" --pid="${pids[0]}" &
tail_pid=$!

status=0
for pid in "${pids[@]}"; do
  # `wait` returns early when a trapped signal arrives; wait again until the process has ended
  while true; do
    rc=0
    wait "$pid" || rc=$?
    kill -0 "$pid" 2>/dev/null || break
  done
  if [[ $rc -ne 0 && $status -eq 0 ]]; then
    status=$rc
  fi
done
wait "$tail_pid" 2>/dev/null || true
exit "$status"

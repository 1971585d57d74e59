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
# Process 0's output also goes to this terminal. Ctrl-C (or SIGTERM) is passed on to every
# process, which checkpoint and stop; the exit status is then the first non-zero one.
# If a process dies (killed, crashed, or an error), the others are stopped (they cannot go on
# without it), their crash output stays in their logs, and the last line says which process died,
# how, and which step a rerun resumes from; the exit status is the dead process's.
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
stopping=""  # set once Ctrl-C or SIGTERM was passed on: the processes checkpoint and stop
trap 'stopping=INT; kill -INT "${pids[@]}" 2>/dev/null || true' INT
trap 'stopping=TERM; kill -TERM "${pids[@]}" 2>/dev/null || true' TERM

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

# Process 0's log on the terminal, up to the first line of a native crash report (glog's fatal
# line, abseil's `*** SIGABRT received`, std::terminate): what follows is a C++ stack, kept in
# the log. When a process dies the launcher writes the log's length at that moment to $cut: the
# rest is what process 0 wrote while it was being stopped. (A read loop, not awk: mawk would hold
# lines back until its input buffer fills.)
cut=$log_dir/.process-0.shown
rm -f "$cut"
show() {
  local line limit="" shown=0 LC_ALL=C  # C: ${#line} counts bytes
  while IFS= read -r line || [[ -n $line ]]; do
    case $line in
      F[0-9][0-9][0-9][0-9]\ * | '*** '* | 'terminate called'* | 'Fatal Python error'*) return ;;
    esac
    shown=$((shown + ${#line} + 1))
    [[ -n $limit || ! -f $cut ]] || read -r limit <"$cut"
    [[ -z $limit ]] || ((shown <= limit)) || return
    printf '%s\n' "$line"
  done
}
tail -n +1 -f -s 0.2 "$log_dir/process-0.log" --pid="${pids[0]}" 2>/dev/null | show &
show_pid=$!

# From here on bash's own notices of jobs killed by a signal ("line 9: 1234 Aborted env ...",
# printed after any later command) go nowhere; this script's messages go to fd 3, the terminal.
exec 3>&2 2>/dev/null

# A reaction to another process's death, not a cause: bigjax's own line, JAX's heartbeat, gloo.
reacted() {
  grep -qE 'another (process|task) died|gloo::|Gloo.*(Connection closed|Received data size|Read error)' \
    "$log_dir/process-$1.log"
}

# how a process ended, in words: `died (killed by SIGKILL)`, `failed (exit code 1)`
how() {
  local name
  if (($1 > 128)) && name=$(kill -l $(($1 - 128))); then
    echo "died (killed by SIG${name#SIG})"
  else
    echo "failed (exit code $1)"
  fi
}

status=0
dead=""      # the process whose death ended the run
dead_rc=0
running=("${!pids[@]}")
while ((${#running[@]})); do
  # returns when a process (or the terminal's tail) ends, or a trapped signal arrives
  wait -n || true
  still=()
  ended=()
  for i in "${running[@]}"; do
    if kill -0 "${pids[i]}"; then
      still+=("$i")
      continue
    fi
    rc=0
    wait "${pids[i]}" || rc=$?
    if ((rc != 0)); then
      ((status != 0)) || status=$rc
      ended+=("$i:$rc")
    fi
  done
  running=("${still[@]}")
  if [[ -n $stopping || ${#ended[@]} -eq 0 ]]; then
    continue
  fi
  # 130 / 143 is bigjax's status after SIGINT / SIGTERM (sent to one process from elsewhere): a
  # checkpoint at a step that every process saves (JAX's preemption sync), so the others must be
  # left to finish theirs.
  for e in "${ended[@]}"; do
    if [[ ${e#*:} == 130 || ${e#*:} == 143 ]]; then
      stopping=${e#*:}
    fi
  done
  [[ -z $stopping ]] || continue
  # Anything else is a death. Of several seen at once, the cause is one that did not react to
  # another's death.
  dead=${ended[0]%%:*} dead_rc=${ended[0]#*:}
  for e in "${ended[@]}"; do
    if ! reacted "${e%%:*}"; then
      dead=${e%%:*} dead_rc=${e#*:}
      break
    fi
  done
  break
done

if [[ -n $dead ]]; then
  # The others cannot go on without it (every step needs every process): stop them now rather
  # than let JAX's heartbeat abort them, and keep their last words off the terminal.
  { wc -c <"$log_dir/process-0.log" >"$cut.tmp" && mv "$cut.tmp" "$cut"; } || true
  others=""
  ((n == 1)) || others="; the others had ended"
  if ((${#running[@]})); then
    others="; stopped the others"
    alive=()
    for i in "${running[@]}"; do alive+=("${pids[i]}"); done
    kill -TERM "${alive[@]}" || true
    for _ in {1..30}; do  # a few seconds for anything they can still finish alone
      kill -0 "${alive[@]}" || break
      sleep 0.1
    done
    kill -KILL "${alive[@]}" || true
    for pid in "${alive[@]}"; do wait "$pid" || true; done
  fi
  wait "$show_pid" || true  # its tail ends with process 0
  rm -f "$cut"
  # a process other than 0 that failed with an error: its last line (process 0's is on the terminal)
  if [[ $dead != 0 ]] && ((dead_rc <= 128)); then
    last=$(grep -v '^[[:space:]]*$' "$log_dir/process-$dead.log" | tail -n 1) || true
    [[ -z $last ]] || echo "process $dead: $last" >&3
  fi
  # exit code 2 is a bigjax error (one line, above): something to fix before the rerun
  after=()
  ((dead_rc != 2)) || after=(--after-error)
  advice=$("$python" -m bigjax.resume "${after[@]}" "$@") ||
    advice="rerun the same command to resume from the newest complete checkpoint"
  echo "bigjax launch: process $dead $(how "$dead_rc")$others; $advice" >&3
  exit "$dead_rc"
fi
wait "$show_pid" || true
exit "$status"

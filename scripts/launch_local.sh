#!/usr/bin/env bash
# Starts N processes of one JAX program on loopback, each with D emulated CPU
# devices, for local multi-process testing (gloo collectives on CPU).
#
# Usage:
#   scripts/launch_local.sh [-n NUM_PROCESSES] [-d DEVICES_PER_PROCESS] [-p PORT] \
#       [-l LOG_DIR] -- python experiments/train.py --config=... --workdir=...
#
# Every process gets `--coordinator=127.0.0.1:PORT --num_processes=N --process_id=i`
# appended to the command (experiments/train.py calls jax.distributed.initialize
# with them) and JAX_NUM_CPU_DEVICES=D, JAX_PLATFORMS=cpu in its environment.
# Process i logs to LOG_DIR/process_i.log (default: a fresh temp dir) and, for
# i = 0, also to this terminal. If one process fails, the others are stopped.
# Exit status: 0 if all processes succeeded, else that of the first failure.
set -euo pipefail

n=2
d=4
port=""
log_dir=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    -n) n="$2"; shift 2 ;;
    -d) d="$2"; shift 2 ;;
    -p) port="$2"; shift 2 ;;
    -l) log_dir="$2"; shift 2 ;;
    --) shift; break ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "launch_local.sh: unknown option $1 (the command goes after --)" >&2; exit 2 ;;
  esac
done
if [[ $# -eq 0 ]]; then
  echo "launch_local.sh: no command given (put it after --)" >&2
  exit 2
fi
python_bin="${PYTHON:-python}"
if [[ -z "$port" ]]; then
  port="$("$python_bin" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
fi
if [[ -z "$log_dir" ]]; then
  log_dir="$(mktemp -d -t launch_local.XXXXXX)"
fi
mkdir -p "$log_dir"
echo "launch_local.sh: $n processes x $d CPU devices, coordinator 127.0.0.1:$port, logs in $log_dir" >&2

pids=()
cleanup() {
  for pid in "${pids[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
}
trap cleanup INT TERM

for ((i = 0; i < n; i++)); do
  log="$log_dir/process_$i.log"
  JAX_NUM_CPU_DEVICES="$d" JAX_PLATFORMS=cpu \
    "$@" --coordinator="127.0.0.1:$port" --num_processes="$n" --process_id="$i" \
    >"$log" 2>&1 &
  pids+=("$!")
done
if [[ "${LAUNCH_QUIET:-0}" != 1 ]]; then
  tail -n +1 -f "$log_dir/process_0.log" --pid="${pids[0]}" &
fi

status=0
remaining=("${pids[@]}")
while [[ ${#remaining[@]} -gt 0 ]]; do
  next=()
  for pid in "${remaining[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      next+=("$pid")
    else
      rc=0
      wait "$pid" || rc=$?
      if [[ $rc -ne 0 && $status -eq 0 ]]; then
        status=$rc
        echo "launch_local.sh: process with pid $pid exited with status $rc; stopping the others" >&2
        cleanup
      fi
    fi
  done
  remaining=("${next[@]+"${next[@]}"}")
  [[ ${#remaining[@]} -gt 0 ]] && sleep 0.5
done
wait 2>/dev/null || true
exit "$status"

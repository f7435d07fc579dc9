#!/usr/bin/env bash
# Runs N cooperating JAX processes on this machine (multi-host training, simulated locally).
#
#   launch/local.sh N [python -m puma_jax.main arguments...]
#
#   launch/local.sh 2 --config=configs/pretrain.py --workdir=/tmp/puma_2proc
#   PUMA_LOCAL_DEVICES=4 launch/local.sh 2 --config=configs/pretrain.py --workdir=/tmp/p8
#
# Each process gets PUMA_COORDINATOR=localhost:PORT, PUMA_NUM_PROCESSES=N and PUMA_PROCESS_ID=i,
# which `puma_jax.distributed.initialize` turns into `jax.distributed.initialize` (gloo
# collectives on CPU). The launcher waits for all of them; when one fails it stops the others
# and exits with that process's status. Output of process i goes to $PUMA_LOG_DIR/process_i.log
# (process 0's is also echoed here).
#
# Environment (all optional):
#   PUMA_ENTRY          python module to run (default puma_jax.main)
#   PUMA_PLATFORM       cpu (default): PUMA_LOCAL_DEVICES fake CPU devices per process;
#                       gpu: one GPU per process (CUDA_VISIBLE_DEVICES=i)
#   PUMA_LOCAL_DEVICES  CPU devices per process (default 1)
#   PUMA_PORT           coordinator port (default: a free one)
#   PUMA_LOG_DIR        log directory (default launch_logs/<date>-<pid>)
#   PUMA_PYTHON         interpreter (default python)
set -euo pipefail

if [[ $# -lt 1 || ! "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 N [puma_jax.main args...]   (N: number of processes, a positive integer)" >&2
  exit 2
fi
N=$1
shift
PY=${PUMA_PYTHON:-python}
ENTRY=${PUMA_ENTRY:-puma_jax.main}
PLATFORM=${PUMA_PLATFORM:-cpu}
LOCAL_DEVICES=${PUMA_LOCAL_DEVICES:-1}
LOG_DIR=${PUMA_LOG_DIR:-launch_logs/$(date +%Y%m%d-%H%M%S)-$$}
if [[ "$PLATFORM" != cpu && "$PLATFORM" != gpu ]]; then
  echo "PUMA_PLATFORM=$PLATFORM: choose cpu or gpu" >&2
  exit 2
fi
PORT=${PUMA_PORT:-$("$PY" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')}
mkdir -p "$LOG_DIR"

pids=()
tail_pid=
cleanup() {
  # Stop whatever is still running: TERM first (the training loop saves a checkpoint on SIGTERM), then KILL.
  local alive=()
  for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive+=("$p"); done
  if ((${#alive[@]})); then
    kill -TERM "${alive[@]}" 2>/dev/null || true
    for _ in $(seq 1 "${PUMA_KILL_GRACE_S:-20}"); do
      local left=0
      for p in "${alive[@]}"; do kill -0 "$p" 2>/dev/null && left=1; done
      ((left)) || break
      sleep 1
    done
    kill -KILL "${alive[@]}" 2>/dev/null || true
  fi
  [[ -n "$tail_pid" ]] && kill "$tail_pid" 2>/dev/null || true
}
trap 'cleanup; exit 130' INT
trap 'cleanup; exit 143' TERM

for ((i = 0; i < N; i++)); do
  log="$LOG_DIR/process_$i.log"
  : > "$log"
  if [[ "$PLATFORM" == cpu ]]; then
    env PUMA_COORDINATOR="localhost:$PORT" PUMA_NUM_PROCESSES="$N" PUMA_PROCESS_ID="$i" \
      JAX_PLATFORMS=cpu \
      XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$LOCAL_DEVICES" \
      "$PY" -m "$ENTRY" "$@" > "$log" 2>&1 &
  else
    env PUMA_COORDINATOR="localhost:$PORT" PUMA_NUM_PROCESSES="$N" PUMA_PROCESS_ID="$i" \
      CUDA_VISIBLE_DEVICES="$i" "$PY" -m "$ENTRY" "$@" > "$log" 2>&1 &
  fi
  pids+=($!)
done
echo "launch/local.sh: $N processes (${pids[*]}), coordinator localhost:$PORT, logs in $LOG_DIR" >&2
tail -n +1 -F "$LOG_DIR/process_0.log" 2>/dev/null &
tail_pid=$!

# Poll rather than `wait -n`: we must know *which* process ended to report it.
status=0
remaining=$N
declare -A done_
while ((remaining > 0)); do
  for i in "${!pids[@]}"; do
    [[ -n "${done_[$i]:-}" ]] && continue
    p=${pids[$i]}
    if ! kill -0 "$p" 2>/dev/null; then
      set +e
      wait "$p"
      rc=$?
      set -e
      done_[$i]=1
      remaining=$((remaining - 1))
      if ((rc != 0)); then
        echo "launch/local.sh: process $i (pid $p) exited with status $rc; stopping the others" >&2
        echo "---- last lines of $LOG_DIR/process_$i.log ----" >&2
        tail -n 30 "$LOG_DIR/process_$i.log" >&2 || true
        status=$rc
        cleanup
        exit $status
      fi
    fi
  done
  ((remaining > 0)) && sleep 0.5
done
sleep 0.2  # let tail flush process 0's last lines
cleanup
echo "launch/local.sh: all $N processes finished" >&2
exit 0

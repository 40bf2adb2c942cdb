#!/usr/bin/env bash
# Run N vlp_jax processes on this machine, talking over 127.0.0.1 via jax.distributed.
# Each process gets DEVICES_PER_PROCESS fake CPU devices (default 2), so the global mesh has
# N * DEVICES_PER_PROCESS devices — the same code path as a TPU pod or a GPU cluster.
#
#   launch/local_multiprocess.sh 2 --config=configs/tiny.py --workdir=runs/mp
#
# Logs go to WORKDIR-less files /tmp/vlp_jax_mp.<pid>.<i>.log; process 0 also prints to stdout.
# Interpreter: PYTHON=/path/to/python if set, else the active python3/python if it has vlp_jax,
# else ./.venv/bin/python (launch/find_python.sh).
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: $0 NUM_PROCESSES [vlp_jax.main flags...]" >&2
  exit 2
fi
N=$1; shift
# shellcheck source=launch/find_python.sh
. "$(dirname "${BASH_SOURCE[0]}")/find_python.sh"
PORT=${PORT:-$((20000 + RANDOM % 20000))}
DEVICES_PER_PROCESS=${DEVICES_PER_PROCESS:-2}
export XLA_FLAGS="--xla_force_host_platform_device_count=${DEVICES_PER_PROCESS} ${XLA_FLAGS:-}"
export JAX_PLATFORMS=cpu
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup INT TERM
# Processes 1..N-1 run under the supervisor (vlp_jax/runtime/supervise.py): if process 0, which
# hosts the coordination service, dies, JAX aborts them (134) and the supervisor turns that into
# the one-line "process 0 … is gone" and exit 8 (docs/reliability.md). It forwards the cleanup's
# SIGTERM to vlp_jax.main.
for ((i = 1; i < N; i++)); do
  "$PY" -m vlp_jax.runtime.supervise --coordinator_address="127.0.0.1:${PORT}" \
    --num_processes="$N" --process_id="$i" "$@" >"/tmp/vlp_jax_mp.$$.$i.log" 2>&1 &
  pids+=($!)
done
status=0
s0=0
"$PY" -m vlp_jax.main --coordinator_address="127.0.0.1:${PORT}" --num_processes="$N" \
  --process_id=0 "$@" || s0=$?
statuses="0:$s0"
[ "$s0" -ne 0 ] && status=$s0
for ((i = 1; i < N; i++)); do
  si=0
  wait "${pids[$((i - 1))]}" || si=$?
  statuses="$statuses $i:$si"
  [ "$si" -ne 0 ] && status=$si
done
if [ "$status" -ne 0 ]; then
  # Per process, so a killed peer (137 = SIGKILL) and the survivors' own codes (8 = a peer is
  # gone, docs/reliability.md) are both visible.
  echo "a process failed (exit $status); exit status per process (id:status): $statuses;" \
    "logs: /tmp/vlp_jax_mp.$$.*.log" >&2
fi
exit "$status"

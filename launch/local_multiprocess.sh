#!/usr/bin/env bash
# N CPU processes on this machine, one jax.distributed run (tests of multi-host code paths).
#   launch/local_multiprocess.sh 2 --config=configs/cxr.py:tiny --workdir=/tmp/mp --mode=train
# Each process gets DEVICES_PER_PROCESS fake CPU devices (default 1); extra flags go to every process.
set -euo pipefail
N="${1:?usage: $0 NUM_PROCESSES [pso_jax.main flags...]}"; shift
PORT="${PORT:-$((20000 + RANDOM % 20000))}"
DEVICES_PER_PROCESS="${DEVICES_PER_PROCESS:-1}"
cd "$(dirname "$0")/.."
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup INT TERM
for ((i = 0; i < N; i++)); do
  XLA_FLAGS="--xla_force_host_platform_device_count=${DEVICES_PER_PROCESS} ${XLA_FLAGS:-}" \
  JAX_PLATFORMS=cpu \
  python -m pso_jax.main "$@" \
    --config.distributed.coordinator_address="127.0.0.1:${PORT}" \
    --config.distributed.num_processes="${N}" \
    --config.distributed.process_id="${i}" &
  pids+=("$!")
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=$?; done
exit "$status"

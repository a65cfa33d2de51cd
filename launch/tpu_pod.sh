#!/usr/bin/env bash
# Cloud TPU pod slice: the same command on every worker (--worker=all); jax.distributed.initialize()
# detects the pod, so every host joins one run. Hosts must share the workdir (e.g. a gs:// bucket
# mounted with gcsfuse, or a Filestore path) and hold the same checkout under ~/pso_jax.
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a launch/tpu_pod.sh --config=configs/cxr.py \
#     --workdir=/mnt/runs/cxr8 --mode=train --config.train.batch_size=2048 --config.mesh.fsdp=4
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}
ARGS=$(printf '%q ' "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG --worker=all \
  --command="cd ~/pso_jax && . .venv/bin/activate && \
    PSO_JAX_COMPILATION_CACHE=\$HOME/.cache/pso_jax/xla python -m pso_jax.main --config.distributed.enabled=True $ARGS"

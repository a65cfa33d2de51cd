"""Multi-host start-up: JAX's own multi-controller runtime, auto-detected or configured."""

import os

import jax

_CLUSTER_ENV = ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES",
                "JAX_COORDINATOR_ADDRESS")


def _slurm_single_task() -> bool:
  return "SLURM_JOB_ID" in os.environ and os.environ.get("SLURM_NTASKS", "1") == "1"


def maybe_initialize(dist_config) -> None:
  """Calls jax.distributed.initialize when configured or when a cluster launched us.

  Explicit fields (coordinator_address, num_processes, process_id) win; otherwise JAX auto-detects
  SLURM, Open MPI, TPU pods and Kubernetes. A single SLURM task is a one-process run.
  """
  if jax.distributed.is_initialized():
    return
  explicit = bool(dist_config.coordinator_address)
  detected = any(k in os.environ for k in _CLUSTER_ENV) and not _slurm_single_task()
  if not (dist_config.enabled or explicit or detected):
    return
  kwargs = {}
  if explicit:
    kwargs = dict(coordinator_address=dist_config.coordinator_address,
                  num_processes=int(dist_config.num_processes),
                  process_id=int(dist_config.process_id))
  jax.distributed.initialize(**kwargs)

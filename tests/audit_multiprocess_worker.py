"""One process of the 2-process audit-kernel test: python audit_multiprocess_worker.py PORT ID OUT."""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["PSO_JAX_NO_PROGRESS"] = "1"

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_num_cpu_devices", 2)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pso_jax import parallel  # noqa: E402
from pso_jax.search import pairwise  # noqa: E402


def main():
  port, pid, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
  jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
  data = np.load(out + ".inputs.npz")
  mesh = parallel.data_mesh()
  assert mesh.size == 4, mesh
  results = {}
  for ring in (False, True):
    r = pairwise.patient_search(data["q"], data["r"], data["patients"], float(data["tau"]), 5,
                                query_block=16, ref_block=64, mesh=mesh, ring=ring, count_k=6)
    results[f"sims_{ring}"], results[f"idx_{ring}"] = r.topk_sims, r.topk_idx
    results[f"count_{ring}"] = r.n_patients_matched
  np.savez(f"{out}.{pid}.npz", **results)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main()

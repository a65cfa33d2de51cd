"""One process of the 2-process prepare test: python prepare_multiprocess_worker.py PORT ID WORKDIR
CHUNK OUT. Runs the prepare stage on the tiny config (records cut into chunks of CHUNK) as one of 2
jax.distributed processes and saves how many chunks this process computed and the record
files it wrote."""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["PSO_JAX_NO_PROGRESS"] = "1"

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 2)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from conftest import load_config  # noqa: E402
from pso_jax.data import prepare_plan  # noqa: E402
from pso_jax.stages import prepare  # noqa: E402


def main():
  port, pid, workdir, chunk, out = (int(sys.argv[1]), int(sys.argv[2]), sys.argv[3],
                                    int(sys.argv[4]), sys.argv[5])
  jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
  config = load_config("tiny")
  config.data.prepare_chunk = chunk
  computed = []
  share = prepare_plan.compute_share

  def counted(*args, **kwargs):
    computed.append(share(*args, **kwargs))
    return computed[-1]
  prepare_plan.compute_share = counted
  parts = []  # the record files this process wrote (its manifests)
  write_share = prepare_plan.write_share

  def recorded(*args, **kwargs):
    parts.extend(write_share(*args, **kwargs))
    return parts
  prepare_plan.write_share = recorded
  card = prepare.run(config, workdir)
  with open(f"{out}.{pid}.json", "w") as f:
    json.dump({"computed": computed, "parts": parts, "records": {s: v["records"] for s, v in card["splits"].items()}}, f)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main()

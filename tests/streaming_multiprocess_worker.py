"""One process of the 2-process streaming test: python streaming_multiprocess_worker.py PORT ID
WORKDIR OUT. Runs pipeline.split_pass over the prepared train split's lazy image column (a numpy
row-wise embedder and a FrozenNetwork) and saves what it got and how many rows it decoded at once."""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["PSO_JAX_NO_PROGRESS"] = "1"

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_num_cpu_devices", 2)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pso_jax.data import dataset, pipeline  # noqa: E402
from pso_jax.models.batched_apply import FrozenNetwork  # noqa: E402
from pso_jax.privacy import attackers  # noqa: E402


def row_sums(v, x):
  return x.reshape(x.shape[0], -1).astype(jax.numpy.float32).sum(1) * v


def main():
  port, pid, workdir, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
  jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
  image = dataset.load_columns(workdir, "train", ("image",))["image"]
  dataset.LazyColumn.largest_read = 0
  pixels = pipeline.split_pass(attackers.PixelEmbedder(8).embed, image)
  largest = dataset.LazyColumn.largest_read
  sums = pipeline.split_pass(FrozenNetwork(row_sums, np.float32(0.5), batch_size=8), image)
  np.savez(f"{out}.{pid}.npz", pixels=pixels, sums=sums, largest=largest,
           share=np.array(pipeline.process_share(len(image))))
  jax.distributed.shutdown()


if __name__ == "__main__":
  main()

"""Benchmarks: `python -m pso_jax.bench NAME [flags]`, NAME in data | train | audit | sample | vae | cnn | pod |
memory | prepare.

Each prints its figures as ratios against a reference measured in the same run (the machine's
matmul rate, faiss, ...), never as absolute targets.
"""

import importlib
import sys

BENCHES = {
    "data": "pso_jax.bench.data",
    "train": "pso_jax.bench.train",
    "audit": "pso_jax.bench.audit",
    "sample": "pso_jax.bench.sample",
    "vae": "pso_jax.bench.vae",
    "cnn": "pso_jax.bench.cnn",
    "pod": "pso_jax.bench.pod",  # compiled for a TPU slice on this host (needs libtpu)
    "memory": "pso_jax.bench.memory",  # peak RSS per stage at N and 4N, loader vs train step
    "prepare": "pso_jax.bench.prepare_scaling",  # prepare's wall time over 1, 2, ... processes
}


def main():
  if len(sys.argv) < 2 or sys.argv[1] not in BENCHES:
    print(__doc__.strip())
    print("available:", ", ".join(BENCHES))
    sys.exit(2)
  name = sys.argv.pop(1)
  module = importlib.import_module(BENCHES[name])
  module.main(sys.argv)


if __name__ == "__main__":
  main()

"""grain loaders over a prepared split, sharded by JAX process, and global batches on the mesh.

Every process builds the same loader; `ShardByJaxProcess` gives each process a disjoint share of
the records and each batch holds global_batch_size // process_count of them, so the local batches
together form one global batch (`to_global`). Batches have static shapes (drop_remainder), so
jitted steps never recompile. The loader's iterator has get_state()/set_state() for exact resume
(saved with the checkpoint by the training loop).
"""

import grain
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from pso_jax.errors import UserError


def per_process_batch(global_batch_size: int) -> int:
  count = jax.process_count()
  if global_batch_size % count:
    raise UserError(f"global batch size {global_batch_size} is not divisible by the "
                    f"{count} processes; choose a multiple of {count}")
  return global_batch_size // count


def make_loader(source, *, global_batch_size: int, seed: int, shuffle: bool = True,
                num_epochs: int | None = None, operations=(), worker_count: int = 0,
                read_options: grain.ReadOptions | None = None) -> grain.DataLoader:
  """A grain DataLoader yielding dicts of numpy batches of global_batch_size // process_count.

  `operations` run per record before batching (grain transforms, e.g. grain.transforms.Map).
  num_epochs=None repeats forever. read_options: grain's reader threads and prefetch buffer
  (grain's default: 16 threads; on a small CPU machine num_threads=0 can be faster).
  """
  local = per_process_batch(global_batch_size)
  shard = grain.sharding.ShardByJaxProcess(drop_remainder=True)
  if len(source) // jax.process_count() < local:
    raise UserError(f"the split has {len(source)} records: too few for a batch of {local} per "
                    f"process on {jax.process_count()} process(es); lower the batch size")
  sampler = grain.samplers.IndexSampler(num_records=len(source), shard_options=shard,
                                        shuffle=shuffle, num_epochs=num_epochs, seed=seed)
  ops = list(operations) + [grain.transforms.Batch(batch_size=local, drop_remainder=True)]
  return grain.DataLoader(data_source=source, sampler=sampler, operations=ops,
                          worker_count=worker_count, read_options=read_options)


def _is_numeric(x) -> bool:
  return isinstance(x, np.ndarray) and x.dtype.kind in "biufc"


def to_global(batch: dict, mesh, spec=P("data")) -> dict:
  """Process-local numpy batch -> global jax.Arrays sharded by `spec` on `mesh`.

  Text fields (patient ids, paths) stay local numpy arrays: they never enter jitted code.
  """
  sharding = NamedSharding(mesh, spec)
  return {k: jax.make_array_from_process_local_data(sharding, v) if _is_numeric(v) else v
          for k, v in batch.items()}

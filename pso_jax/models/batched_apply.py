"""Running a frozen network over many images: fixed-size batches sharded over this process's devices.

Every process of a multi-host run encodes its own records, so the mesh spans the local devices
only. A short last batch is padded to a power-of-two size (`bucket_size`: few compiled shapes,
little padding) and the padding is dropped.
"""

import math
from typing import Any, Callable, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from pso_jax import progress


def local_data_mesh() -> Mesh:
  devices = np.array(jax.local_devices())
  return Mesh(devices, ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def bucket_size(rows: int, multiple: int, batch_size: int) -> int:
  """The batch `rows` rows run at: `batch_size` (a multiple of `multiple`), or for fewer rows the
  smallest power-of-two multiple of `multiple` that holds them. A short batch then pads at most
  2x, and callers with ever-changing short counts (selection's retry rounds) compile at most
  log2(batch_size / multiple) extra shapes instead of one per count."""
  size = multiple
  while size < rows:
    size *= 2
  return min(size, batch_size)


def apply_in_batches(fn: Callable, arrays, batch_size: int,
                     sharding: Optional[NamedSharding] = None,
                     on_batch: Optional[Callable[[int], Any]] = None):
  """`fn(*batch)` for consecutive batches of `arrays` (same leading axis, at least one row),
  concatenated: an array or tuple of arrays with the batch's leading axis.

  Batches hold `batch_size` rows, rounded up to a multiple of `sharding`'s devices; a short last
  (or only) batch runs at `bucket_size`'s power-of-two size, so a jitted `fn` compiles for few
  shapes and pads little. Each batch is put on `sharding` when given, padded with copies of its
  last row, and the padding dropped from the outputs. `on_batch(rows)` is called after each batch
  with its number of real rows (a progress bar's update).
  """
  n = len(arrays[0])
  n_dev = 1 if sharding is None else sharding.mesh.size
  full = max(1, math.ceil(batch_size / n_dev)) * n_dev
  outs = []
  for start in range(0, n, full):
    bs = bucket_size(n - start, n_dev, full)
    chunk = [np.asarray(a[start:start + bs]) for a in arrays]
    valid = len(chunk[0])
    if valid < bs:
      chunk = [np.concatenate([c, np.repeat(c[-1:], bs - valid, axis=0)]) for c in chunk]
    if sharding is not None:
      chunk = jax.device_put(chunk, sharding)
    out = fn(*chunk)
    outs.append(jax.tree.map(lambda o: np.asarray(jax.device_get(o))[:valid], out))
    if on_batch is not None:
      on_batch(valid)
  return jax.tree.map(lambda *o: np.concatenate(o), *outs)


class BatchedApply:
  """`BatchedApply(fn, variables)(*arrays)`: fn(variables, batch) for every batch, concatenated
  (`apply_in_batches`, with a progress bar).

  batch is the tuple of the arrays' slices; fn maps it to an array (or tuple of arrays) with the
  same leading axis.
  The jitted function and the replicated variables are kept, so repeated calls do not recompile.
  """

  def __init__(self, fn: Callable, variables, *, batch_size: int, desc: str = "", unit: str = "img"):
    self.mesh = local_data_mesh()
    self.n_dev = self.mesh.devices.size
    self.batch_size = max(1, math.ceil(batch_size / self.n_dev)) * self.n_dev
    self.desc, self.unit = desc, unit
    replicated = NamedSharding(self.mesh, P())
    self.data = NamedSharding(self.mesh, P("data"))
    self.variables = jax.device_put(variables, replicated)
    self.fn = jax.jit(fn, in_shardings=(replicated, self.data), out_shardings=self.data)

  def __call__(self, *arrays: np.ndarray):
    n = len(arrays[0])
    if n == 0:
      raise ValueError("BatchedApply called with no images")
    with progress.bar(total=n, desc=self.desc, unit=self.unit) as pbar:
      return apply_in_batches(lambda *chunk: self.fn(self.variables, chunk), arrays,
                              self.batch_size, self.data, pbar.update)

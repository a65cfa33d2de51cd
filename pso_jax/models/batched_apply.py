"""Running a frozen network over many images: fixed-size batches sharded over this process's devices.

Every process of a multi-host run encodes its own records, so the mesh spans the local devices
only. The last batch is padded to the fixed size (no recompilation) and the padding is dropped.
"""

import math
from typing import Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from pso_jax import progress


def local_data_mesh() -> Mesh:
  devices = np.array(jax.local_devices())
  return Mesh(devices, ("data",), axis_types=(jax.sharding.AxisType.Auto,))


class BatchedApply:
  """`BatchedApply(fn, variables)(*arrays)`: fn(variables, batch) for every batch, concatenated.

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
    # fewer than one batch: round up to the devices only (a second compile, not a large pad)
    bs = min(self.batch_size, max(1, math.ceil(n / self.n_dev)) * self.n_dev)
    outs = []
    with progress.bar(total=n, desc=self.desc, unit=self.unit) as pbar:
      for start in range(0, n, bs):
        chunk = [np.asarray(a[start:start + bs]) for a in arrays]
        valid = len(chunk[0])
        if valid < bs:
          chunk = [np.concatenate([c, np.repeat(c[-1:], bs - valid, axis=0)]) for c in chunk]
        out = self.fn(self.variables, tuple(chunk))
        outs.append(jax.tree.map(lambda o: np.asarray(o)[:valid], out))
        pbar.update(valid)
    if not outs:
      raise ValueError("BatchedApply called with no images")
    return jax.tree.map(lambda *o: np.concatenate(o), *outs)

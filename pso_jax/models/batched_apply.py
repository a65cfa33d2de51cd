"""Running a frozen network over many images: fixed-size batches sharded over this process's devices.

`apply_in_batches(fn, arrays, batch_size, mesh)` is the loop: consecutive batches, each split over
the mesh's batch axes, a short last batch padded to a power-of-two size (`bucket_size`: few
compiled shapes, little padding) and the padding dropped. `FrozenNetwork` binds it to a network:
the jitted function and its variables, replicated once over the local devices (every process of a
multi-host run runs the network over its own images).
"""

import math
from typing import Any, Callable, Optional

import jax
import numpy as np
from jax.sharding import Mesh

from pso_jax import parallel, progress
from pso_jax.errors import UserError


def bucket_size(rows: int, multiple: int, batch_size: int) -> int:
  """The batch `rows` rows run at: `batch_size` (a multiple of `multiple`), or for fewer rows the
  smallest power-of-two multiple of `multiple` that holds them. A short batch then pads at most
  2x, and callers with ever-changing short counts (selection's retry rounds) compile at most
  log2(batch_size / multiple) extra shapes instead of one per count."""
  size = multiple
  while size < rows:
    size *= 2
  return min(size, batch_size)


def apply_in_batches(fn: Callable, arrays, batch_size: int, mesh: Optional[Mesh] = None,
                     on_batch: Optional[Callable[[int], Any]] = None):
  """`fn(*batch)` for consecutive batches of `arrays` (same leading axis, at least one row),
  concatenated: an array or tuple of arrays with the batch's leading axis, on the host.

  Batches hold `batch_size` rows, rounded up to a multiple of the mesh's batch shards; a short last
  (or only) batch runs at `bucket_size`'s power-of-two size, so a jitted `fn` compiles for few
  shapes and pads little. Each batch is padded with copies of its last row, put on the mesh's
  batch sharding when a mesh is given (one made of this process's devices), and the padding
  dropped from the outputs. `on_batch(rows)` is called after each batch with its number of real
  rows (a progress bar's update).
  """
  n = len(arrays[0])
  n_dev = 1 if mesh is None else parallel.batch_shards(mesh)
  full = max(1, math.ceil(batch_size / n_dev)) * n_dev
  outs = []
  for start in range(0, n, full):
    bs = bucket_size(n - start, n_dev, full)
    chunk = [np.asarray(a[start:start + bs]) for a in arrays]
    valid = len(chunk[0])
    if valid < bs:
      chunk = [np.concatenate([c, np.repeat(c[-1:], bs - valid, axis=0)]) for c in chunk]
    if mesh is not None:
      chunk = parallel.host_to_global(chunk, parallel.batch_sharding(mesh))
    out = fn(*chunk)
    outs.append(jax.tree.map(lambda o: o[:valid], parallel.to_host(out)))
    if on_batch is not None:
      on_batch(valid)
  return jax.tree.map(lambda *o: np.concatenate(o), *outs)


def check_images(images, channels: int, what: str):
  """`images` as a numpy array [N, H, W, channels], or a UserError naming `what` and the shape.
  A lazy column (shape, dtype and row slicing, e.g. `data.dataset.RecordColumn`) is passed on as
  it is: `apply_in_batches` reads it one batch at a time."""
  if not (hasattr(images, "shape") and hasattr(images, "dtype") and hasattr(images, "__getitem__")
          and hasattr(images, "__len__")):
    images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] != channels:
    raise UserError(f"{what} expects uint8 images [N, H, W, {channels}], got "
                    f"{images.dtype} {images.shape}")
  return images


class FrozenNetwork:
  """`FrozenNetwork(fn, variables, batch_size=...)(*arrays)`: `fn(variables, *batch)` for every
  batch of the arrays, concatenated (`apply_in_batches` over this process's devices).

  fn maps the batch's arrays to an array (or tuple of arrays) with the same leading axis. It is
  jitted once and the variables replicated once over the local devices, so repeated calls neither
  recompile nor copy the weights again. `desc`: show a progress bar under that name.
  """

  def __init__(self, fn: Callable, variables, *, batch_size: int, desc: Optional[str] = None,
               unit: str = "img"):
    self.mesh = parallel.data_mesh(jax.local_devices())
    self.batch_size, self.desc, self.unit = batch_size, desc, unit
    replicated, batch = parallel.replicated(self.mesh), parallel.batch_sharding(self.mesh)
    self.variables = jax.device_put(variables, replicated)
    self._fn = jax.jit(lambda v, arrays: fn(v, *arrays), in_shardings=(replicated, batch),
                       out_shardings=batch)

  def __call__(self, *arrays) -> np.ndarray:
    n = len(arrays[0])
    if n == 0:
      raise UserError(f"no images to run {self.desc or 'the network'} on (empty input)")
    run = lambda *chunk: self._fn(self.variables, chunk)
    if self.desc is None:
      return apply_in_batches(run, arrays, self.batch_size, self.mesh)
    with progress.bar(total=n, desc=self.desc, unit=self.unit) as pbar:
      return apply_in_batches(run, arrays, self.batch_size, self.mesh, pbar.update)

"""apply_in_batches: outputs equal the function over all rows, short batches pad to power-of-two
buckets (few compiled shapes, small pads), on one device and sharded over 8; FrozenNetwork runs a
jitted function of (variables, *arrays) the same way and refuses empty input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pso_jax import parallel
from pso_jax.errors import UserError
from pso_jax.models.batched_apply import FrozenNetwork, apply_in_batches, bucket_size


def test_bucket_size():
  assert [bucket_size(r, 1, 32) for r in (1, 2, 3, 5, 9, 17, 32, 33)] == [1, 2, 4, 8, 16, 32, 32, 32]
  assert [bucket_size(r, 8, 48) for r in (1, 8, 9, 17, 33, 48)] == [8, 8, 16, 32, 48, 48]


@pytest.mark.parametrize("sharded", [False, True])
def test_outputs_and_batch_shapes(sharded):
  mesh = parallel.data_mesh(jax.local_devices()) if sharded else None
  n_dev = 8 if sharded else 1
  assert jax.device_count() == 8
  x = np.arange(70 * 3, dtype=np.float32).reshape(70, 3)
  shapes = []

  def fn(batch):  # eager, so every call is seen
    shapes.append(batch.shape[0])
    return jnp.sin(batch) * 2, batch.sum(axis=1)

  out, total = apply_in_batches(fn, (x,), batch_size=32, mesh=mesh)
  np.testing.assert_allclose(out, np.sin(x) * 2, rtol=1e-6)
  np.testing.assert_allclose(total, x.sum(axis=1), rtol=1e-6)
  # 70 rows: two full batches of 32, then 6 rows padded to 8 (any device count: a multiple of it)
  assert shapes == [32, 32, 8]
  shapes.clear()
  apply_in_batches(fn, (x[:5],), batch_size=32, mesh=mesh)
  assert shapes == [8]
  shapes.clear()
  apply_in_batches(fn, (x[:3],), batch_size=32, mesh=mesh)
  assert shapes == [n_dev if sharded else 4]


def test_frozen_network():
  x = np.arange(21 * 3, dtype=np.float32).reshape(21, 3)
  index = np.arange(21, dtype=np.int32)
  w = {"w": np.float32(0.5)}
  net = FrozenNetwork(lambda v, a, i: (a * v["w"], i * 2), w, batch_size=12)
  assert net.variables["w"].sharding.is_fully_replicated
  scaled, doubled = net(x, index)
  np.testing.assert_array_equal(scaled, x * 0.5)
  np.testing.assert_array_equal(doubled, index * 2)
  with pytest.raises(UserError, match="no images to run the network on"):
    net(x[:0], index[:0])

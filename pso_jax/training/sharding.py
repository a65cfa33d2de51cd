"""Sharding rules for the train state: FSDP over large arrays, small ones replicated.

One rule for every leaf (parameters, Adam moments, EMA copies share shapes, so they share
shardings): an array with at least `min_size` elements is split over the 'fsdp' axis along its
largest dimension that the fsdp size divides; anything else is replicated.
"""

import math

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def leaf_spec(shape, fsdp: int, min_size: int) -> P:
  if fsdp <= 1 or not shape or math.prod(shape) < min_size:
    return P()
  for axis in sorted(range(len(shape)), key=lambda a: (-shape[a], a)):
    if shape[axis] % fsdp == 0:
      spec = [None] * len(shape)
      spec[axis] = "fsdp"
      return P(*spec)
  return P()


def state_shardings(abstract_tree, mesh: Mesh, min_size: int):
  """NamedShardings for every leaf of `abstract_tree` (arrays or ShapeDtypeStructs)."""
  fsdp = mesh.shape["fsdp"]
  return jax.tree.map(lambda x: NamedSharding(mesh, leaf_spec(tuple(x.shape), fsdp, min_size)),
                      abstract_tree)


def with_shardings(abstract_tree, shardings):
  """ShapeDtypeStructs carrying shardings: the restore target for orbax."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      abstract_tree, shardings)


def create_sharded(init_fn, mesh: Mesh, min_size: int, *args):
  """Runs `init_fn(*args)` jitted with its outputs created directly in their shards.

  Returns (tree, shardings); no full copy of a large array ever lives on one device.
  """
  abstract = jax.eval_shape(init_fn, *args)
  shardings = state_shardings(abstract, mesh, min_size)
  with jax.set_mesh(mesh):
    tree = jax.jit(init_fn, out_shardings=shardings)(*args)
  return tree, shardings

"""Meshes, shardings and host<->global arrays: the one place pso_jax decides how work is split.

Every jitted function runs on a mesh with axes ('data', 'fsdp'). The batch is split over both
axes (every device sees its own images); large parameters and their optimizer and EMA copies are
additionally split over 'fsdp': an array with at least `min_size` elements is split along its
largest dimension that the fsdp size divides; anything else is replicated.
"""

import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from pso_jax.errors import UserError, require

AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")  # the leading (batch) axis of every input is split over both


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, int]:
  """(data, fsdp) sizes from the config; data = -1 takes every device fsdp leaves."""
  data, fsdp = int(mesh_config.data), int(mesh_config.fsdp)
  require(fsdp >= 1, f"config.mesh.fsdp={fsdp} must be >= 1 (1 = no parameter sharding)")
  if data == -1:
    require(num_devices % fsdp == 0,
            f"config.mesh.fsdp={fsdp} does not divide the {num_devices} devices; choose an fsdp "
            f"size that divides {num_devices}, e.g. --config.mesh.fsdp=1")
    data = num_devices // fsdp
  require(data >= 1, f"config.mesh.data={data} must be -1 (fill) or >= 1")
  if data * fsdp > num_devices:
    raise UserError(
        f"mesh data={data} x fsdp={fsdp} needs {data * fsdp} devices but only {num_devices} are "
        f"available; use --config.mesh.data=-1 to fill the devices, or a smaller mesh")
  return data, fsdp


def make_mesh(mesh_config, devices=None) -> Mesh:
  """A ('data', 'fsdp') mesh with Auto (GSPMD) axes over `devices` (default: all devices).

  A mesh smaller than the device list uses its first devices (single-process runs only: every
  process of a multi-host run must own part of the mesh).
  """
  devices = list(jax.devices() if devices is None else devices)
  data, fsdp = mesh_shape(mesh_config, len(devices))
  used = devices[:data * fsdp]
  if jax.process_count() > 1:
    require(len(used) == len(devices),
            f"a multi-process run must use every device: mesh data={data} x fsdp={fsdp} uses "
            f"{len(used)} of {len(devices)}; use --config.mesh.data=-1")
  return jax.make_mesh((data, fsdp), AXES, axis_types=(AxisType.Auto,) * 2, devices=used)


def micro_batch_size(global_batch: int, grad_accum: int, mesh: Mesh) -> int:
  """The micro-batch size, after checking the batch splits evenly over micro-batches and devices."""
  n = mesh.size
  require(global_batch >= 1 and grad_accum >= 1,
          f"config.train.batch_size={global_batch} and grad_accum={grad_accum} must be positive")
  require(global_batch % grad_accum == 0,
          f"global batch {global_batch} is not divisible by config.train.grad_accum={grad_accum}; "
          "choose a grad_accum that divides config.train.batch_size")
  micro = global_batch // grad_accum
  if micro % n:
    good = n * grad_accum * max(1, round(global_batch / (n * grad_accum)))
    raise UserError(
        f"global batch {global_batch} (micro-batch {micro} with grad_accum={grad_accum}) is not "
        f"divisible by the {n} devices of the mesh; use a batch that is a multiple of "
        f"{n * grad_accum}, e.g. --config.train.batch_size={good}")
  require(global_batch % jax.process_count() == 0,
          f"global batch {global_batch} is not divisible by the {jax.process_count()} processes")
  return micro


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def describe(mesh: Mesh) -> str:
  kinds = sorted({d.device_kind for d in np.ravel(mesh.devices)})
  return (f"mesh data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']} over "
          f"{math.prod(mesh.devices.shape)} {'/'.join(kinds)} device(s), "
          f"{jax.process_count()} process(es)")


# XLA:CPU (jax 0.10) hands convolutions, dots and elementwise fusions to YNNPACK by default. On
# this model's 3x3 convolutions its kernel-gradient convolution runs at a third to a half of the
# rate of XLA's own (Eigen) convolution and needs extra transposes; with YNNPACK off the whole
# train step is ~1.2x (tiny preset) to ~1.9x (xs) faster and the demo sampler ~1.3x, with the same
# numbers to float rounding.
CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


def compiler_options(mesh):
  """XLA options for programs run on `mesh`: CPU_COMPILER_OPTIONS on CPU, none elsewhere."""
  return dict(CPU_COMPILER_OPTIONS) if mesh.devices.flat[0].platform == "cpu" else None


# ----------------------------------------------------------------- train-state shardings (FSDP)


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

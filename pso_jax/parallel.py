"""Meshes, shardings and host<->global arrays: the one place pso_jax decides how work is split.

Meshes: `make_mesh(config.mesh)` is the training mesh, axes ('data', 'fsdp'); `data_mesh(devices)`
is a one-axis ('data',) mesh over all devices, or over `jax.local_devices()` for work each process
does on its own (running a frozen network over its own images).

The batch (leading) axis of every input is split over every batch axis the mesh has
(`batch_spec`: ('data', 'fsdp') on the training mesh, ('data',) on a data mesh), so every device
sees its own rows. Large parameters and their optimizer and EMA copies are additionally split over
'fsdp' (`state_shardings`): an array with at least `min_size` elements is split along its largest
dimension that the fsdp size divides; anything else is replicated.

Host <-> global: `host_to_global` when every process holds the whole array, `local_rows_to_global`
when each process holds only its rows, `to_host` back to numpy (all rows, on every process).
"""

import math

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from pso_jax.errors import UserError, require

AXES = ("data", "fsdp")  # every pso_jax mesh has these axes, or just 'data'


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


def data_mesh(devices=None) -> Mesh:
  """A one-axis ('data',) mesh with an Auto (GSPMD) axis over `devices` (default: every device of
  every process; `jax.local_devices()` for work each process does on its own rows)."""
  devices = list(jax.devices() if devices is None else devices)
  return jax.make_mesh((len(devices),), ("data",), axis_types=(AxisType.Auto,), devices=devices)


def micro_batch_size(global_batch: int, grad_accum: int, mesh: Mesh) -> int:
  """The micro-batch size, after checking the batch splits evenly over micro-batches and devices."""
  n = batch_shards(mesh)
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


# ----------------------------------------------------------------------------- batch shardings


def batch_axes(mesh: Mesh) -> tuple:
  """The mesh axes the batch is split over: those of ('data', 'fsdp') the mesh has."""
  other = [a for a in mesh.axis_names if a not in AXES]
  if other:
    raise ValueError(f"pso_jax meshes have axes from {AXES}; this one also has {other}")
  return tuple(a for a in AXES if a in mesh.axis_names)


def batch_spec(mesh: Mesh) -> P:
  """The PartitionSpec of every batch: the leading axis split over all batch axes."""
  return P(batch_axes(mesh))


def batch_shards(mesh: Mesh) -> int:
  """How many parts a batch is split into (a batch size must be a multiple of it)."""
  return math.prod(mesh.shape[a] for a in batch_axes(mesh))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, batch_spec(mesh))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


# ----------------------------------------------------------------------------- host <-> global


def host_to_global(tree, sharding: NamedSharding):
  """Global jax.Arrays with `sharding` from host arrays every process holds in full (each process
  copies only its own shards); `tree` is an array or a pytree of them."""
  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
  return jax.tree.map(put, tree)


def _is_numeric(x) -> bool:
  return isinstance(x, np.ndarray) and x.dtype.kind in "biufc"


def local_rows_to_global(tree, sharding: NamedSharding):
  """Global jax.Arrays with `sharding` from process-local numpy arrays holding only this process's
  rows (those its devices hold under `sharding`: `pipeline.process_rows(sharding, B)`).

  Text leaves (patient ids, paths) stay local numpy arrays: they never enter jitted code.
  """
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x) if _is_numeric(x) else x, tree)


def to_host(tree):
  """Writable numpy copies of jax.Arrays (an array or a pytree): all rows, on every process. A
  global array of a multi-process run is gathered from every process (every process must call)."""
  def get(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.array(multihost_utils.process_allgather(x, tiled=True))
    return np.array(x)
  return jax.tree.map(get, tree)


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

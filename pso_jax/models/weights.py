"""Loading PyTorch-format weights into Flax variable trees, with one clear error per bad tensor.

Names: a PyTorch key `encoder.down_blocks.0.resnets.1.conv1.weight` is the Flax path
`encoder/down_blocks_0/resnets_1/conv1/kernel` (a list index joins its parent with `_`).
Layouts: conv OIHW -> HWIO, linear [out, in] -> [in, out], a 1-d norm `weight` -> `scale`; batch-norm
`running_mean`/`running_var` go to the `batch_stats` collection as `mean`/`var`.

Files: `.safetensors` (read here, no torch needed; bf16/fp16 are widened to fp32), `.pth`/`.pt`
(torch.load, imported lazily, weights_only=True), and this package's converted `.safetensors`, whose
keys are already Flax paths (`params/encoder/conv_in/kernel`) and whose metadata names the arch.
"""

import json
import math
import os
import re
import struct

import numpy as np

from pso_jax.errors import UserError

FORMAT_TAG = "pso_jax"          # safetensors metadata "format" of converted files
_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
              "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
              "BOOL": "bool"}
_FLOAT_DTYPES = ("float64", "float32", "float16", "bfloat16")
_BN_STATS = {"running_mean": "mean", "running_var": "var"}
IGNORED_SUFFIXES = (".num_batches_tracked",)


# ------------------------------------------------------------------------------------ files
def _read_header(path: str) -> tuple[dict, int]:
  """(JSON header, its length) of a safetensors file: 8-byte little-endian length, then JSON."""
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise UserError(f"{path} is not a safetensors file (only {size} bytes); download it again")
    (n,) = struct.unpack("<Q", head)
    if n > size - 8 or n > 100_000_000:
      raise UserError(f"{path} is truncated or not a safetensors file (header of {n} bytes in a "
                      f"{size}-byte file); download it again")
    try:
      header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError):
      raise UserError(f"{path} has a corrupt safetensors header; download it again") from None
  if not isinstance(header, dict):
    raise UserError(f"{path} has a corrupt safetensors header; download it again")
  meta = header.get("__metadata__") or {}
  if not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
    raise UserError(f"{path}: the safetensors header's __metadata__ is {meta!r}, not a map of "
                    "strings; the file is corrupt, download it again")
  return header, n


def _entry(path: str, name: str, info) -> tuple[np.dtype, list, int, int]:
  """(dtype, shape, start, end) of one tensor's header entry; a malformed one is a UserError."""
  def corrupt(problem: str) -> UserError:
    return UserError(f"{path}: tensor {name!r} {problem} in the safetensors header; the file is "
                     "corrupt, download it again")
  if not isinstance(info, dict):
    raise corrupt(f"is {info!r}, not an entry with dtype, shape and data_offsets")
  missing = [k for k in ("dtype", "shape", "data_offsets") if k not in info]
  if missing:
    raise corrupt(f"has no {' or '.join(missing)}")
  st_dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
  if st_dtype not in _ST_DTYPES:
    raise UserError(f"{path}: tensor {name!r} has dtype {st_dtype}, which pso_jax cannot read")
  import ml_dtypes  # ships with jax; numpy has no bfloat16
  dtype = np.dtype(ml_dtypes.bfloat16) if st_dtype == "BF16" else np.dtype(_ST_DTYPES[st_dtype])
  is_int = lambda x: isinstance(x, int) and not isinstance(x, bool)
  if not (isinstance(shape, list) and all(is_int(d) and d >= 0 for d in shape)):
    raise corrupt(f"has shape {shape!r}")
  if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(is_int, offsets))
          and 0 <= offsets[0] <= offsets[1]):
    raise corrupt(f"has data_offsets {offsets!r}, not [start, end]")
  start, end = offsets
  if end - start != math.prod(shape) * dtype.itemsize:
    raise corrupt(f"has shape {shape} of {st_dtype} but data_offsets {offsets} ({end - start} bytes)")
  return dtype, shape, start, end


def read_safetensors_metadata(path: str) -> dict[str, str]:
  return _read_header(path)[0].get("__metadata__") or {}


def read_safetensors(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """(tensors, metadata) of a safetensors file; a truncated or malformed file is a UserError."""
  header, n = _read_header(path)
  size = os.path.getsize(path)
  meta = header.pop("__metadata__", None) or {}
  data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n) if size > 8 + n else np.zeros(0, np.uint8)
  tensors = {}
  for name, info in header.items():
    dtype, shape, start, end = _entry(path, name, info)
    if end > data.size:
      raise UserError(f"{path} is truncated: tensor {name!r} ends at byte {end} of the data but the "
                      f"file holds only {data.size}; download it again")
    tensors[name] = np.frombuffer(data[start:end], dtype=dtype).reshape(shape)
  return tensors, meta


def read_torch(path: str) -> dict[str, np.ndarray]:
  try:
    import torch
  except ImportError:
    raise UserError(f"{path} is a PyTorch pickle; reading it needs torch (pip install -e '.[torch]'), "
                    "or convert it once elsewhere with `python -m pso_jax.tools.convert`") from None
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises many types for a bad pickle
    raise UserError(f"{path} could not be read as a PyTorch checkpoint ({type(e).__name__}: "
                    f"{str(e)[:200]}); is the file complete?") from None
  for key in ("state_dict", "model", "model_state_dict"):  # training checkpoints wrap the weights
    if isinstance(obj, dict) and isinstance(obj.get(key), dict):
      obj = obj[key]
  if not isinstance(obj, dict):
    raise UserError(f"{path} holds a {type(obj).__name__}, not a state dict of tensors")
  out = {}
  for k, v in obj.items():
    if isinstance(v, torch.Tensor):
      v = v.detach().cpu()
      out[k] = v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
  return out


def read_weights(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """(tensors, metadata) of a .safetensors or .pth/.pt/.bin/.tar file."""
  if not os.path.isfile(path):
    raise UserError(f"weight file {path!r} does not exist; see third_party/README.md for what to "
                    "download and where to put it")
  if path.endswith(".safetensors"):
    return read_safetensors(path)
  return read_torch(path), {}


# ------------------------------------------------------------------------------------ names
def torch_key_to_path(key: str) -> tuple[str, ...]:
  """`a.b.0.c.weight` -> ('a', 'b_0', 'c', 'weight') (leaf renamed later, it depends on the shape)."""
  out = []
  for part in key.split("."):
    if part.isdigit() and out:
      out[-1] = f"{out[-1]}_{part}"
    else:
      out.append(part)
  return tuple(out)


def path_to_torch_key(collection: str, path: tuple[str, ...]) -> str:
  *mods, leaf = path
  mods = [re.sub(r"_(\d+)$", r".\1", m) for m in mods]
  if collection == "batch_stats":
    leaf = {"mean": "running_mean", "var": "running_var"}[leaf]
  else:
    leaf = {"kernel": "weight", "scale": "weight"}.get(leaf, leaf)
  return ".".join(mods + [leaf])


def torch_to_flax(tensors: dict[str, np.ndarray], source: str) -> dict[tuple, tuple[str, np.ndarray]]:
  """{(collection, *path): (torch key, array in Flax layout)}; non-float tensors are a UserError."""
  out = {}
  for key, value in tensors.items():
    if key.endswith(IGNORED_SUFFIXES):
      continue
    if str(value.dtype) not in _FLOAT_DTYPES:
      raise UserError(f"{source}: tensor {key!r} has dtype {value.dtype}, expected a float type "
                      "(float32/float16/bfloat16); is this a weight file?")
    value = np.asarray(value, np.float32)
    *mods, leaf = torch_key_to_path(key)
    collection = "params"
    if leaf in _BN_STATS:
      collection, leaf = "batch_stats", _BN_STATS[leaf]
    elif leaf == "weight":
      if value.ndim == 4:
        value, leaf = value.transpose(2, 3, 1, 0), "kernel"   # OIHW -> HWIO
      elif value.ndim == 2:
        value, leaf = value.T, "kernel"                       # [out, in] -> [in, out]
      elif value.ndim == 1:
        leaf = "scale"
    out[(collection, *mods, leaf)] = (key, np.ascontiguousarray(value))
  return out


def flatten(tree, prefix=()) -> dict[tuple, object]:
  if isinstance(tree, dict) or hasattr(tree, "items"):
    out = {}
    for k, v in tree.items():
      out.update(flatten(v, prefix + (k,)))
    return out
  return {prefix: tree}


def unflatten(flat: dict[tuple, object]) -> dict:
  out: dict = {}
  for path, v in flat.items():
    node = out
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = v
  return out


def match_to_template(converted: dict[tuple, tuple[str, np.ndarray]], template, source: str,
                      arch: str) -> dict:
  """Variables shaped like `template` (a tree of arrays or ShapeDtypeStructs) from `converted`.

  A tensor the network lacks, one the file lacks, or one of another shape is a UserError naming
  it by its PyTorch key. When almost nothing matches, the file is for another architecture.
  """
  expected = flatten(template)
  got = set(converted)
  want = set(expected)
  overlap = len(got & want)
  if overlap < 0.5 * len(want):
    sample = ", ".join(sorted(k for k, _ in converted.values())[:3])
    raise UserError(f"{source} does not hold {arch} weights: only {overlap} of the {len(want)} "
                    f"tensors {arch} needs are in it (it has e.g. {sample or 'nothing'}); "
                    "check that the file is the right network")
  missing = sorted(path_to_torch_key(p[0], p[1:]) for p in want - got)
  if missing:
    raise UserError(f"{source} lacks {len(missing)} tensor(s) {arch} needs: "
                    f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
  extra = sorted(converted[p][0] for p in got - want)
  if extra:
    raise UserError(f"{source} has {len(extra)} tensor(s) that {arch} does not use: "
                    f"{', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}; is it another "
                    "variant of the network?")
  flat = {}
  for path, spec in expected.items():
    key, value = converted[path]
    if tuple(value.shape) != tuple(spec.shape):
      raise UserError(f"{source}: tensor {key!r} has shape {_torch_shape(value)} but {arch} expects "
                      f"{_torch_shape(np.empty(spec.shape))} (PyTorch layout); wrong config or file?")
    flat[path] = value
  return unflatten(flat)


def _torch_shape(flax_value: np.ndarray) -> tuple:
  if flax_value.ndim == 4:
    return tuple(np.empty(flax_value.shape).transpose(3, 2, 0, 1).shape)
  return tuple(flax_value.shape[::-1])


def converted_variables(tensors: dict[str, np.ndarray], meta: dict, source: str, arch: str) -> dict:
  """{(collection, *path): (name, array)} from a file written by `pso_jax.tools.convert`."""
  if meta.get("arch") != arch:
    raise UserError(f"{source} was converted for {meta.get('arch')!r}, not {arch!r}")
  out = {}
  for key, value in tensors.items():
    if str(value.dtype) not in _FLOAT_DTYPES:
      raise UserError(f"{source}: tensor {key!r} has dtype {value.dtype}, expected float32")
    out[tuple(key.split("/"))] = (key, np.asarray(value, np.float32))
  return out


def is_converted(meta: dict) -> bool:
  return meta.get("format") == FORMAT_TAG


def write_converted(path: str, variables: dict, arch: str, extra_meta: dict | None = None) -> None:
  """Writes a Flax variable tree as `.safetensors` with '/'-joined keys (atomically)."""
  from safetensors.numpy import save
  from pso_jax import io_utils
  flat = {"/".join(k): np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in flatten(variables).items()}
  meta = {"format": FORMAT_TAG, "arch": arch, **(extra_meta or {})}
  io_utils.write_bytes(path, save(flat, metadata=meta))


def flax_to_torch(variables: dict) -> dict[str, np.ndarray]:
  """The PyTorch state dict a Flax variable tree came from (inverse of `torch_to_flax`)."""
  out = {}
  for (collection, *path), value in flatten(variables).items():
    value = np.asarray(value, np.float32)
    if path[-1] == "kernel":
      value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
    out[path_to_torch_key(collection, tuple(path))] = np.ascontiguousarray(value)
  return out

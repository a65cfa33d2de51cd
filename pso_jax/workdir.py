"""The workdir holds one run: its resolved config, and each stage's outputs beside it.

A rerun with a different config in the same workdir is refused (stages would silently mix outputs
of two configs) unless the user asks for it. Fields that only say how to run, not what to compute
(mesh shape, process layout, loader workers), may change freely: that is how a run resumes on
another machine. The config is stored once a stage has finished with it, so a refused or failed
first run leaves no config behind that would refuse the corrected one.
"""

import json
import os

import ml_collections

from pso_jax import io_utils
from pso_jax.errors import UserError

CONFIG_FILE = "config.json"
RUNTIME_ONLY = ("mesh", "distributed", "data.worker_count", "sample.batch_size",
                "audit.query_block", "audit.ref_block")


def config_field(config, dotted: str):
  """config.a.b for "a.b" (any depth; "" is the config itself)."""
  for part in filter(None, dotted.split(".")):
    config = config[part]
  return config


def set_config_field(config, dotted: str, value) -> None:
  """config.a.b = value for "a.b"."""
  parent, _, name = dotted.rpartition(".")
  config_field(config, parent)[name] = value


def config_to_dict(config: ml_collections.ConfigDict) -> dict:
  # JSON round trip: tuples become lists, so a stored and a fresh config compare equal
  return json.loads(json.dumps(config.to_dict(), default=list))


def _strip_runtime(d: dict) -> dict:
  d = json.loads(json.dumps(d))
  for dotted in RUNTIME_ONLY:
    node, *rest = dotted.split(".")
    if not rest:
      d.pop(node, None)
    elif isinstance(d.get(node), dict):
      d[node].pop(rest[0], None)
  return d


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
  out = []
  for key in sorted(set(a) | set(b)):
    name = prefix + key
    if isinstance(a.get(key), dict) and isinstance(b.get(key), dict):
      out += _differences(a[key], b[key], name + ".")
    elif a.get(key, "<absent>") != b.get(key, "<absent>"):
      out.append(f"{name}: {a.get(key, '<absent>')!r} -> {b.get(key, '<absent>')!r}")
  return out


def check_workdir(workdir: str, config: ml_collections.ConfigDict,
                  allow_config_change: bool = False) -> None:
  """Creates the workdir and refuses a config other than the one it holds; writes no config."""
  if not workdir:
    raise UserError("--workdir is required: the folder where this run's files go, e.g. --workdir=runs/demo")
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write_probe.{os.getpid()}")  # per process: no race
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise UserError(f"workdir {workdir!r} is not writable ({e.strerror}); choose a folder you can "
                    "write to with --workdir=...") from None
  path = os.path.join(workdir, CONFIG_FILE)
  if os.path.exists(path):
    stored = io_utils.read_json(path)
    diff = _differences(_strip_runtime(stored), _strip_runtime(config_to_dict(config)))
    if diff and not allow_config_change:
      shown = "\n  ".join(diff[:20]) + ("\n  ..." if len(diff) > 20 else "")
      raise UserError(
          f"workdir {workdir!r} holds a run with a different config:\n  {shown}\n"
          "Use a new --workdir for a new experiment, or pass --allow_config_change to continue "
          "this one with the new config (outputs of earlier stages are kept as they are).")


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Stores the resolved config: the one the workdir's outputs were made with (process 0)."""
  io_utils.write_json(os.path.join(workdir, CONFIG_FILE), config_to_dict(config))


def prepare_workdir(workdir: str, config: ml_collections.ConfigDict,
                    allow_config_change: bool = False) -> None:
  """check_workdir, then write_config (`main` writes only after a stage has finished)."""
  check_workdir(workdir, config, allow_config_change)
  write_config(workdir, config)


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a workdir was run with (for --compare and for stages that read another run)."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise UserError(f"{workdir!r} is not a pso_jax workdir (no {CONFIG_FILE}); point to a folder "
                    "that a pso_jax run wrote")
  return ml_collections.ConfigDict(io_utils.read_json(path))

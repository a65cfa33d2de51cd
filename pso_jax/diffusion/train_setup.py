"""What the `train` stage builds before its loop: config checks, the run's keys, the sharded state's
shapes, the k-anonymous condition table, and the loader's batches as the train step reads them.

Shared with `diffusion.denoiser`, which reads a trained state back into the same shapes.
"""

import os

import jax
import numpy as np

from pso_jax import io_utils, parallel
from pso_jax.diffusion import ema as ema_lib
from pso_jax.diffusion import regulariser
from pso_jax.diffusion import train_step as step_lib
from pso_jax.errors import UserError, require
from pso_jax.models import presets


KANON_MATCH = ("any", "findings")  # regulariser.kanon_match: where k-anonymous neighbours are sought


def keys(config):
  """(init key, train key): fixed by the seed, independent of devices and processes."""
  root = jax.random.fold_in(jax.random.key(int(config.seed)), 0x7EA1)
  return jax.random.fold_in(root, 0), jax.random.fold_in(root, 1)


def check_config(config) -> None:
  """Bad training settings stop here, before data or compilation."""
  t, r = config.train, config.regulariser
  presets.cond_dim(config)  # the condition mode
  require(t.total_images >= t.batch_size,
          f"config.train.total_images={t.total_images} is less than one batch "
          f"({t.batch_size}); raise total_images or lower batch_size")
  require(0 <= r.cond_dropout < 1, f"config.regulariser.cond_dropout={r.cond_dropout} must be in [0, 1)")
  require(r.jitter >= 0, f"config.regulariser.jitter={r.jitter} must be >= 0")
  require(0 <= r.kanon_prob <= 1, f"config.regulariser.kanon_prob={r.kanon_prob} must be in [0, 1]")
  require(r.kanon_match in KANON_MATCH, f"config.regulariser.kanon_match={r.kanon_match!r} must be "
          f"one of {KANON_MATCH}")
  require(r.kanon_k >= 0, f"config.regulariser.kanon_k={r.kanon_k} must be >= 0 (0 = off)")
  require(t.nan_patience >= 1, f"config.train.nan_patience={t.nan_patience} must be >= 1")
  require(len(t.ema_stds) >= 1, "config.train.ema_stds needs at least one EMA width, e.g. (0.05, 0.10)")
  for std in t.ema_stds:
    try:
      ema_lib.std_to_gamma(std)
    except ValueError as e:
      raise UserError(f"config.train.ema_stds: {e}") from None


def kanon_table(config, workdir: str, out_dir: str):
  """[N_train, d] k-anonymous conditions (neighbours found once and kept in diffusion/)."""
  if config.model.cond == "uncond" or not regulariser.uses_kanon(config.regulariser):
    return None
  from pso_jax.data.dataset import load_table
  k = int(config.regulariser.kanon_k)
  by_findings = config.regulariser.kanon_match == "findings"
  cond_key = "feature" if config.model.cond == "pseudo" else "labels"
  # the condition table is resident (N x d); the images are dropped as the records stream past
  keys = {"feature", cond_key, "patient_id"} | ({"labels"} if by_findings else set())
  arrays = load_table(workdir, "train", keys=tuple(keys))
  path = os.path.join(out_dir, f"kanon_neighbours_k{k}{'_findings' * by_findings}.npy")
  if os.path.exists(path):
    neighbours = np.load(path)
  else:
    if by_findings:
      neighbours = regulariser.kanon_neighbours_by_findings(
          arrays["feature"], arrays["labels"], arrays["patient_id"], k)
    else:
      neighbours = regulariser.kanon_neighbours(arrays["feature"], arrays["patient_id"], k)
    if jax.process_index() == 0:
      io_utils.write_npy(path, neighbours)
  require(len(neighbours) == len(arrays["feature"]),
          f"{path} was computed for another train split; delete it and rerun")
  return regulariser.kanon_conditions(arrays[cond_key], neighbours)


def model_batch(records: dict, config, kanon_table=None) -> dict:
  """Loader records (process-local numpy) -> what the train step reads: x, cond, kanon_cond."""
  from pso_jax.data.latents import to_model_space
  if config.data.latent.kind == "identity":
    x = to_model_space(records["image"], config)
  else:
    x = records["latent"]
  out = {"x": np.asarray(x, np.float32)}
  if config.model.cond == "pseudo":
    out["cond"] = np.asarray(records["feature"], np.float32)
  elif config.model.cond == "class":
    out["cond"] = np.asarray(records["labels"], np.float32)
  if kanon_table is not None:
    out["kanon_cond"] = kanon_table[np.asarray(records["index"])]
  return out


class RelocatableSource:
  """The train split under a repr without its path: grain compares repr(source) when restoring
  an iterator, and a workdir may be moved or mounted elsewhere between a kill and the resume."""

  def __init__(self, source):
    self._source = source

  def __len__(self):
    return len(self._source)

  def __getitem__(self, i):
    return self._source[i]

  def __getitems__(self, indices):
    if hasattr(self._source, "__getitems__"):
      return self._source.__getitems__(indices)
    return [self._source[i] for i in indices]

  def __repr__(self):
    return f"pso_jax train split ({len(self._source)} records)"


class BatchStream:
  """The loader iterator, one batch read ahead, whose checkpointed state counts only the batches
  handed to training (so a checkpoint taken while the next batch is prefetched resumes right)."""

  def __init__(self, iterator):
    self._it = iterator
    self._state = iterator.get_state()
    self._ahead = None

  def prefetch(self) -> None:
    if self._ahead is None:
      batch = next(self._it)
      self._ahead = (batch, self._it.get_state())

  def take(self):
    self.prefetch()
    (batch, self._state), self._ahead = self._ahead, None
    return batch

  # the grain checkpoint handler's protocol
  def get_state(self):
    return self._state

  def set_state(self, state) -> None:
    self._it.set_state(state)
    self._state, self._ahead = state, None

  def start_prefetch(self) -> None:
    pass


def abstract_state(model, config, mesh):
  init_key, _ = keys(config)
  abstract = jax.eval_shape(lambda k: step_lib.init_state(model, config, k), init_key)
  shardings = parallel.state_shardings(abstract, mesh, int(config.mesh.fsdp_min_size))
  return abstract, shardings


def ema_by_std(state, config) -> dict:
  return dict(zip(tuple(config.train.ema_stds), state.ema))


def every(images: int, batch: int) -> int:
  return max(1, int(images) // batch)

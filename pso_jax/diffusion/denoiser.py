"""A trained denoiser read back from a workdir's `diffusion/` folder (what the `train` stage wrote):
the raw weights, a tracked EMA, or an EMA width reconstructed post hoc from the saved snapshots.
"""

import dataclasses
import math
import os

import jax
import numpy as np
from absl import logging

from pso_jax import parallel
from pso_jax.diffusion import ema as ema_lib
from pso_jax.diffusion import train_setup
from pso_jax.errors import require
from pso_jax.models import presets
from pso_jax.training import checkpoint as ckpt_lib

SUBDIR = "diffusion"  # the train stage's folder under the workdir


def stage_dir(workdir: str) -> str:
  return os.path.join(workdir, SUBDIR)


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(stage_dir(workdir), "checkpoints")


def snapshot_dir(workdir: str) -> str:
  return os.path.join(stage_dir(workdir), "ema_snapshots")


@dataclasses.dataclass(frozen=True)
class Trained:
  model: object     # for model.apply(variables, x, sigma, cond, train=False)
  variables: dict
  step: int         # the checkpoint it came from


def load(config, workdir: str, *, ema_std: float | None = None, step: int | None = None) -> Trained:
  """The trained denoiser of a run.

  ema_std None uses config.sample.ema_std; 0 gives the raw training weights; a tracked width its
  EMA; any other width is reconstructed post hoc from the EMA snapshots saved up to that step.
  step None takes the newest checkpoint that restores: a corrupt one (a truncated file) is named
  in a warning and the one before it is used.
  """
  ema_std = float(config.sample.ema_std if ema_std is None else ema_std)
  directory = checkpoint_dir(workdir)
  ckpt = ckpt_lib.Checkpointer(directory, keep=int(config.train.keep_checkpoints), async_save=False)
  steps = ckpt.all_steps()
  require(steps, f"no diffusion checkpoint in {directory}; run --mode=train with --workdir={workdir} first")
  require(step is None or int(step) in steps,
          f"no diffusion checkpoint of step {step} in {directory}; saved steps: {steps}")
  model = presets.build_model(config)
  mesh = parallel.make_mesh(config.mesh)
  abstract, shardings = train_setup.abstract_state(model, config, mesh)
  target = parallel.with_shardings(abstract, shardings)
  try:
    if step is None:
      step, (state, _), corrupt = ckpt.restore_newest(lambda s: ckpt.restore(s, target))
      if jax.process_index() == 0:
        for bad, why in corrupt:
          logging.warning("checkpoint %d in %s does not restore (%s); using the one of step %d",
                          bad, directory, why, step)
    else:
      step = int(step)
      state, _ = ckpt.restore(step, target)
  finally:
    ckpt.close()
  tracked = [i for i, s in enumerate(config.train.ema_stds) if math.isclose(s, ema_std, rel_tol=1e-6)]
  if ema_std == 0:
    params = state.params
  elif tracked:
    params = state.ema[tracked[0]]
  else:
    params = _posthoc_params(config, workdir, state.params, ema_std, step)
  return Trained(model, {"params": params, **state.constants}, step)


def load_denoiser(config, workdir: str, *, ema_std: float | None = None, step: int | None = None):
  """(model, variables) of `load`, for `model.apply(variables, x, sigma, cond, train=False)`."""
  trained = load(config, workdir, ema_std=ema_std, step=step)
  return trained.model, trained.variables


def _posthoc_params(config, workdir, like, ema_std: float, step: int):
  nimg = step * int(config.train.batch_size)
  found = [s for s in ckpt_lib.list_ema_snapshots(snapshot_dir(workdir))
           if s[0] <= nimg]
  require(found, f"EMA width {ema_std} is not tracked (config.train.ema_stds="
          f"{tuple(config.train.ema_stds)}) and no EMA snapshots up to step {step} exist to "
          "reconstruct it; sample with a tracked width or 0 (raw weights)")
  host_like = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), like)
  snapshots = [(n, s, ckpt_lib.load_ema_snapshot(p, host_like)) for n, s, p in found]
  params = ema_lib.reconstruct_posthoc(snapshots, ema_std, target_nimg=nimg)
  return jax.tree.map(lambda p, a: jax.device_put(p, a.sharding), params, like)

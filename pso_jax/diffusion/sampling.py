"""A trained workdir turned into a `GuidedSampler`: the one way the `sample` and `select` stages load
the model (EMA weights, the configured guide, the training mesh), what each candidate is
conditioned on, the fingerprint of the model that made the images, and the preview grid.
"""

import dataclasses
import hashlib
import json
import math

import jax
import jax.numpy as jnp
import numpy as np

from pso_jax import workdir as workdir_lib
from pso_jax.diffusion import denoiser, train_setup
from pso_jax.diffusion import sampler as sampler_lib
from pso_jax.errors import UserError, require

GUIDES = ("null_cond", "separate", "autoguidance")
PREVIEW_STREAM, SELECT_STREAM = 1, 2  # noise streams: preview and selection never share seeds


@dataclasses.dataclass
class LoadedSampler:
  sampler: sampler_lib.GuidedSampler
  fingerprint: dict  # what model made the images: config hash + weight checksums
  config: object

  def generate(self, seeds, cond, guidance) -> np.ndarray:
    """uint8 images [M, H, W, C] (decoded through the latent autoencoder)."""
    from pso_jax.data.latents import from_model_space
    return from_model_space(self.sampler(seeds, cond, guidance), self.config)


def check_sample_config(config) -> None:
  s = config.sample
  require(int(s.steps) >= 1, f"config.sample.steps={s.steps} must be >= 1 (the reference uses 32)")
  require(0 < s.sigma_min < s.sigma_max, f"config.sample.sigma_min={s.sigma_min} and sigma_max="
          f"{s.sigma_max} must satisfy 0 < sigma_min < sigma_max (EDM: 0.002 and 80)")
  require(s.rho > 0, f"config.sample.rho={s.rho} must be positive (EDM: 7)")
  require(s.guide in GUIDES, f"config.sample.guide={s.guide!r} is unknown; use one of "
          f"{', '.join(GUIDES)}")
  require(int(s.batch_size) >= 1, f"config.sample.batch_size={s.batch_size} must be >= 1")


def conditions_for(config, train: dict) -> np.ndarray:
  """What each training image's candidates are conditioned on: [N, cond_dim] (cond_dim may be 0)."""
  from pso_jax.models.presets import cond_dim
  n, dim = len(train["labels"]), cond_dim(config)
  mode = config.model.cond
  if mode == "uncond":
    return np.zeros((n, 0), np.float32)
  if mode == "class":
    return np.asarray(train["labels"], np.float32)
  features = train.get("feature")
  if features is None or len(features) != n:
    raise UserError(f"pseudo-conditioning needs one feature per training image ({n}), found "
                    f"{0 if features is None else len(features)}; rerun --mode=prepare")
  features = np.asarray(features, np.float32).reshape(n, -1)
  if features.shape[1] != dim:
    raise UserError(f"training features have {features.shape[1]} dimensions but the model is "
                    f"conditioned on {dim} (config.data.features.dim); rerun --mode=prepare "
                    "with the config the model was trained with")
  norms = np.linalg.norm(features, axis=1)
  missing = np.flatnonzero(~np.isfinite(norms) | (norms < 1e-6))
  if len(missing):
    raise UserError(f"{len(missing)} training images have no feature vector (zero or non-finite "
                    f"rows, e.g. train index {missing[0]}); rerun --mode=prepare to recompute them")
  return features


def _config_hash(config) -> str:
  """Hash of what decides the images and the selection (not how they are run)."""
  d = workdir_lib.config_to_dict(config)
  keep = {k: d[k] for k in ("seed", "data", "model", "diffusion", "regulariser", "train", "sample",
                            "select") if k in d}
  for runtime in ("batch_size", "grid"):
    keep.get("sample", {}).pop(runtime, None)
  keep.get("data", {}).pop("worker_count", None)
  keep["audit_tau"] = d.get("audit", {}).get("tau")
  return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


@jax.jit
def _checksum(tree) -> jax.Array:
  """A weight fingerprint that tells checkpoints apart: weighted sums of every leaf."""
  total = jnp.zeros((), jnp.float32)
  for i, leaf in enumerate(jax.tree.leaves(tree)):
    leaf = leaf.astype(jnp.float32).reshape(-1)
    weights = jnp.cos(jnp.arange(leaf.size, dtype=jnp.float32) * 0.618 + i)
    total = total + jnp.sum(leaf * weights)
  return total


def weight_checksum(variables) -> float:
  return float(np.asarray(_checksum(variables))) if variables is not None else 0.0


UNGUIDED = "--config.sample.guidance=1 --config.select.guidance_step=0"  # g = 1 in every round


def check_guide(config, guided: bool) -> None:
  """What the configured guide needs from the config alone (checked before any work)."""
  from pso_jax.models.presets import cond_dim
  s = config.sample
  if not guided:
    return
  if s.guide == "null_cond":
    r = config.regulariser
    if cond_dim(config) == 0:
      why = "this model is unconditional (config.model.cond='uncond')"
    elif not r.enabled:
      why = ("config.regulariser.enabled=False turns condition dropout off, so the model never "
             "learns the null condition")
    elif r.cond_dropout <= 0:
      why = ("config.regulariser.cond_dropout=0 (no condition dropout), so the model never "
             "learns the null condition")
    else:
      why = ""
    require(not why,
            f"config.sample.guide='null_cond' guides with the model's own null condition, but {why}. "
            f"Sample unguided ({UNGUIDED}), or guide with an unconditional model "
            "(--config.sample.guide=separate --config.sample.guide_workdir=<its workdir>) or an "
            "earlier checkpoint (--config.sample.guide=autoguidance --config.sample.guide_step=N)")
  elif s.guide == "separate":
    require(bool(s.guide_workdir), "config.sample.guide='separate' needs "
            "--config.sample.guide_workdir=<workdir of an unconditional model>")
  else:
    require(int(s.guide_step) >= 0, "config.sample.guide='autoguidance' needs "
            "--config.sample.guide_step=<an earlier checkpoint step of this model>")
    check_guide_step(config)


def checkpoint_steps(config) -> tuple[int, int]:
  """(total steps, checkpoint interval in steps) of the train stage: a checkpoint is saved at
  every multiple of the interval and at the last step."""
  batch = int(config.train.batch_size)
  return (-(-int(config.train.total_images) // batch),
          train_setup.every(config.train.checkpoint_images, batch))


def check_guide_step(config) -> None:
  """Autoguidance's guide_step is a checkpoint the train stage saves, before the last one (the
  last is the model itself), and its EMA width can be had there."""
  step, total, interval = int(config.sample.guide_step), *checkpoint_steps(config)
  saved = [s for s in (interval, 2 * interval) if s < total]
  require(0 < step < total and step % interval == 0,
          f"config.sample.guide_step={step} is not an earlier checkpoint of this run: training "
          f"saves one every {interval} steps (config.train.checkpoint_images / batch_size) up to "
          f"step {total}; choose a multiple of {interval} below {total}"
          + (f", e.g. {', '.join(map(str, saved))}" if saved else
             " (this run saves none: lower config.train.checkpoint_images)"))
  ema_std = float(config.sample.ema_std)
  tracked = any(math.isclose(float(t), ema_std, rel_tol=1e-6) for t in config.train.ema_stds)
  if ema_std > 0 and not tracked:  # reconstructed post hoc from the snapshots up to that step
    first = train_setup.every(config.train.snapshot_images, int(config.train.batch_size))
    require(step >= first,
            f"config.sample.ema_std={ema_std} is not a tracked EMA width, so the guide at "
            f"config.sample.guide_step={step} would be reconstructed from EMA snapshots, but the "
            f"first is saved at step {first}; use a tracked width "
            f"({tuple(config.train.ema_stds)}), 0 (raw weights) or a later guide_step")


def kept_checkpoint_steps(config) -> tuple[int, ...]:
  """Checkpoints the train stage keeps beyond the newest config.train.keep_checkpoints: the
  autoguidance guide's, which sampling loads after training."""
  if config.sample.guide == "autoguidance" and int(config.sample.guide_step) > 0:
    return (int(config.sample.guide_step),)
  return ()


def _guide(config, workdir, net: sampler_lib.Denoiser):
  """The reference denoiser D_ref of the configured guidance."""
  from pso_jax.models.presets import model_input_shape
  check_guide(config, guided=True)
  s = config.sample
  if s.guide == "null_cond":
    return sampler_lib.null_condition_guide(net)
  if s.guide == "separate":
    guide_config = workdir_lib.load_config(s.guide_workdir)
    require(guide_config.model.cond == "uncond",
            f"the guide in {s.guide_workdir!r} is a {guide_config.model.cond!r} model; "
            "config.sample.guide='separate' needs an unconditional one (model.cond='uncond')")
    require(tuple(model_input_shape(guide_config)) == tuple(model_input_shape(config)),
            f"the guide in {s.guide_workdir!r} works on {model_input_shape(guide_config)} inputs, "
            f"this model on {model_input_shape(config)}; train the guide on the same data")
    model, variables = denoiser.load_denoiser(guide_config, s.guide_workdir, ema_std=s.ema_std)
    return sampler_lib.unconditional_guide(sampler_lib.flax_denoiser(model, variables))
  model, variables = denoiser.load_denoiser(config, workdir, ema_std=s.ema_std, step=int(s.guide_step))
  return sampler_lib.flax_denoiser(model, variables)


def load_sampler(config, workdir: str, *, stream: int, guided: bool, mesh=None,
                 batch_size=None) -> LoadedSampler:
  """The trained model (EMA of width config.sample.ema_std) and its guide, ready to sample.

  guided: whether any guidance != 1 will be asked for (else no guide is loaded).
  """
  from pso_jax.data.latents import resolve_stats
  from pso_jax.models.presets import model_input_shape
  check_sample_config(config)
  config = resolve_stats(config, workdir)  # latent.stats=dataset: decode with the card's mean/std
  s = config.sample
  trained = denoiser.load(config, workdir, ema_std=s.ema_std)
  variables = trained.variables
  net = sampler_lib.flax_denoiser(trained.model, variables)
  ref = _guide(config, workdir, net) if guided else None
  if mesh is None:
    from pso_jax.parallel import make_mesh
    mesh = make_mesh(config.mesh)
  key = jax.random.fold_in(jax.random.key(int(config.seed)), stream)
  sampler = sampler_lib.GuidedSampler(
      net, ref, key=key, shape=model_input_shape(config), steps=int(s.steps),
      sigma_min=float(s.sigma_min), sigma_max=float(s.sigma_max), rho=float(s.rho),
      batch_size=int(batch_size or s.batch_size), mesh=mesh)
  fingerprint = dict(config_hash=_config_hash(config), checkpoint_step=trained.step,
                     weights=round(weight_checksum(variables), 3),
                     guide=s.guide if ref is not None else "none",
                     guide_weights=round(weight_checksum(ref.variables), 3) if ref is not None
                     and ref.variables is not variables else None)
  return LoadedSampler(sampler, fingerprint, config)


def preview_grid(real: np.ndarray, generated: np.ndarray, columns: int, pad: int = 2) -> np.ndarray:
  """Rows alternate: a row of real images, then the row of candidates conditioned on them."""
  n, h, w, c = real.shape
  rows = -(-n // columns)
  grid = np.full((2 * rows * (h + pad) + pad, columns * (w + pad) + pad, c), 255, np.uint8)
  for k in range(n):
    r, col = divmod(k, columns)
    for offset, images in ((0, real), (1, generated)):
      y = (2 * r + offset) * (h + pad) + pad
      x = col * (w + pad) + pad
      grid[y:y + h, x:x + w] = images[k]
  return grid

"""The space the diffusion model works in, and the way back to images.

`identity`: pixels, uint8 [0, 255] -> float32 [-1, 1] (and back, rounded and clipped).
`sd_vae`: Stable Diffusion VAE latents, normalised per channel; delegated to
`pso_jax.data.vae_latents` (which loads the VAE weights only when used, so pixel-space runs need
none).

Per-channel statistics (`config.data.latent.stats`): `config` normalises sd_vae latents with
config.data.latent.mean/std (the reference's cxr8 constants by default) and leaves identity pixels
in [-1, 1]; `dataset` uses the mean/std of the train split's raw values (unit pixels for identity,
VAE posterior samples for sd_vae), which `prepare` computes and records in the dataset card:
z = (raw - mean_c) * (final_std / std_c) for both kinds. Stages that map to or from model space
read the recorded ones with `resolve_stats(config, workdir)`.
"""

import copy

import numpy as np

from pso_jax.data import vae_latents
from pso_jax.errors import UserError

KINDS = ("identity", "sd_vae")
STATS = ("config", "dataset")
CARD_KEY = "latent_stats"  # the dataset card's entry
_RESOLVED = "recorded_in"  # set on a config whose dataset statistics were read from a card


def check_kind(config) -> str:
  """The latent kind, or a UserError naming the allowed ones."""
  kind = config.data.latent.kind
  if kind not in KINDS:
    raise UserError(f"config.data.latent.kind={kind!r} is unknown; use one of {', '.join(KINDS)}")
  return kind


def check_stats(config) -> str:
  stats = config.data.latent.stats
  if stats not in STATS:
    raise UserError(f"config.data.latent.stats={stats!r} is unknown; use config (the per-channel "
                    "mean/std in config.data.latent) or dataset (computed on the train split by "
                    "prepare and recorded in data/card.json)")
  return stats


def _normalises(config) -> bool:
  """Whether model space is raw values normalised per channel (sd_vae always; identity only with
  dataset statistics: with config ones it stays [-1, 1])."""
  return config.data.latent.kind != "identity" or check_stats(config) == "dataset"


def stats_of(config) -> tuple[np.ndarray, np.ndarray, np.float32]:
  """(mean [c], std [c], final_std) that map raw values to model space."""
  l = config.data.latent
  if check_stats(config) == "dataset" and _RESOLVED not in l:
    raise RuntimeError("config.data.latent.stats='dataset' but this config's statistics were not "
                       "read from the dataset card: call latents.resolve_stats(config, workdir)")
  return np.asarray(l.mean, np.float32), np.asarray(l.std, np.float32), np.float32(l.final_std)


def normalise(raw, config) -> np.ndarray:
  mean, std, final_std = stats_of(config)
  return (np.asarray(raw, np.float32) - mean) * (final_std / std)


def denormalise(z, config) -> np.ndarray:
  mean, std, final_std = stats_of(config)
  return np.asarray(z, np.float32) * (std / final_std) + mean


def resolve_stats(config, workdir: str):
  """The config the model space of `workdir`'s dataset needs: unchanged with stats=config, else a
  copy whose latent.mean/std are the ones prepare recorded in the dataset card."""
  if check_stats(config) != "dataset" or _RESOLVED in config.data.latent:
    return config
  from pso_jax.data import dataset  # dataset reads records: imported when used
  card = dataset.load_card(workdir)
  recorded = card.get(CARD_KEY, {})
  if recorded.get("used") != "dataset":
    raise UserError(f"config.data.latent.stats='dataset' but the dataset in "
                    f"{dataset.data_dir(workdir)} was prepared with {recorded.get('used', 'config')} "
                    "statistics; prepare it again with --config.data.latent.stats=dataset (or "
                    "train with stats=config)")
  resolved = copy.deepcopy(config)
  with resolved.unlocked():
    resolved.data.latent.mean = tuple(recorded["mean"])
    resolved.data.latent.std = tuple(recorded["std"])
    # the card's place in any workdir (not its path: a config hash must not depend on where the
    # workdir lies)
    resolved.data.latent[_RESOLVED] = f"{dataset.SUBDIR}/{dataset.CARD_FILE}"
  return resolved


def with_stats(config, mean, std):
  """A copy of the config with these dataset statistics in force (prepare, before the card)."""
  out = copy.deepcopy(config)
  with out.unlocked():
    out.data.latent.mean = tuple(float(m) for m in mean)
    out.data.latent.std = tuple(float(s) for s in std)
    out.data.latent[_RESOLVED] = "prepare"
  return out


class RunningStats:
  """Per-channel mean and (population) std of [..., C] arrays seen in parts (Chan et al.'s
  pairwise merge of count, mean and squared deviations, in float64)."""

  def __init__(self):
    self.n, self.mean, self.m2 = 0, None, None

  def update(self, x) -> None:
    x = np.asarray(x, np.float64).reshape(-1, np.shape(x)[-1])
    if len(x):
      mean = x.mean(0)
      self.merge(len(x), mean, ((x - mean) ** 2).sum(0))

  def merge(self, n: int, mean, m2) -> None:
    """Adds a part summarised elsewhere (its count, mean and squared deviations)."""
    if not n:
      return
    if self.mean is None:
      self.n, self.mean, self.m2 = int(n), np.asarray(mean, np.float64), np.asarray(m2, np.float64)
      return
    total = self.n + n
    delta = mean - self.mean
    self.mean = self.mean + delta * (n / total)
    self.m2 = self.m2 + m2 + delta ** 2 * (self.n * n / total)
    self.n = total

  def result(self) -> tuple[np.ndarray, np.ndarray]:
    if not self.n:
      raise UserError("the train split is empty: no latent statistics can be computed")
    return self.mean, np.sqrt(self.m2 / self.n)


def pixels_to_unit(images_uint8) -> np.ndarray:
  return np.asarray(images_uint8, np.float32) / 127.5 - 1.0


def unit_to_pixels(x) -> np.ndarray:
  return np.clip(np.rint((np.asarray(x, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def to_raw_space(images_uint8, config, *, start_index: int = 0) -> np.ndarray:
  """uint8 [N, H, W, C] -> float32 raw values before the per-channel normalisation: unit pixels
  (identity) or VAE posterior samples (sd_vae).

  start_index: dataset position of the first image (the VAE's posterior noise is drawn per
  position, so a dataset encoded in chunks matches one encoded at once).
  """
  if check_kind(config) == "identity":
    return pixels_to_unit(images_uint8)
  images_uint8 = np.asarray(images_uint8, np.uint8)
  return np.asarray(vae_latents.encode_images(config, images_uint8, start_index=start_index,
                                              normalised=False), np.float32)


def to_model_space(images_uint8, config, *, start_index: int = 0) -> np.ndarray:
  """uint8 [N, H, W, C] -> float32 model inputs [N, h, w, c]."""
  if not _normalises(config):
    return pixels_to_unit(images_uint8)
  if check_kind(config) == "identity":
    return normalise(pixels_to_unit(images_uint8), config)
  images_uint8 = np.asarray(images_uint8, np.uint8)
  return np.asarray(vae_latents.encode_images(config, images_uint8, start_index=start_index), np.float32)


def from_model_space(x, config) -> np.ndarray:
  """float32 model outputs [N, h, w, c] -> uint8 images [N, H, W, C]."""
  if check_kind(config) == "identity":
    return unit_to_pixels(denormalise(x, config) if _normalises(config) else x)
  return np.asarray(vae_latents.decode_latents(config, np.asarray(x, np.float32)), np.uint8)


def model_shape(config) -> tuple[int, int, int]:
  """(h, w, c) of one model-space sample, without running an encoder."""
  d = config.data
  if check_kind(config) == "identity":
    return (d.image_size, d.image_size, d.channels)
  return tuple(vae_latents.latent_shape(config))

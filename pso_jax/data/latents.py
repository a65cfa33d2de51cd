"""The space the diffusion model works in, and the way back to images.

`identity`: pixels, uint8 [0, 255] -> float32 [-1, 1] (and back, rounded and clipped).
`sd_vae`: Stable Diffusion VAE latents, normalised per channel; delegated to
`pso_jax.data.vae_latents` (which loads the VAE weights only when used, so pixel-space runs need
none).
"""

import numpy as np

from pso_jax.data import vae_latents
from pso_jax.errors import UserError

KINDS = ("identity", "sd_vae")


def check_kind(config) -> str:
  """The latent kind, or a UserError naming the allowed ones."""
  kind = config.data.latent.kind
  if kind not in KINDS:
    raise UserError(f"config.data.latent.kind={kind!r} is unknown; use one of {', '.join(KINDS)}")
  return kind


def pixels_to_unit(images_uint8) -> np.ndarray:
  return np.asarray(images_uint8, np.float32) / 127.5 - 1.0


def unit_to_pixels(x) -> np.ndarray:
  return np.clip(np.rint((np.asarray(x, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def to_model_space(images_uint8, config, *, start_index: int = 0) -> np.ndarray:
  """uint8 [N, H, W, C] -> float32 model inputs [N, h, w, c].

  start_index: dataset position of the first image (the VAE's posterior noise is drawn per
  position, so a dataset encoded in chunks matches one encoded at once).
  """
  if check_kind(config) == "identity":
    return pixels_to_unit(images_uint8)
  images_uint8 = np.asarray(images_uint8, np.uint8)
  return np.asarray(vae_latents.encode_images(config, images_uint8, start_index=start_index), np.float32)


def from_model_space(x, config) -> np.ndarray:
  """float32 model outputs [N, h, w, c] -> uint8 images [N, H, W, C]."""
  if check_kind(config) == "identity":
    return unit_to_pixels(x)
  return np.asarray(vae_latents.decode_latents(config, np.asarray(x, np.float32)), np.uint8)


def model_shape(config) -> tuple[int, int, int]:
  """(h, w, c) of one model-space sample, without running an encoder."""
  d = config.data
  if check_kind(config) == "identity":
    return (d.image_size, d.image_size, d.channels)
  return tuple(vae_latents.latent_shape(config))

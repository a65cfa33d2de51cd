"""SD-VAE latents in the reference convention (docs/method.md §1.4), for `latent.kind == "sd_vae"`.

encode: uint8 -> [0,1] pixels (not [-1,1], EDM2's encoder quirk) -> VAE posterior -> one sample
(or the mean) -> z = (raw - mean_c) * (final_std / std_c).
decode: the inverse affine map -> VAE decoder -> clamp to [0,1] -> uint8 (x * 255 truncated, as EDM2).
The VAE is loaded once per folder and its jitted functions are kept.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pso_jax.errors import UserError
from pso_jax.models import sd_vae
from pso_jax.models.batched_apply import FrozenNetwork

_NOISE_TAG = 0x5D7AE  # separates the posterior noise stream from other uses of config.seed


@functools.lru_cache(maxsize=2)
def _load(vae_dir: str):
  return sd_vae.load_vae(vae_dir)


def _stats(config, vae_config: sd_vae.VAEConfig, need_values: bool = True):
  l = config.data.latent
  if l.get("stats") == "dataset" and "recorded_in" not in l:  # see latents.resolve_stats
    if not need_values:
      return None  # prepare computes them (only raw latents are encoded before)
    raise RuntimeError("config.data.latent.stats='dataset' but the dataset's statistics were not "
                       "read: call latents.resolve_stats(config, workdir) first")
  mean, std = np.asarray(l.mean, np.float32), np.asarray(l.std, np.float32)
  if vae_config.latent_channels != len(mean) or len(std) != len(mean):
    raise UserError(
        f"the VAE in {l.vae_dir!r} has latent_channels={vae_config.latent_channels} but "
        f"config.data.latent.mean/std have {len(mean)}/{len(std)} entries; use a VAE with "
        f"{len(mean)} latent channels or give per-channel statistics for "
        f"{vae_config.latent_channels} (--config.data.latent.mean=... --config.data.latent.std=...)")
  return mean, std, np.float32(l.final_std)


def vae_for(config) -> tuple[sd_vae.AutoencoderKL, dict]:
  """The (model, variables) config.data.latent.vae_dir names, checked against the config."""
  if config.data.latent.kind != "sd_vae":
    raise UserError(f"config.data.latent.kind is {config.data.latent.kind!r}, not 'sd_vae'")
  model, variables = _load(config.data.latent.vae_dir)
  _stats(config, model.config, need_values=False)
  return model, variables


def latent_shape(config) -> tuple[int, int, int]:
  """(h, w, c) of the latents of config.data.image_size images; reads only config.json, so a
  wrong folder, channel count or image size stops `prepare` before any work."""
  vc = sd_vae.read_config(config.data.latent.vae_dir)
  _stats(config, vc, need_values=False)
  _check_size(config.data.image_size, vc)
  f = vc.downsample_factor
  return config.data.image_size // f, config.data.image_size // f, vc.latent_channels


def _check_size(size: int, vc: sd_vae.VAEConfig):
  if size % vc.downsample_factor:
    raise UserError(f"image size {size} is not a multiple of the VAE's downsampling factor "
                    f"{vc.downsample_factor}; set --config.data.image_size to a multiple of it")


@functools.lru_cache(maxsize=4)
def _encoder(vae_dir: str, mean: tuple, std: tuple, final_std: float, sample: bool, seed: int,
             batch_size: int) -> FrozenNetwork:
  model, variables = _load(vae_dir)
  in_ch = model.config.in_channels
  scale = np.float32(final_std) / np.asarray(std, np.float32)
  base = jax.random.fold_in(jax.random.key(seed), _NOISE_TAG)

  def encode(variables, images, index):
    x = images.astype(jnp.float32) / 255.0
    if x.shape[-1] != in_ch:
      x = jnp.broadcast_to(x[..., :1], x.shape[:-1] + (in_ch,))  # grey -> RGB
    m, logvar = model.apply(variables, x, method=model.encode)
    if sample:
      keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(index)
      m = sd_vae.sample_posterior(m, logvar, keys)
    return (m - jnp.asarray(mean, jnp.float32)) * scale

  return FrozenNetwork(encode, variables, batch_size=batch_size, desc="VAE encode")


@functools.lru_cache(maxsize=4)
def _decoder(vae_dir: str, mean: tuple, std: tuple, final_std: float, out_channels: int,
             batch_size: int) -> FrozenNetwork:
  model, variables = _load(vae_dir)
  scale = np.asarray(std, np.float32) / np.float32(final_std)

  def decode(variables, z):
    raw = z.astype(jnp.float32) * scale + jnp.asarray(mean, jnp.float32)
    x = jnp.clip(model.apply(variables, raw, method=model.decode), 0.0, 1.0)
    if out_channels != x.shape[-1]:
      x = jnp.mean(x, axis=-1, keepdims=True)  # RGB -> grey for 1-channel datasets
    return (x * 255.0).astype(jnp.uint8)

  return FrozenNetwork(decode, variables, batch_size=batch_size, desc="VAE decode")


def encode_images(config, images_uint8: np.ndarray, *, start_index: int = 0,
                  normalised: bool = True) -> np.ndarray:
  """uint8 [N,H,W,C] -> normalised latents float32 [N,H/8,W/8,4] (NHWC); normalised=False: the
  raw posterior samples (the input of the per-channel statistics).

  The posterior noise of image i comes from fold_in(seed key, start_index + i), so a dataset
  encoded in chunks (pass each chunk's first record index) gets the same latents as in one call.
  """
  images_uint8 = np.asarray(images_uint8)
  if images_uint8.ndim != 4 or images_uint8.dtype != np.uint8:
    raise UserError(f"encode_images wants uint8 [N,H,W,C] images, got {images_uint8.dtype} "
                    f"{images_uint8.shape}")
  model, _ = vae_for(config)
  for size in images_uint8.shape[1:3]:
    _check_size(size, model.config)
  l = config.data.latent
  if normalised:
    mean, std, final_std = _stats(config, model.config)
  else:  # mean 0, std 1, final_std 1: the affine map is the identity
    channels = model.config.latent_channels
    mean, std, final_std = np.zeros(channels, np.float32), np.ones(channels, np.float32), np.float32(1)
  enc = _encoder(l.vae_dir, tuple(mean.tolist()), tuple(std.tolist()), float(final_std),
                 bool(l.sample_posterior), int(config.seed), int(l.batch_size))
  index = np.arange(start_index, start_index + len(images_uint8), dtype=np.int32)
  return enc(images_uint8, index)


def decode_latents(config, latents: np.ndarray) -> np.ndarray:
  """Normalised latents [N,h,w,c] -> uint8 images [N,8h,8w,config.data.channels]."""
  latents = np.asarray(latents, np.float32)
  model, _ = vae_for(config)
  if latents.ndim != 4 or latents.shape[-1] != model.config.latent_channels:
    raise UserError(f"decode_latents wants [N,h,w,{model.config.latent_channels}] latents, got "
                    f"{latents.shape}")
  l = config.data.latent
  mean, std, final_std = _stats(config, model.config)
  dec = _decoder(l.vae_dir, tuple(mean.tolist()), tuple(std.tolist()), float(final_std),
                 int(config.data.channels), int(l.batch_size))
  return dec(latents)

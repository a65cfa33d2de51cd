"""Model presets and the model's view of a config (input shape, condition size, initial variables).

`xs`, `s`, `m` are EDM2's img512 presets (for 64x64x4 SD-VAE latents); `demo` and `tiny` are small
pixel-space models for the 32x32 and 16x16 phantom. Attention is placed by how much a level is
downsampled relative to the input (`attn_divisors`), so a preset keeps its meaning at any size:
xs at 64x64 attends at 16x16 and 8x8 (divisors 4 and 8).
"""

import dataclasses
import math

import jax
import jax.numpy as jnp

from pso_jax.errors import UserError
from pso_jax.models.mp_layers import project_mp_weights
from pso_jax.models.precond import DTYPES, Precond

LATENT_CHANNELS = {"sd_vae": 4}   # channels of each latent kind; identity keeps the pixels'
LATENT_DOWNSAMPLE = {"sd_vae": 8}
AUGMENT_LABEL_DIM = 3             # training augmentation label: flip, dy, dx (diffusion/augment.py)


@dataclasses.dataclass(frozen=True)
class Preset:
  model_channels: int
  channel_mult: tuple[int, ...]
  num_blocks: int
  attn_divisors: tuple[int, ...]
  channels_per_head: int = 64
  dropout: float = 0.0


PRESETS = {
    "xs": Preset(128, (1, 2, 3, 4), 3, (4, 8)),
    "s": Preset(192, (1, 2, 3, 4), 3, (4, 8)),
    "m": Preset(256, (1, 2, 3, 4), 3, (4, 8), dropout=0.1),
    # 32x32x1 phantom pixels: levels 32/16/8 with 16/32/64 channels, attention at 8x8. Cheap
    # full-resolution levels: on CPU, small-channel convs run far below the matmul rate.
    "demo": Preset(16, (1, 2, 4), 1, (4,), channels_per_head=32),
    # 16x16x1 for tests: levels 16/8, attention at 8x8
    "tiny": Preset(8, (1, 2), 1, (2,), channels_per_head=8),
}

COND_MODES = ("uncond", "class", "pseudo")


def get_preset(config) -> Preset:
  name = config.model.preset
  if name not in PRESETS:
    raise UserError(f"config.model.preset={name!r} is not a model preset; use one of "
                    f"{', '.join(PRESETS)}, e.g. --config.model.preset=xs")
  return PRESETS[name]


def model_input_shape(config) -> tuple[int, int, int]:
  """(H, W, C) of what the diffusion model denoises: pixels or latents."""
  size, kind = config.data.image_size, config.data.latent.kind
  if kind == "identity":
    return (size, size, config.data.channels)
  if kind not in LATENT_CHANNELS:
    raise UserError(f"config.data.latent.kind={kind!r} is unknown; use identity or sd_vae")
  down = LATENT_DOWNSAMPLE[kind]
  if size % down:
    raise UserError(f"config.data.image_size={size} must be a multiple of {down} for {kind} "
                    f"latents, e.g. --config.data.image_size={size // down * down or down}")
  return (size // down, size // down, LATENT_CHANNELS[kind])


def cond_dim(config) -> int:
  """Length of the condition vector: 0 (uncond), number of findings (class), feature dim (pseudo)."""
  mode = config.model.cond
  if mode == "uncond":
    return 0
  if mode == "class":
    return len(config.data.findings)
  if mode == "pseudo":
    return int(config.data.features.dim)
  raise UserError(f"config.model.cond={mode!r} is unknown; use one of {', '.join(COND_MODES)}")


def build_model(config) -> Precond:
  """The EDM2 denoiser for `config` (preset, condition, activation dtype, dropout, augmentation
  labels when config.train.augment_p > 0)."""
  preset = get_preset(config)
  h, w, c = model_input_shape(config)
  levels = len(preset.channel_mult)
  step = 2 ** (levels - 1)
  if h % step or w % step:
    raise UserError(f"model input {h}x{w} cannot be halved {levels - 1} times by preset "
                    f"{config.model.preset!r}; use an input size that is a multiple of {step}")
  if config.model.dtype not in DTYPES:
    raise UserError(f"config.model.dtype={config.model.dtype!r} is unknown; use float32 or bfloat16")
  dropout = preset.dropout if config.model.dropout < 0 else float(config.model.dropout)
  channels = int(config.model.channels) if config.model.channels > 0 else preset.model_channels
  attn_levels = tuple(int(math.log2(d)) for d in preset.attn_divisors if d & (d - 1) == 0)
  augment_dim = AUGMENT_LABEL_DIM if float(config.train.augment_p) > 0 else 0
  return Precond(img_channels=c, cond_dim=cond_dim(config), augment_dim=augment_dim,
                 model_channels=channels,
                 channel_mult=preset.channel_mult, num_blocks=preset.num_blocks,
                 attn_levels=attn_levels, channels_per_head=preset.channels_per_head,
                 dropout=dropout, sigma_data=float(config.model.sigma_data),
                 dtype=config.model.dtype)


def init_variables(model: Precond, key: jax.Array, config) -> dict:
  """{"params": trainable (MP weights projected), "constants": fixed Fourier features}.

  Pure in `key`: works under `jax.jit` (with out_shardings) and `jax.eval_shape`.
  """
  h, w, c = model_input_shape(config)
  x = jnp.zeros((1, h, w, c), jnp.float32)
  sigma = jnp.ones((1,), jnp.float32)
  cond = jnp.zeros((1, model.cond_dim), jnp.float32) if model.cond_dim else None
  variables = dict(model.init({"params": key}, x, sigma, cond, train=False))
  variables["params"] = project_mp_weights(variables["params"])
  return variables


def count_params(variables_or_shapes) -> int:
  """Number of trainable values (the "params" collection), for arrays or ShapeDtypeStructs."""
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(variables_or_shapes["params"]))

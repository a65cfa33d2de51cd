"""The KL-f8 AutoencoderKL of Stable Diffusion in Flax (NHWC), loading diffusers checkpoints.

Module and parameter names follow the diffusers state dict (weights.py maps them), so a diffusers
folder (`config.json` + `diffusion_pytorch_model.safetensors`) loads without torch. The networks
here take and return the VAE's own pixel range; the reference's [0,1] convention and the per-dataset
latent normalisation live in `pso_jax/data/vae_latents.py`.
"""

import dataclasses
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pso_jax.errors import UserError
from pso_jax.models import weights as weights_lib

ARCH = "sd_vae"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
LEGACY_WEIGHTS_FILE = "diffusion_pytorch_model.bin"
_EPS = 1e-6  # diffusers' resnet_eps for the VAE


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 4
  norm_num_groups: int = 32
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)

  @classmethod
  def from_diffusers(cls, cfg: dict, source: str = "config.json") -> "VAEConfig":
    n = len(cfg.get("block_out_channels", cls.block_out_channels))
    checks = {"down_block_types": ("DownEncoderBlock2D",) * n,
              "up_block_types": ("UpDecoderBlock2D",) * n, "act_fn": "silu"}
    for field, want in checks.items():
      got = cfg.get(field, want)
      if (tuple(got) if isinstance(got, list) else got) != want:
        raise UserError(f"{source}: {field}={got!r} is not the KL AutoencoderKL pso_jax ports "
                        f"(expected {want!r}); use an SD 1.x/2.x VAE folder")
    if cfg.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
      raise UserError(f"{source} describes a {cfg['_class_name']}, not an AutoencoderKL")
    kw = {f.name: cfg[f.name] for f in dataclasses.fields(cls) if f.name in cfg}
    if "block_out_channels" in kw:
      kw["block_out_channels"] = tuple(kw["block_out_channels"])
    return cls(**kw)


def _conv(features, name, kernel=3, stride=1, padding=1):
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((padding, padding), (padding, padding)), name=name)


def _group_norm(groups, name):
  # exact two-pass variance, as torch computes it
  return nn.GroupNorm(num_groups=groups, epsilon=_EPS, use_fast_variance=False, name=name)


class ResnetBlock(nn.Module):
  out_channels: int
  groups: int

  @nn.compact
  def __call__(self, x):
    h = _conv(self.out_channels, "conv1")(nn.silu(_group_norm(self.groups, "norm1")(x)))
    h = _conv(self.out_channels, "conv2")(nn.silu(_group_norm(self.groups, "norm2")(h)))
    if x.shape[-1] != self.out_channels:
      x = _conv(self.out_channels, "conv_shortcut", kernel=1, padding=0)(x)
    return x + h


class SelfAttention(nn.Module):
  """Single-head attention over all pixels, with a residual (diffusers' VAE mid-block Attention)."""
  groups: int

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    t = _group_norm(self.groups, "group_norm")(x).reshape(b, h * w, c)
    q, k, v = (nn.Dense(c, name=n)(t) for n in ("to_q", "to_k", "to_v"))
    logits = jnp.einsum("bqc,bkc->bqk", q, k) / np.sqrt(c).astype(np.float32)
    out = jnp.einsum("bqk,bkc->bqc", jax.nn.softmax(logits.astype(jnp.float32), axis=-1), v)
    return x + nn.Dense(c, name="to_out_0")(out).reshape(b, h, w, c)


class MidBlock(nn.Module):
  groups: int
  attention: bool

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    x = ResnetBlock(c, self.groups, name="resnets_0")(x)
    if self.attention:
      x = SelfAttention(self.groups, name="attentions_0")(x)
    return ResnetBlock(c, self.groups, name="resnets_1")(x)


class Downsample(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))  # diffusers pads right/bottom only
    return _conv(x.shape[-1], "conv", stride=2, padding=0)(x)


class Upsample(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # nearest neighbour x2
    return _conv(x.shape[-1], "conv")(x)


class DownBlock(nn.Module):
  out_channels: int
  layers: int
  groups: int
  downsample: bool

  @nn.compact
  def __call__(self, x):
    for j in range(self.layers):
      x = ResnetBlock(self.out_channels, self.groups, name=f"resnets_{j}")(x)
    return Downsample(name="downsamplers_0")(x) if self.downsample else x


class UpBlock(nn.Module):
  out_channels: int
  layers: int
  groups: int
  upsample: bool

  @nn.compact
  def __call__(self, x):
    for j in range(self.layers):
      x = ResnetBlock(self.out_channels, self.groups, name=f"resnets_{j}")(x)
    return Upsample(name="upsamplers_0")(x) if self.upsample else x


class Encoder(nn.Module):
  config: VAEConfig

  @nn.compact
  def __call__(self, x):
    c = self.config
    x = _conv(c.block_out_channels[0], "conv_in")(x)
    last = len(c.block_out_channels) - 1
    for i, ch in enumerate(c.block_out_channels):
      x = DownBlock(ch, c.layers_per_block, c.norm_num_groups, i < last, name=f"down_blocks_{i}")(x)
    x = MidBlock(c.norm_num_groups, c.mid_block_add_attention, name="mid_block")(x)
    x = nn.silu(_group_norm(c.norm_num_groups, "conv_norm_out")(x))
    return _conv(2 * c.latent_channels, "conv_out")(x)


class Decoder(nn.Module):
  config: VAEConfig

  @nn.compact
  def __call__(self, z):
    c = self.config
    chans = tuple(reversed(c.block_out_channels))
    x = _conv(chans[0], "conv_in")(z)
    x = MidBlock(c.norm_num_groups, c.mid_block_add_attention, name="mid_block")(x)
    for i, ch in enumerate(chans):
      x = UpBlock(ch, c.layers_per_block + 1, c.norm_num_groups, i < len(chans) - 1,
                  name=f"up_blocks_{i}")(x)
    x = nn.silu(_group_norm(c.norm_num_groups, "conv_norm_out")(x))
    return _conv(c.out_channels, "conv_out")(x)


class AutoencoderKL(nn.Module):
  """`encode(x) -> (mean, logvar)`, `decode(z) -> x`; x in the VAE's pixel range, NHWC."""
  config: VAEConfig

  def setup(self):
    c = self.config
    self.encoder = Encoder(c)
    self.decoder = Decoder(c)
    if c.use_quant_conv:
      self.quant_conv = nn.Conv(2 * c.latent_channels, (1, 1), name="quant_conv")
    if c.use_post_quant_conv:
      self.post_quant_conv = nn.Conv(c.latent_channels, (1, 1), name="post_quant_conv")

  def encode(self, x):
    moments = self.encoder(x)
    if self.config.use_quant_conv:
      moments = self.quant_conv(moments)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def decode(self, z):
    if self.config.use_post_quant_conv:
      z = self.post_quant_conv(z)
    return self.decoder(z)

  def __call__(self, x):
    return self.decode(self.encode(x)[0])


def sample_posterior(mean, logvar, keys):
  """One sample per image: mean + std * eps, eps from that image's own key (keys: [B])."""
  eps = jax.vmap(lambda k: jax.random.normal(k, mean.shape[1:], mean.dtype))(keys)
  return mean + jnp.exp(0.5 * logvar) * eps


# -------------------------------------------------------------------------------- loading
def _subdir_with_weights(folder: str) -> str:
  if not os.path.exists(os.path.join(folder, "config.json")) and os.path.isdir(os.path.join(folder, "vae")):
    return os.path.join(folder, "vae")  # the whole SD repo was given: use its vae/ subfolder
  return folder


def _require_path(path: str) -> None:
  if not path:
    raise UserError("config.data.latent.vae_dir is empty: point it to the SD VAE folder "
                    "(config.json + diffusion_pytorch_model.safetensors), see third_party/sd_vae/README.md")
  if not os.path.exists(path):
    raise UserError(f"VAE folder {path!r} does not exist; see third_party/sd_vae/README.md")


def read_config(path: str) -> VAEConfig:
  """The VAEConfig of a diffusers folder or a converted file (no weights read)."""
  _require_path(path)
  if os.path.isfile(path):
    meta = weights_lib.read_safetensors_metadata(path) if path.endswith(".safetensors") else {}
    if not weights_lib.is_converted(meta) or "config" not in meta:
      raise UserError(f"{path} is a bare weight file; give the diffusers folder that holds it and "
                      "its config.json, or a file made by `python -m pso_jax.tools.convert vae`")
    return VAEConfig.from_diffusers(json.loads(meta["config"]), path)
  folder = _subdir_with_weights(path)
  cfg_path = os.path.join(folder, "config.json")
  if not os.path.isfile(cfg_path):
    raise UserError(f"VAE folder {path!r} has no config.json; it must be a diffusers AutoencoderKL "
                    "folder (config.json + diffusion_pytorch_model.safetensors), see third_party/sd_vae")
  try:
    with open(cfg_path) as f:
      return VAEConfig.from_diffusers(json.load(f), cfg_path)
  except json.JSONDecodeError as e:
    raise UserError(f"{cfg_path} is not valid JSON ({e})") from None


def abstract_variables(model: AutoencoderKL):
  c = model.config
  x = jnp.zeros((1, 2 * c.downsample_factor, 2 * c.downsample_factor, c.in_channels))
  return jax.eval_shape(lambda: model.init(jax.random.key(0), x))


def load_vae(path: str) -> tuple[AutoencoderKL, dict]:
  """(model, variables) from a diffusers folder or a file written by `pso_jax.tools.convert vae`."""
  config = read_config(path)
  if os.path.isfile(path):
    tensors, meta = weights_lib.read_weights(path)
    converted = weights_lib.converted_variables(tensors, meta, path, ARCH)
  else:
    folder = _subdir_with_weights(path)
    weight_path = os.path.join(folder, WEIGHTS_FILE)
    if not os.path.isfile(weight_path) and os.path.isfile(os.path.join(folder, LEGACY_WEIGHTS_FILE)):
      weight_path = os.path.join(folder, LEGACY_WEIGHTS_FILE)  # older repos: a torch pickle
    if not os.path.isfile(weight_path):
      found = sorted(f for f in os.listdir(folder) if f.endswith((".safetensors", ".bin")))
      raise UserError(f"{folder} has no {WEIGHTS_FILE} (found: {found or 'none'}); download it "
                      "beside config.json, see third_party/sd_vae/README.md")
    tensors, _ = weights_lib.read_weights(weight_path)
    converted = weights_lib.torch_to_flax(_rename_legacy_attention(tensors), weight_path)
  model = AutoencoderKL(config)
  variables = weights_lib.match_to_template(converted, abstract_variables(model), path, ARCH)
  return model, jax.tree.map(jnp.asarray, variables)


_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _rename_legacy_attention(tensors: dict) -> dict:
  """Early SD VAE files name the mid-block attention query/key/value/proj_attn (and may store
  those linears as 1x1 convs); diffusers renames them on load, so do we."""
  out = {}
  for key, value in tensors.items():
    parts = key.split(".")
    if len(parts) >= 2 and "attentions" in parts and parts[-2] in _LEGACY_ATTENTION:
      key = ".".join(parts[:-2] + [_LEGACY_ATTENTION[parts[-2]], parts[-1]])
      if value.ndim == 4 and value.shape[2:] == (1, 1):
        value = value[:, :, 0, 0]
    out[key] = value
  return out

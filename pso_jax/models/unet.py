"""The EDM2 magnitude-preserving UNet (Karras et al. 2024, "config G"), NHWC.

Same blocks, balances, widths and layer names as EDM2's `networks_edm2.py`, so parameter counts
and FLOPs match it exactly; attention resolutions are given as pyramid levels (level l works at
input_size / 2**l) so that a preset scales to any input size.
"""

import math
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from pso_jax.models.mp_layers import MPConv, MPFourier, mp_cat, mp_silu, mp_sum, normalize


def resample(x: jax.Array, mode: str) -> jax.Array:
  """'down': 2x2 average pool, stride 2; 'up': 2x nearest neighbour; 'keep': identity."""
  if mode == "down":
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
  if mode == "up":
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
  return x


def pixel_norm(x: jax.Array) -> jax.Array:
  return normalize(x, (-1,))


class Block(nn.Module):
  """EDM2 encoder ('enc') or decoder ('dec') block: resample, residual branch, optional attention."""
  out_channels: int
  flavor: str = "enc"
  resample_mode: str = "keep"
  num_heads: int = 0
  dropout: float = 0.0
  res_balance: float = 0.3
  attn_balance: float = 0.3
  clip_act: Optional[float] = 256.0

  @nn.compact
  def __call__(self, x: jax.Array, emb: jax.Array, train: bool) -> jax.Array:
    cout = self.out_channels
    needs_skip = x.shape[-1] != cout
    # Main branch.
    x = resample(x, self.resample_mode)
    if self.flavor == "enc":
      if needs_skip:
        x = MPConv(cout, (1, 1), name="conv_skip")(x)
      x = pixel_norm(x)

    # Residual branch, modulated by the embedding (c = 1 at init since emb_gain = 0).
    y = MPConv(cout, (3, 3), name="conv_res0")(mp_silu(x))
    emb_gain = self.param("emb_gain", nn.initializers.zeros, (), jnp.float32)
    c = MPConv(cout, name="emb_linear")(emb, gain=emb_gain) + 1
    y = mp_silu(y * c[:, None, None, :].astype(y.dtype))
    if self.dropout:
      y = nn.Dropout(self.dropout, deterministic=not train)(y)
    y = MPConv(cout, (3, 3), name="conv_res1")(y)

    if self.flavor == "dec" and needs_skip:
      x = MPConv(cout, (1, 1), name="conv_skip")(x)
    x = mp_sum(x, y, t=self.res_balance)

    if self.num_heads:
      x = mp_sum(x, self._attention(x), t=self.attn_balance)
    if self.clip_act is not None:
      x = jnp.clip(x, -self.clip_act, self.clip_act)
    return x

  def _attention(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    heads = self.num_heads
    qkv = MPConv(3 * c, (1, 1), name="attn_qkv")(x)
    # channel layout (head, channel-in-head, q/k/v) as in EDM2; pixel norm per head and role
    qkv = normalize(qkv.reshape(b, h * w, heads, c // heads, 3), (3,))
    q, k, v = qkv[..., 0], qkv[..., 1], qkv[..., 2]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k / math.sqrt(c // heads))
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(x.dtype)
    y = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, h, w, c)
    return MPConv(c, (1, 1), name="attn_proj")(y)


class UNet(nn.Module):
  """F(x, c_noise, labels) of EDM2: x [B,H,W,C] in `dtype`, c_noise [B], labels [B, label_dim] or None.

  With `augment_dim` > 0 the embedding also takes training augmentation labels [B, augment_dim]
  (diffusion/augment.py; None: zeros, the unaugmented images sampling asks for).
  """
  img_channels: int
  label_dim: int = 0
  augment_dim: int = 0
  model_channels: int = 128
  channel_mult: Sequence[int] = (1, 2, 3, 4)
  num_blocks: int = 3
  attn_levels: Sequence[int] = (2, 3)
  channels_per_head: int = 64
  dropout: float = 0.0
  label_balance: float = 0.5
  augment_balance: float = 0.5
  concat_balance: float = 0.5
  res_balance: float = 0.3
  attn_balance: float = 0.3
  clip_act: Optional[float] = 256.0

  def _block(self, cout, flavor, name, resample_mode="keep", attention=False):
    # EDM2: a level narrower than channels_per_head gets no heads, hence no attention at all
    heads = cout // self.channels_per_head if attention else 0
    return Block(cout, flavor=flavor, resample_mode=resample_mode, num_heads=heads,
                 dropout=self.dropout, res_balance=self.res_balance,
                 attn_balance=self.attn_balance, clip_act=self.clip_act, name=name)

  @nn.compact
  def __call__(self, x: jax.Array, c_noise: jax.Array, labels: Optional[jax.Array],
               train: bool = False, augment_labels: Optional[jax.Array] = None) -> jax.Array:
    cblock = [self.model_channels * m for m in self.channel_mult]
    cnoise, cemb = cblock[0], max(cblock)
    size = x.shape[1]

    # Embedding (fp32; cast where it meets activations).
    emb = MPConv(cemb, name="emb_noise")(MPFourier(cnoise, name="emb_fourier")(c_noise))
    if self.label_dim:
      label = labels.astype(jnp.float32) * math.sqrt(labels.shape[-1])
      emb = mp_sum(emb, MPConv(cemb, name="emb_label")(label), t=self.label_balance)
    if self.augment_dim:
      if augment_labels is None:
        augment_labels = jnp.zeros((x.shape[0], self.augment_dim), jnp.float32)
      aug = MPConv(cemb, name="emb_augment")(augment_labels.astype(jnp.float32))
      emb = mp_sum(emb, aug, t=self.augment_balance)
    emb = mp_silu(emb)

    # Encoder; a constant ones channel lets the first conv see the image border.
    x = jnp.concatenate([x, jnp.ones_like(x[..., :1])], axis=-1)
    skips = []
    for level, channels in enumerate(cblock):
      res = size >> level
      if level == 0:
        x = MPConv(channels, (3, 3), name=f"enc_{res}x{res}_conv")(x)
      else:
        x = self._block(x.shape[-1], "enc", f"enc_{res}x{res}_down", "down")(x, emb, train)
      skips.append(x)
      for idx in range(self.num_blocks):
        x = self._block(channels, "enc", f"enc_{res}x{res}_block{idx}",
                        attention=level in self.attn_levels)(x, emb, train)
        skips.append(x)

    # Decoder.
    for level, channels in reversed(list(enumerate(cblock))):
      res = size >> level
      cout = x.shape[-1]
      if level == len(cblock) - 1:
        x = self._block(cout, "dec", f"dec_{res}x{res}_in0", attention=True)(x, emb, train)
        x = self._block(cout, "dec", f"dec_{res}x{res}_in1")(x, emb, train)
      else:
        x = self._block(cout, "dec", f"dec_{res}x{res}_up", "up")(x, emb, train)
      for idx in range(self.num_blocks + 1):
        x = mp_cat(x, skips.pop(), t=self.concat_balance)
        x = self._block(channels, "dec", f"dec_{res}x{res}_block{idx}",
                        attention=level in self.attn_levels)(x, emb, train)

    out_gain = self.param("out_gain", nn.initializers.zeros, (), jnp.float32)
    return MPConv(self.img_channels, (3, 3), name="out_conv")(x, gain=out_gain)

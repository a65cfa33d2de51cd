"""EDM preconditioning around the UNet, plus EDM2's learned log-variance head u(sigma).

D(x; sigma, cond) = c_skip * x + c_out * F(c_in * x, ln(sigma) / 4, cond), all in fp32 outside F.
"""

from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from pso_jax.models.mp_layers import MPConv, MPFourier
from pso_jax.models.unet import UNet

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def precond_coefficients(sigma: jax.Array, sigma_data: float):
  """(c_skip, c_out, c_in, c_noise) for sigma [B] (fp32)."""
  s2, d2 = jnp.square(sigma), sigma_data ** 2
  c_skip = d2 / (s2 + d2)
  c_out = sigma * sigma_data / jnp.sqrt(s2 + d2)
  c_in = 1 / jnp.sqrt(s2 + d2)
  c_noise = jnp.log(sigma) / 4
  return c_skip, c_out, c_in, c_noise


class Precond(nn.Module):
  """Denoiser D and log-variance u(sigma) of EDM2.

  `__call__(x, sigma, cond, *, train, augment_labels) -> (D [B,H,W,C] fp32, logvar [B] fp32)`;
  `cond` is [B, cond_dim] or None (the null condition, zeros, which is also what an all-zero row
  means); `augment_labels` [B, augment_dim] or None (unaugmented) when augment_dim > 0.
  """
  img_channels: int
  cond_dim: int = 0
  augment_dim: int = 0
  model_channels: int = 128
  channel_mult: Sequence[int] = (1, 2, 3, 4)
  num_blocks: int = 3
  attn_levels: Sequence[int] = (2, 3)
  channels_per_head: int = 64
  dropout: float = 0.0
  sigma_data: float = 0.5
  logvar_channels: int = 128
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x: jax.Array, sigma: jax.Array, cond: Optional[jax.Array] = None, *,
               train: bool = False, augment_labels: Optional[jax.Array] = None):
    x = x.astype(jnp.float32)
    batch = x.shape[0]
    sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32).reshape(-1), (batch,))
    if self.cond_dim and cond is None:
      cond = jnp.zeros((batch, self.cond_dim), jnp.float32)
    elif self.cond_dim:
      if cond.shape != (batch, self.cond_dim):
        raise ValueError(f"condition of shape {cond.shape} given to a model conditioned on "
                         f"[batch={batch}, {self.cond_dim}] vectors")
      cond = jnp.asarray(cond, jnp.float32)
    else:
      cond = None  # an unconditional model ignores any condition
    c_skip, c_out, c_in, c_noise = precond_coefficients(sigma, self.sigma_data)
    per_image = lambda c: c[:, None, None, None]

    unet = UNet(img_channels=self.img_channels, label_dim=self.cond_dim,
                augment_dim=self.augment_dim,
                model_channels=self.model_channels, channel_mult=tuple(self.channel_mult),
                num_blocks=self.num_blocks, attn_levels=tuple(self.attn_levels),
                channels_per_head=self.channels_per_head, dropout=self.dropout, name="unet")
    f = unet((per_image(c_in) * x).astype(DTYPES[self.dtype]), c_noise, cond, train=train,
             augment_labels=augment_labels)
    d = per_image(c_skip) * x + per_image(c_out) * f.astype(jnp.float32)

    fourier = MPFourier(self.logvar_channels, name="logvar_fourier")(c_noise)
    logvar = MPConv(1, name="logvar_linear")(fourier)[:, 0]
    return d, logvar

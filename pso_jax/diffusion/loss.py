"""EDM2 training loss: lognormal noise levels, EDM weighting and the learned uncertainty u(sigma).

loss = mean over images of sum over elements of  w(s)/exp(u(s)) * (D(x + s*n; s, cond) - x)^2 + u(s)
with w(s) = (s^2 + sd^2) / (s*sd)^2 and ln(s) ~ N(P_mean, P_std^2). Everything in fp32.
"""

import jax
import jax.numpy as jnp


def sample_sigma_and_noise(key: jax.Array, shape, config):
  """(sigma [B], noise [B,H,W,C] already scaled by sigma) for one batch, from `key` alone."""
  key_sigma, key_noise = jax.random.split(key)
  normal = jax.random.normal(key_sigma, (shape[0],), jnp.float32)
  sigma = jnp.exp(config.diffusion.p_mean + config.diffusion.p_std * normal)
  noise = jax.random.normal(key_noise, shape, jnp.float32) * sigma[:, None, None, None]
  return sigma, noise


def edm_weight(sigma: jax.Array, sigma_data: float) -> jax.Array:
  return (jnp.square(sigma) + sigma_data ** 2) / jnp.square(sigma * sigma_data)


def edm2_loss(model, variables, x, cond, key, config, *, train: bool = True, augment_labels=None):
  """(scalar loss, aux) for clean inputs x [B,H,W,C] (model space) and conditions [B, d] or None
  (`augment_labels` [B, 3]: how x was augmented, for a model with augmentation labels).

  `key` draws sigma and noise (first split) and dropout (second split). aux holds fp32 scalars:
  `loss`, `denoise_loss` (the weighted error without the uncertainty terms, per-image sum averaged
  over the batch) and `logvar` (batch mean of u(sigma)).
  """
  key_noise, key_dropout = jax.random.split(key)
  x = x.astype(jnp.float32)
  sigma, noise = sample_sigma_and_noise(key_noise, x.shape, config)
  denoised, logvar = model.apply(variables, x + noise, sigma, cond, train=train,
                                 augment_labels=augment_labels, rngs={"dropout": key_dropout})
  per_image = lambda v: v[:, None, None, None]
  weighted = per_image(edm_weight(sigma, config.model.sigma_data)) * jnp.square(denoised - x)
  elements = weighted / per_image(jnp.exp(logvar)) + per_image(logvar)
  loss = jnp.mean(jnp.sum(elements, axis=(1, 2, 3)))
  aux = {"loss": loss,
         "denoise_loss": jnp.mean(jnp.sum(weighted, axis=(1, 2, 3))),
         "logvar": jnp.mean(logvar)}
  return loss, aux

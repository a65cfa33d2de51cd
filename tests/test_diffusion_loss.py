"""EDM2 loss against a numpy computation from the same noise draws."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config
from pso_jax.diffusion.loss import edm2_loss, sample_sigma_and_noise
from pso_jax.models import presets
from pso_jax.models.mp_layers import is_mp_weight


def test_edm2_loss_matches_numpy():
  config = load_config("tiny")
  model = presets.build_model(config)
  variables = jax.jit(lambda k: presets.init_variables(model, k, config))(jax.random.key(0))
  # nonzero gains so that D and u(sigma) both depend on the network
  variables["params"] = jax.tree_util.tree_map_with_path(
      lambda p, w: w if is_mp_weight(p) else jnp.full_like(w, 0.8), variables["params"])
  shape = (6,) + presets.model_input_shape(config)
  x = jax.random.uniform(jax.random.key(1), shape, minval=-1, maxval=1)
  cond = jax.random.normal(jax.random.key(2), (6, presets.cond_dim(config)))
  key = jax.random.key(3)
  loss, aux = jax.jit(lambda v: edm2_loss(model, v, x, cond, key, config))(variables)

  # the documented draws: split(key) -> (noise key, dropout key); noise key -> (sigma, noise)
  key_noise, _ = jax.random.split(key)
  key_sigma, key_eps = jax.random.split(key_noise)
  n = np.asarray(jax.random.normal(key_sigma, (6,)), np.float64)
  eps = np.asarray(jax.random.normal(key_eps, shape), np.float64)
  sigma = np.exp(-0.4 + 1.0 * n)
  noisy = np.asarray(x, np.float64) + sigma[:, None, None, None] * eps
  d, logvar = jax.jit(lambda v, x, s: model.apply(v, x, s, cond))(
      variables, jnp.asarray(noisy, jnp.float32), jnp.asarray(sigma, jnp.float32))
  d, logvar = np.asarray(d, np.float64), np.asarray(logvar, np.float64)
  weight = (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2
  err = weight[:, None, None, None] * (d - np.asarray(x, np.float64)) ** 2
  per_image = (err / np.exp(logvar)[:, None, None, None] + logvar[:, None, None, None]).sum((1, 2, 3))
  assert float(loss) == pytest.approx(per_image.mean(), rel=1e-4)
  assert float(aux["denoise_loss"]) == pytest.approx(err.sum((1, 2, 3)).mean(), rel=1e-4)
  assert float(aux["logvar"]) == pytest.approx(logvar.mean(), rel=1e-4, abs=1e-6)
  assert loss.dtype == jnp.float32


def test_noise_levels_are_lognormal():
  config = load_config("tiny")
  sigma, noise = jax.jit(lambda k: sample_sigma_and_noise(k, (20_000, 2, 2, 1), config))(
      jax.random.key(5))
  log_sigma = np.log(np.asarray(sigma))
  assert log_sigma.mean() == pytest.approx(config.diffusion.p_mean, abs=0.03)
  assert log_sigma.std() == pytest.approx(config.diffusion.p_std, abs=0.03)
  ratio = np.asarray(noise)[:, :, :, 0] / np.asarray(sigma)[:, None, None]
  assert ratio.std() == pytest.approx(1.0, abs=0.02)

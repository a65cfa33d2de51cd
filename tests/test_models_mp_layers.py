"""Magnitude-preserving layers against numpy and against their defining property (unit variance)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import signal

import tolerances as T
from pso_jax.models import mp_layers
from pso_jax.models.mp_layers import MPConv, MPFourier, mp_cat, mp_silu, mp_sum, normalize
from pso_jax.models.unet import Block, resample


def _normal(seed, shape):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def test_normalize_matches_numpy_and_gives_rms_one():
  w = np.asarray(_normal(0, (3, 3, 5, 7))) * 3.0
  got = np.asarray(normalize(jnp.asarray(w), (0, 1, 2)))
  norm = np.sqrt((w.astype(np.float64) ** 2).sum(axis=(0, 1, 2), keepdims=True))
  want = w / (1e-4 + norm / math.sqrt(45))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  np.testing.assert_allclose(np.sqrt((got ** 2).mean(axis=(0, 1, 2))), 1.0, rtol=1e-4)


def test_normalize_keeps_bfloat16_and_computes_norm_in_fp32():
  x = (_normal(1, (4, 512)) * 100).astype(jnp.bfloat16)
  y = normalize(x, (-1,))
  assert y.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.sqrt(np.mean(np.asarray(y, np.float32) ** 2, axis=-1)), 1, rtol=1e-2)


@pytest.mark.parametrize("t", [0.3, 0.5, 0.8])
def test_mp_sum_and_mp_cat_preserve_unit_variance(t):
  a, b = _normal(2, (200_000,)), _normal(3, (200_000,))
  assert float(jnp.var(mp_sum(a, b, t))) == pytest.approx(1.0, abs=0.015)
  a2, b2 = _normal(4, (4000, 48)), _normal(5, (4000, 16))
  cat = mp_cat(a2, b2, t)
  assert cat.shape == (4000, 64)
  assert float(jnp.var(cat)) == pytest.approx(1.0, abs=0.015)
  # the two parts carry the (1-t)^2 : t^2 share of the total energy
  share = float(jnp.sum(cat[:, :48] ** 2) / jnp.sum(cat ** 2))
  assert share == pytest.approx((1 - t) ** 2 / ((1 - t) ** 2 + t ** 2), abs=0.01)


def test_mp_silu_preserves_unit_second_moment():
  y = mp_silu(_normal(6, (500_000,)))
  assert float(jnp.mean(y ** 2)) == pytest.approx(1.0, abs=0.01)


def test_mp_silu_value_and_derivatives_match_silu_everywhere():
  """Its exp/divide form and written-out derivative equal silu(x) / 0.596 and its autodiff
  derivatives (float64 numpy reference), finite at |x| = 200 where exp(-x) overflows."""
  x = np.concatenate([np.linspace(-200, 200, 4001), np.random.default_rng(0).normal(size=1000) * 4])
  x32 = jnp.asarray(x, jnp.float32)
  sig = 1 / (1 + np.exp(-x.astype(np.float32).astype(np.float64)))
  xr = x.astype(np.float32).astype(np.float64)
  np.testing.assert_allclose(mp_silu(x32), xr * sig / 0.596, rtol=2e-6, atol=1e-30)
  grad = jax.vmap(jax.grad(mp_silu))(x32)
  assert bool(jnp.all(jnp.isfinite(grad)))
  np.testing.assert_allclose(grad, sig * (1 + xr * (1 - sig)) / 0.596, rtol=1e-5, atol=1e-6)
  second = jax.vmap(jax.grad(jax.grad(mp_silu)))(x32[4000 - 100:4000 + 100])
  reference = jax.vmap(jax.grad(jax.grad(lambda v: jax.nn.silu(v) / 0.596)))(x32[3900:4100])
  np.testing.assert_allclose(second, reference, rtol=1e-4, atol=1e-6)


def _numpy_same_conv(x, w):
  """Reference 'same' cross-correlation, NHWC x HWIO, via scipy."""
  b, h, wd, cin = x.shape
  out = np.zeros((b, h, wd, w.shape[-1]))
  for n in range(b):
    for o in range(w.shape[-1]):
      for i in range(cin):
        out[n, :, :, o] += signal.correlate2d(x[n, :, :, i], w[:, :, i, o], mode="same")
  return out


def test_mpconv_matches_numpy_weight_norm_conv():
  x = _normal(7, (2, 6, 5, 3))
  conv = MPConv(4, (3, 3))
  variables = conv.init(jax.random.key(8), x)
  w = np.asarray(variables["params"]["mp_weight"], np.float64) * 2.5  # not yet normalised
  got = conv.apply({"params": {"mp_weight": jnp.asarray(w, jnp.float32)}}, x, gain=0.7)
  norm = np.sqrt((w ** 2).sum(axis=(0, 1, 2), keepdims=True))
  w_eff = w / (1e-4 + norm / math.sqrt(27)) * 0.7 / math.sqrt(27)
  np.testing.assert_allclose(got, _numpy_same_conv(np.asarray(x, np.float64), w_eff), atol=1e-5)


@pytest.mark.parametrize("kernel,shape", [((), (20_000, 96)), ((1, 1), (8, 32, 32, 64)),
                                          ((3, 3), (8, 32, 32, 64))])
def test_mpconv_preserves_unit_variance(kernel, shape):
  x = _normal(9, shape)
  conv = MPConv(80, kernel)
  variables = conv.init(jax.random.key(10), x)
  y = conv.apply(variables, x)
  assert y.shape == shape[:-1] + (80,)
  assert float(jnp.var(y)) == pytest.approx(1.0, abs=0.05)


def test_project_mp_weights_is_idempotent_and_touches_only_mp_weights():
  params = {"conv": {"mp_weight": _normal(11, (3, 3, 4, 6)) * 5},
            "lin": {"mp_weight": _normal(12, (10, 3)) + 2},
            "block": {"emb_gain": jnp.float32(0.3)}}
  once = mp_layers.project_mp_weights(params)
  twice = mp_layers.project_mp_weights(once)
  for w, fan_in in ((once["conv"]["mp_weight"], 36), (once["lin"]["mp_weight"], 10)):
    np.testing.assert_allclose(np.linalg.norm(np.asarray(w).reshape(fan_in, -1), axis=0),
                               math.sqrt(fan_in), rtol=1e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4), once, twice)
  assert float(once["block"]["emb_gain"]) == pytest.approx(0.3)
  # jittable and a pure function of its input
  jitted = jax.jit(mp_layers.project_mp_weights)(params)
  T.assert_close(jitted, once, T.reduction_rtol(36))  # other fusion: each norm sums <= 36 squares


def test_is_mp_weight_on_key_paths_and_names():
  tree = {"unet": {"conv": {"mp_weight": 1.0}, "blk": {"emb_gain": 2.0}}}
  flags = {jax.tree_util.keystr(p): mp_layers.is_mp_weight(p)
           for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}
  assert flags == {"['unet']['blk']['emb_gain']": False, "['unet']['conv']['mp_weight']": True}
  assert mp_layers.is_mp_weight(("unet", "conv", "mp_weight"))
  assert not mp_layers.is_mp_weight(())


def test_mpfourier_constants_are_fixed_and_not_params():
  layer = MPFourier(256)
  x = _normal(13, (512,))
  variables = layer.init(jax.random.key(14), x)
  assert set(variables) == {"constants"}
  freqs, phases = variables["constants"]["freqs"], variables["constants"]["phases"]
  assert float(jnp.min(phases)) >= 0 and float(jnp.max(phases)) < 2 * math.pi
  assert float(jnp.std(freqs / (2 * math.pi))) == pytest.approx(1.0, abs=0.15)
  y = layer.apply(variables, x)
  np.testing.assert_allclose(y, np.sqrt(2) * np.cos(np.outer(x, freqs) + phases), atol=2e-4)
  assert float(jnp.mean(y ** 2)) == pytest.approx(1.0, abs=0.05)


def test_resample_down_is_average_and_up_is_nearest():
  x = np.arange(2 * 4 * 6 * 3, dtype=np.float32).reshape(2, 4, 6, 3)
  down = np.asarray(resample(jnp.asarray(x), "down"))
  np.testing.assert_allclose(down, x.reshape(2, 2, 2, 3, 2, 3).mean(axis=(2, 4)))
  up = np.asarray(resample(jnp.asarray(down), "up"))
  np.testing.assert_allclose(up[:, ::2, ::2], down)
  np.testing.assert_allclose(up[:, 1::2, 1::2], down)


@pytest.mark.parametrize("flavor,resample_mode,heads,cin", [
    ("enc", "keep", 0, 32), ("enc", "down", 0, 16), ("enc", "keep", 2, 16),
    ("dec", "keep", 2, 64), ("dec", "up", 0, 32)])
def test_block_preserves_unit_variance_at_init(flavor, resample_mode, heads, cin):
  x = _normal(15, (16, 16, 16, cin))
  emb = _normal(16, (16, 48))
  block = Block(32, flavor=flavor, resample_mode=resample_mode, num_heads=heads)

  @jax.jit
  def init_and_apply(key):
    params = mp_layers.project_mp_weights(block.init(key, x, emb, False)["params"])
    return block.apply({"params": params}, x, emb, False)
  y = init_and_apply(jax.random.key(17))
  assert float(jnp.std(y)) == pytest.approx(1.0, abs=0.12)

"""Power-function EMA: width <-> exponent, the in-step update against its closed-form profile, and
post-hoc reconstruction against numerically integrated profiles and directly tracked EMAs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate

from pso_jax.diffusion import ema


def test_gamma_from_std_edm2_values_and_round_trip():
  assert ema.std_to_gamma(0.05) == pytest.approx(16.97, abs=0.01)
  assert ema.std_to_gamma(0.10) == pytest.approx(6.94, abs=0.01)
  for std in (0.01, 0.05, 0.075, 0.1, 0.2):
    assert ema.gamma_to_std(ema.std_to_gamma(std)) == pytest.approx(std, rel=1e-9)


def _profile(t, end, std):
  g = ema.std_to_gamma(std)
  return np.where(t <= end, (g + 1) * t ** g / end ** (g + 1), 0.0)


def test_profile_has_the_named_relative_width():
  g = ema.std_to_gamma(0.1)
  mean = integrate.quad(lambda t: t * _profile(t, 1.0, 0.1), 0, 1)[0]
  var = integrate.quad(lambda t: (t - mean) ** 2 * _profile(t, 1.0, 0.1), 0, 1)[0]
  assert mean == pytest.approx((g + 1) / (g + 2))
  assert np.sqrt(var) == pytest.approx(0.1, rel=1e-6)  # std of the profile at t = 1


def _run_emas(values, batch, stds):
  """EMAs after each step for a scalar 'parameter' taking values[i] after step i (jitted scan)."""
  def step(state, inputs):
    i, value = inputs
    state = ema.phema_update(state, {"w": value}, (i + 1) * batch, batch, stds)
    return state, tuple(s["w"] for s in state)
  init = ema.phema_init({"w": jnp.float32(123.0)}, stds)  # overwritten by the first step
  steps = jnp.arange(len(values), dtype=jnp.int32)
  _, history = jax.jit(lambda v: jax.lax.scan(step, init, (steps, v)))(jnp.asarray(values, jnp.float32))
  return [np.asarray(h) for h in history]


def test_update_of_a_constant_stays_constant_and_first_step_copies():
  params = {"a": jnp.full((3,), 2.5), "b": {"c": jnp.float32(-1.0)}}
  state = ema.phema_init(jax.tree.map(jnp.zeros_like, params), (0.05, 0.1))
  update = jax.jit(lambda s, n: ema.phema_update(s, params, n, 64, (0.05, 0.1)))
  for i in range(1, 30):
    state = update(state, i * 64)
    for tree in state:
      np.testing.assert_allclose(tree["a"], 2.5, rtol=1e-6)
      np.testing.assert_allclose(tree["b"]["c"], -1.0, rtol=1e-6)


def test_update_averages_with_the_power_function_profile():
  n, batch = 4000, 8
  t = np.arange(1, n + 1) * batch
  values = np.sin(t / t[-1] * 5.0) + (t / t[-1]) ** 2
  f = lambda tau: np.sin(tau / t[-1] * 5.0) + (tau / t[-1]) ** 2
  for std, history in zip((0.05, 0.1), _run_emas(values, batch, (0.05, 0.1))):
    want = integrate.quad(lambda tau: _profile(tau, t[-1], std) * f(tau), 0, t[-1], limit=200)[0]
    assert history[-1] == pytest.approx(want, abs=2e-3)


def test_profile_inner_products_match_numerical_integration():
  cases = [(1000.0, 0.05, 1000.0, 0.05), (600.0, 0.05, 1000.0, 0.1), (1000.0, 0.1, 400.0, 0.05),
           (300.0, 0.2, 900.0, 0.08)]
  for ta, sa, tb, sb in cases:
    want = integrate.quad(lambda x: _profile(x, ta, sa) * _profile(x, tb, sb), 0, min(ta, tb),
                          limit=200)[0]
    got = ema.profile_inner_products([ta], [sa], [tb], [sb])[0, 0]
    assert got == pytest.approx(want, rel=1e-6)


def test_posthoc_of_a_tracked_width_picks_its_last_snapshot():
  nimg = np.array([250, 500, 750, 1000, 250, 500, 750, 1000], np.float64)
  stds = np.array([0.05] * 4 + [0.10] * 4)
  weights = ema.solve_posthoc_coefficients(nimg, stds, 1000, 0.10)[:, 0]
  want = np.zeros(8)
  want[-1] = 1
  np.testing.assert_allclose(weights, want, atol=1e-6)


def test_posthoc_intermediate_width_matches_profile_and_tracked_ema():
  n, batch = 4000, 8
  t = np.arange(1, n + 1) * batch
  values = np.sin(t / t[-1] * 5.0) + (t / t[-1]) ** 2
  tracked = (0.05, 0.10)
  target = 0.075
  h05, h10, h075 = _run_emas(values, batch, tracked + (target,))
  snap_steps = [n // 4 - 1, n // 2 - 1, 3 * n // 4 - 1, n - 1]
  snapshots = [(t[i], s, {"w": h[i]}) for s, h in zip(tracked, (h05, h10)) for i in snap_steps]

  weights = ema.solve_posthoc_coefficients([s[0] for s in snapshots], [s[1] for s in snapshots],
                                           t[-1], target)[:, 0]
  assert weights.sum() == pytest.approx(1.0)
  # the same least-squares fit done numerically on sampled profiles
  grid = np.linspace(0, t[-1], 200_001)
  basis = np.stack([_profile(grid, s[0], s[1]) for s in snapshots], axis=1)
  wanted = _profile(grid, t[-1], target)
  numeric = np.linalg.lstsq(basis, wanted, rcond=None)[0]
  np.testing.assert_allclose(weights, numeric / numeric.sum(), atol=2e-3)
  err = np.sqrt(integrate.trapezoid((basis @ weights - wanted) ** 2, grid))
  nearest = np.sqrt(integrate.trapezoid((_profile(grid, t[-1], 0.1) - wanted) ** 2, grid))
  assert err < 0.2 * nearest  # far better than the closest tracked width alone

  rebuilt = ema.reconstruct_posthoc(snapshots, target)
  assert float(rebuilt["w"]) == pytest.approx(float(h075[-1]), abs=3e-3)
  assert abs(float(h075[-1]) - float(h10[-1])) > 10 * abs(float(rebuilt["w"]) - float(h075[-1]))

"""PSO statistics: Wilson intervals, residual risk, the Cohen-Nissim baseline, flags."""

import math

import numpy as np
import pytest
from scipy import optimize, stats

from pso_jax.privacy import pso


def _score_test_bounds(k, n, conf):
  """Wilson interval by inverting the score test numerically (independent of the closed form)."""
  z = stats.norm.ppf(0.5 + conf / 2)
  f = lambda p: (k / n - p) ** 2 - z * z * p * (1 - p) / n
  inside = min(max(k / n, 1e-12), 1 - 1e-12)  # the score statistic is below z here
  lo = 0.0 if k == 0 else optimize.brentq(f, 1e-12, inside)
  hi = 1.0 if k == n else optimize.brentq(f, inside, 1 - 1e-12)
  return lo, hi


@pytest.mark.parametrize("k,n,conf", [(0, 10, 0.95), (3, 10, 0.95), (10, 10, 0.95),
                                      (17, 500, 0.95), (250, 500, 0.9), (1, 3, 0.99)])
def test_wilson_inverts_the_score_test(k, n, conf):
  r = pso.wilson(k, n, conf)
  lo, hi = _score_test_bounds(k, n, conf)
  assert r.low == pytest.approx(lo, abs=1e-9) and r.high == pytest.approx(hi, abs=1e-9)
  assert r.value == k / n and r.low <= r.value <= r.high


def test_wilson_zero_successes_closed_form():
  z2 = stats.norm.ppf(0.975) ** 2
  assert pso.wilson(0, 10).high == pytest.approx(z2 / (10 + z2))


def test_baseline_is_binomial_isolation_and_peaks_near_one_over_n():
  n = 500
  w = np.linspace(1e-5, 0.02, 4000)
  b = pso.cohen_nissim_baseline(n, w)
  np.testing.assert_allclose(b, stats.binom.pmf(1, n, w), rtol=1e-9)
  assert w[np.argmax(b)] == pytest.approx(1 / n, rel=0.01)
  assert b.max() == pytest.approx(math.exp(-1), abs=0.002)
  assert pso.cohen_nissim_baseline(n, 1e-6) == pytest.approx(n * 1e-6, rel=1e-3)  # ~ n w


def test_residual_risk_cases_and_propagated_error():
  a, c = pso.wilson(40, 200), pso.wilson(10, 200)
  r = pso.residual_risk(a, c)
  assert r["raw"] == pytest.approx((a.center - c.center) / (1 - c.center))
  # first-order propagation against numerical derivatives
  f = lambda x, y: (x - y) / (1 - y)
  h = 1e-6
  da = (f(a.center + h, c.center) - f(a.center - h, c.center)) / (2 * h)
  dc = (f(a.center, c.center + h) - f(a.center, c.center - h)) / (2 * h)
  assert r["error"] == pytest.approx(math.hypot(da * a.error, dc * c.error), rel=1e-5)
  same = pso.residual_risk(pso.wilson(10, 200), pso.wilson(10, 200))
  assert same["raw"] == pytest.approx(0) and same["value"] == 0 and same["low"] == 0
  below = pso.residual_risk(pso.wilson(0, 200), pso.wilson(30, 200))
  assert below["value"] == 0.0 and below["raw"] < 0


def test_singling_out_flags_and_leave_own_patient_out():
  k = np.array([0, 1, 1, 1, 2, 1])
  h = np.array([0, 0, 1, 3, 0, 1])
  out = pso.singling_out(k, h, n_holdout_patients=10, weight_bound=0.05)
  np.testing.assert_array_equal(out["isolates"], [0, 1, 1, 1, 0, 1])
  np.testing.assert_allclose(out["weight"], h / 10)
  np.testing.assert_array_equal(out["singles_out"], [0, 1, 0, 0, 0, 0])
  own = np.array([0, 0, 1, 1, 0, 1], bool)  # control predicates that match their own patient
  ctl = pso.singling_out(k, h, 10, 0.05, own_holdout_matched=own)
  np.testing.assert_allclose(ctl["weight"], (h - own) / 9)
  np.testing.assert_array_equal(ctl["singles_out"], [0, 1, 1, 0, 0, 1])


def test_summary_verdict_and_warnings():
  attack = np.zeros(400, bool)
  control = np.zeros(400, bool)
  attack[:2], control[:2] = True, True
  s = pso.summarise(attack, control, n_train_patients=100, weight_bound=0.01, risk_bound=0.05)
  assert s["verdict"] == "pass" and s["residual_risk"]["value"] == 0 and s["warnings"]
  assert s["baseline_at_weight_bound"] == pytest.approx(stats.binom.pmf(1, 100, 0.01))
  attack[:80] = True
  s = pso.summarise(attack, control, n_train_patients=100, weight_bound=0.01, risk_bound=0.05)
  assert s["verdict"] == "fail" and s["residual_risk"]["low"] > 0.1
  assert s["attack"]["successes"] == 80


def test_memorisation_rate():
  m = pso.memorisation_rate([0.1, 0.9, 0.95, 0.3], tau=0.9)
  assert m["successes"] == 2 and m["n"] == 4
  assert pso.memorisation_rate([], 0.5) is None

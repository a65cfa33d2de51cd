"""The suite's tolerances (tests/tolerances.py) against float32 sums in numpy, and the assertions
fail where they must."""

import numpy as np
import pytest

import tolerances as T


@pytest.mark.parametrize("terms", [16, 256, 4096, 65536])
def test_reduction_rtol_bounds_float32_sums_in_any_order(terms):
  rng = np.random.default_rng(terms)
  x = (rng.normal(size=(64, terms)) * rng.uniform(0.1, 10, (64, 1))).astype(np.float32)
  orders = {"sequential": np.cumsum(x, axis=1, dtype=np.float32)[:, -1],
            "reversed": np.cumsum(x[:, ::-1], axis=1, dtype=np.float32)[:, -1],
            "pairwise": x.sum(axis=1, dtype=np.float32),
            "blocks of 8": x.reshape(64, -1, 8).sum(axis=2).sum(axis=1, dtype=np.float32)}
  scale = np.abs(x.astype(np.float64).sum(axis=1)).max()
  worst = max(np.abs(a - b).max() for a in orders.values() for b in orders.values()) / scale
  assert worst <= T.reduction_rtol(terms)
  assert worst >= T.reduction_rtol(terms) / 100  # a bound, not a blanket: within 2 decades


def test_sequential_rtol_adds_per_step():
  assert T.sequential_rtol(7, T.reduction_rtol(4)) == pytest.approx(7 * 8 * T.EPS32)


def test_network_rtol_chains_the_layers_fan_in_sums():
  params = {"conv": np.zeros((3, 3, 8, 16)), "dense": np.zeros((16, 4)), "bias": np.zeros(4)}
  assert T.network_rtol(params) == pytest.approx(2 * T.reduction_rtol(3 * 3 * 8))
  assert T.training_rtol(3, 2048) == pytest.approx(3 * 4 * 2048 ** 0.5 * T.EPS32)


def test_assert_close_is_relative_to_the_array_scale():
  desired = np.array([4.0, -2.0, 1e-6], np.float32)  # a near-zero element: judged by the scale 4
  T.assert_close(desired + np.float32(0.5e-5 * 4), desired, rtol=1e-5)
  with pytest.raises(AssertionError):
    T.assert_close(desired + np.array([0, 0, 2e-5 * 4], np.float32), desired, rtol=1e-5)
  with pytest.raises(AssertionError):  # each leaf of a tree on its own scale
    T.assert_close({"a": desired, "b": desired / 1000}, {"a": desired, "b": desired / 1000 + 1e-6},
                   rtol=1e-5)


def test_a_list_of_numbers_is_one_array():
  T.assert_close([453.16, 304.54], np.array([453.16, 304.54]), rtol=1e-6)
  with pytest.raises(AssertionError):  # the second loss is compared, not the first one twice
    T.assert_close([453.16, 400.0], np.array([453.16, 304.54]), rtol=1e-6)


def test_assert_identical_fails_on_one_ulp():
  a = np.linspace(0, 1, 10, dtype=np.float32)
  T.assert_identical({"x": a}, {"x": a.copy()})
  b = a.copy()
  b[3] = np.nextafter(b[3], np.float32(2))
  with pytest.raises(AssertionError):
    T.assert_identical(a, b)


def test_assert_close_normwise_allows_rare_outliers_but_not_a_shift():
  desired = np.random.default_rng(0).normal(size=1000).astype(np.float32)
  one_off = desired.copy()
  one_off[7] *= 1 + 1e-4  # one Adam-amplified weight
  T.assert_close_normwise({"w": one_off}, {"w": desired}, rtol=1e-5)
  with pytest.raises(AssertionError, match=r"\['w'\]: norm-wise relative difference"):
    T.assert_close_normwise({"w": desired * (1 + 1e-4)}, {"w": desired}, rtol=1e-5)

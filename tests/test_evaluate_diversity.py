"""Diversity: retrieval score against brute force, Fréchet distance against a scipy sqrtm reference."""

import numpy as np
import pytest
from scipy import linalg

from pso_jax.errors import UserError
from pso_jax.evaluate import diversity


def _frechet_reference(a, b):
  mu_a, mu_b = a.mean(0), b.mean(0)
  s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  root = linalg.sqrtm(s_a @ s_b)
  return float(np.sum((mu_a - mu_b) ** 2) + np.trace(s_a + s_b - 2 * np.real(root)))


def test_frechet_matches_scipy_sqrtm_and_properties():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(400, 12)) @ rng.normal(size=(12, 12))
  b = 0.7 * rng.normal(size=(300, 12)) @ rng.normal(size=(12, 12)) + 0.5
  assert diversity.frechet_distance(a, b) == pytest.approx(_frechet_reference(a, b), rel=1e-6)
  assert diversity.frechet_distance(a, a) == pytest.approx(0, abs=1e-8)
  # equal covariances: only the mean term remains
  assert diversity.frechet_distance(a, a + 2.0) == pytest.approx(12 * 4.0, rel=1e-9)
  with pytest.raises(UserError, match="dimensions differ"):
    diversity.frechet_distance(a, b[:, :5])


def test_retrieval_score_against_brute_force():
  rng = np.random.default_rng(1)
  train = rng.normal(size=(300, 16)).astype(np.float32)
  # a collapsed set (noisy copies of 10 training images) and a diverse one
  collapsed = train[rng.integers(0, 10, 200)] + 0.01 * rng.normal(size=(200, 16))
  diverse = rng.normal(size=(200, 16))
  out = diversity.image_retrieval_score(collapsed, train, diverse, seed=0)
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  want = lambda q: len(np.unique(np.argmax(unit(q) @ unit(train).T, axis=1))) / len(train)
  assert out["synthetic"]["share"] == pytest.approx(want(collapsed))
  assert out["real"]["share"] == pytest.approx(want(diverse))
  assert out["synthetic"]["distinct"] <= 10 < out["real"]["distinct"]
  assert out["ratio"] == pytest.approx(out["synthetic"]["share"] / out["real"]["share"])
  assert out["real"]["uniform_share"] == pytest.approx(1 - (1 - 1 / 300) ** 200)

"""The in-graph diversity regulariser: rates, geometry and the k-anonymous neighbours."""

import os
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import tolerances as T
from pso_jax.diffusion import regulariser
from pso_jax.errors import UserError


def _unit(rng, n, d):
  x = rng.normal(size=(n, d)).astype(np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _config(**kw):
  c = ml_collections.ConfigDict(dict(enabled=True, cond_dropout=0.0, jitter=0.0, kanon_k=0,
                                     kanon_prob=0.0))
  c.update(kw)
  return c


def test_dropout_rate_matches_p():
  cond = jnp.asarray(_unit(np.random.default_rng(0), 20000, 8))
  out = regulariser.regularise(cond, jax.random.key(1), _config(cond_dropout=0.3))
  dropped = np.all(np.asarray(out) == 0, axis=1)
  # binomial: std of the rate is sqrt(p(1-p)/n) = 0.0032; 4 sigma
  assert abs(dropped.mean() - 0.3) < 4 * np.sqrt(0.3 * 0.7 / 20000)
  np.testing.assert_array_equal(np.asarray(out)[~dropped], np.asarray(cond)[~dropped])


def test_jitter_unit_norm_and_expected_cosine():
  rng = np.random.default_rng(0)
  d, s = 64, 0.5
  cond = _unit(rng, 4000, d)
  cond[:10] = 0  # null conditions stay null
  out = np.asarray(regulariser.regularise(jnp.asarray(cond), jax.random.key(2), _config(jitter=s)))
  np.testing.assert_array_equal(out[:10], 0)
  np.testing.assert_allclose(np.linalg.norm(out[10:], axis=1), 1, atol=1e-5)
  cos = np.sum(out[10:] * cond[10:], axis=1)
  # independent reference: the same definition, sampled with numpy in float64
  ref = cond[10:] + rng.normal(size=cond[10:].shape) * s / np.sqrt(d)
  ref_cos = np.sum(ref * cond[10:], axis=1) / np.linalg.norm(ref, axis=1)
  assert abs(cos.mean() - ref_cos.mean()) < 0.005
  assert abs(cos.mean() - 1 / np.sqrt(1 + s * s)) < 0.01  # large-d limit
  assert 0 < cos.std() < 0.1


def test_disabled_is_identity_and_uncond_passes():
  cond = jnp.asarray(_unit(np.random.default_rng(0), 16, 4))
  on = _config(cond_dropout=0.5, jitter=0.1)
  off = _config(cond_dropout=0.5, jitter=0.1, enabled=False)
  assert regulariser.regularise(None, jax.random.key(0), on) is None
  np.testing.assert_array_equal(regulariser.regularise(cond, jax.random.key(0), off), cond)
  assert not np.array_equal(regulariser.regularise(cond, jax.random.key(0), on), cond)


def test_kanon_share_rate():
  rng = np.random.default_rng(0)
  cond, other = _unit(rng, 10000, 8), _unit(rng, 10000, 8)
  out = np.asarray(regulariser.regularise(jnp.asarray(cond), jax.random.key(3),
                                          _config(kanon_k=3, kanon_prob=0.25), jnp.asarray(other)))
  shared = np.all(out == other, axis=1)
  assert np.all(shared | np.all(out == cond, axis=1))
  assert abs(shared.mean() - 0.25) < 4 * np.sqrt(0.25 * 0.75 / 10000)
  with pytest.raises(UserError, match="kanon_cond"):
    regulariser.regularise(jnp.asarray(cond), jax.random.key(3), _config(kanon_k=3, kanon_prob=0.25))


def test_kanon_neighbours_match_numpy_brute_force():
  rng = np.random.default_rng(1)
  n, k = 300, 4
  feats = _unit(rng, n, 16)
  patients = np.array([f"p{int(i)}" for i in rng.integers(0, 60, size=n)])
  nbrs = regulariser.kanon_neighbours(feats, patients, k, block=64)
  assert nbrs.shape == (n, k)
  sims = feats.astype(np.float64) @ feats.T.astype(np.float64)
  for i in range(n):
    assert len(set(patients[nbrs[i]])) == k and patients[i] not in set(patients[nbrs[i]])
    # brute force: best image of every other patient, patients ranked by it
    best = {}
    for j in np.argsort(-sims[i], kind="stable"):
      if patients[j] != patients[i] and patients[j] not in best:
        best[patients[j]] = j
    np.testing.assert_array_equal(nbrs[i], list(best.values())[:k])
  shared = regulariser.kanon_conditions(feats, nbrs)
  ref = feats[nbrs].mean(1)
  T.assert_close(shared, ref / np.linalg.norm(ref, axis=1, keepdims=True),  # sums of k, then of d
                 T.sequential_rtol(2, T.reduction_rtol(max(nbrs.shape[1], feats.shape[1]))))


def test_kanon_needs_enough_patients():
  feats = _unit(np.random.default_rng(0), 10, 4)
  with pytest.raises(UserError, match="kanon_k"):
    regulariser.kanon_neighbours(feats, np.array(["a", "b", "c"] * 3 + ["a"]), 3)


@pytest.mark.parametrize("match", ["any", "findings"])
def test_kanon_table_of_the_train_split(tiny_trained_workdir, tmp_path, match):
  """The training table: per train image, the normalised mean features of its nearest images from
  k other patients (brute force), among the same findings with kanon_match=findings."""
  from pso_jax.data.dataset import load_table
  from pso_jax.diffusion import train_setup
  config, workdir = tiny_trained_workdir
  config = config.copy_and_resolve_references()
  config.regulariser.kanon_k, config.regulariser.kanon_prob = 2, 0.5
  config.regulariser.kanon_match = match
  table = train_setup.kanon_table(config, workdir, str(tmp_path))
  train = load_table(workdir, "train", keys=("feature", "labels", "patient_id"))
  feats = np.asarray(train["feature"], np.float64)
  groups = (np.asarray(train["labels"]) > 0.5) @ (1 << np.arange(8))
  patients = np.asarray(train["patient_id"])
  n_same_patients = 0
  for i in range(len(feats)):
    pool = np.arange(len(feats))
    same = pool[groups == groups[i]]
    if match == "findings" and len(set(patients[same]) - {patients[i]}) >= 2:
      pool = same
      n_same_patients += 1
    picked, seen = [], {patients[i]}
    for j in sorted(pool, key=lambda j: -feats[i] @ feats[j]):
      if patients[j] not in seen:
        picked.append(j)
        seen.add(patients[j])
    mean = feats[picked[:2]].mean(0)
    np.testing.assert_allclose(table[i], mean / np.linalg.norm(mean), atol=1e-5)
  assert match == "any" or n_same_patients > len(feats) // 2  # the findings pools were used
  assert os.path.exists(tmp_path / f"kanon_neighbours_k2{'_findings' * (match == 'findings')}.npy")
  config.regulariser.kanon_match = "labels"
  with pytest.raises(UserError, match="kanon_match"):
    train_setup.check_config(config)

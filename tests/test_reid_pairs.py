"""Re-id calibration pairs computed a block at a time (reid.pair_chunks / pair_table): the same
pairs and similarities as whole-split numpy, without holding an index per pair (issue 16)."""

import itertools
import tracemalloc

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from pso_jax.privacy import reid
from pso_jax.privacy import reid_training


def _split(n: int, seed: int = 0, d: int = 8):
  """n unit-norm embeddings of patients with 1 to 4 scans each (string ids, as the records')."""
  rng = np.random.default_rng(seed)
  patients = np.repeat(np.arange(n), rng.integers(1, 5, n))[:n].astype(str)
  e = rng.normal(size=(n, d)).astype(np.float32)
  return e / np.linalg.norm(e, axis=1, keepdims=True), patients


def _reference_sampled(patients, max_pairs: int, seed: int):
  """The capped rule written out whole: every same-patient pair, then different-patient pairs
  drawn 2 n_neg at a time, deduplicated as (min, max) columns and shuffled."""
  patients = np.asarray(patients)
  n = len(patients)
  pos = [(a, b) for a, b in itertools.combinations(range(n), 2) if patients[a] == patients[b]]
  pos.sort(key=lambda p: (patients[p[0]], p[0], p[1]))  # patients in sorted order, scans in order
  n_neg = max(max_pairs - len(pos), 1)
  rng = np.random.default_rng(seed)
  a, b = rng.integers(0, n, (2, 2 * n_neg))
  keep = patients[a] != patients[b]
  neg = np.unique(np.stack([np.minimum(a, b)[keep], np.maximum(a, b)[keep]]), axis=1)
  neg = neg[:, rng.permutation(neg.shape[1])[:n_neg]]
  i = np.array([p[0] for p in pos] + neg[0].tolist())
  j = np.array([p[1] for p in pos] + neg[1].tolist())
  return i, j


@pytest.mark.parametrize("n, max_pairs", [(9, 100), (60, 10_000), (400, 3_000)])
def test_pair_table_is_numpy_on_every_pair(n, max_pairs):
  e, patients = _split(n, seed=n)
  sims, same = reid.pair_table(e, patients, max_pairs, seed=3, chunk=7)  # many small blocks
  if n * (n - 1) // 2 <= max_pairs:
    i, j = np.triu_indices(n, 1)
  else:  # > 256 images: int64 keys must sort as values, not as their little-endian bytes
    i, j = _reference_sampled(patients, max_pairs, seed=3)
    assert len(i) == max_pairs
  np.testing.assert_array_equal(same, patients[i] == patients[j])
  np.testing.assert_allclose(sims, np.sum(e[i].astype(np.float64) * e[j], axis=1), atol=1e-6)
  # the whole-split path: the very same float32 values
  mi, mj, msame = reid.make_pairs(patients, max_pairs, seed=3)
  np.testing.assert_array_equal(np.stack([mi, mj]), np.stack([i, j]))
  np.testing.assert_array_equal(sims, reid.pair_similarities(e, mi, mj))


def test_pair_table_holds_5_bytes_per_pair():
  """Every pair of 1,500 images (1.12M pairs): sims and flags are 5.6 MB; an int64 index pair
  per pair would add 18 MB (what train_reid's peak grew by with the split, up to max_pairs)."""
  e, patients = _split(1500)
  pairs = 1500 * 1499 // 2
  tracemalloc.start()
  try:
    sims, same = reid.pair_table(e, patients, 2_000_000, chunk=4096)
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert len(sims) == len(same) == pairs
  # results, their blocks before the concatenation, one block's temporaries
  assert peak < 2 * 5 * pairs + (1 << 20), peak


def test_verification_metrics_against_numpy():
  e, patients = _split(120, seed=5, d=4)

  class Fixed:  # a re-id model whose embedding of image k is e[k]
    def embed(self, images):
      return e[np.asarray(images)[:, 0, 0, 0].astype(int)]

  images = np.zeros((120, 1, 1, 1), np.uint8) + np.arange(120, dtype=np.uint8)[:, None, None, None]
  out = reid_training.verification_metrics(Fixed(), images, patients, max_pairs=10 ** 6,
                                           resamples=20, seed=0, target_fpr=0.01)
  i, j = np.triu_indices(120, 1)
  sims = np.sum(e[i].astype(np.float64) * e[j], axis=1)
  same = patients[i] == patients[j]
  neg = np.sort(sims[~same])[::-1]
  allowed = int(np.floor(0.01 * neg.size))
  assert out["n_same"] == same.sum() and out["n_different"] == (~same).sum()
  assert neg[allowed] < out["tau"] <= neg[allowed] + 2e-5  # just above the highest rejected
  assert out["fpr"] == pytest.approx(np.mean(neg >= out["tau"])) and out["fpr"] <= 0.01
  assert out["auc"] == pytest.approx(roc_auc_score(same, sims), abs=1e-6)

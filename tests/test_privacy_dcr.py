"""Distance to closest record: the nearest training and holdout images the audit finds are those a
brute-force search (scikit-learn) finds, and the DCR figures are those of independent formulas
(binomial tails by hand, Clopper-Pearson from beta quantiles, cluster-robust errors by loop)."""

import math

import numpy as np
import pytest
from scipy import stats
from sklearn.neighbors import NearestNeighbors

from conftest import load_config
from pso_jax.errors import UserError
from pso_jax.privacy import audit, dcr


def _unit(x):
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _sets(seed=0, n_train=60, n_hold=70, n_audit=50, d=12, per=3):
  rng = np.random.default_rng(seed)
  train, hold, audited = (_unit(rng.standard_normal((n, d))) for n in (n_train, n_hold, n_audit))
  tp = np.array([f"t{i // per}" for i in range(n_train)])
  hp = np.array([f"h{i // per}" for i in range(n_hold)])
  return train, tp, hold, hp, audited


def test_nearest_records_match_brute_force():
  train, tp, hold, hp, audited = _sets()
  config = load_config("tiny")
  result = audit.audit_embeddings(config, audited, train, tp, hold, hp, 0.9)
  nn = lambda refs: NearestNeighbors(n_neighbors=1, metric="cosine").fit(refs)
  dist_t, idx_t = nn(train).kneighbors(audited)
  dist_h, idx_h = nn(hold).kneighbors(audited)
  ev = result["evidence"]
  assert [e["nearest_train_index"] for e in ev] == idx_t[:, 0].tolist()
  assert [e["nearest_holdout_index"] for e in ev] == idx_h[:, 0].tolist()
  np.testing.assert_allclose([e["similarity"] for e in ev], 1 - dist_t[:, 0], atol=1e-5)
  np.testing.assert_allclose([e["holdout_similarity"] for e in ev], 1 - dist_h[:, 0], atol=1e-5)
  d = result["dcr"]
  assert d["closer_to_train"] == int(np.sum(dist_t[:, 0] < dist_h[:, 0]))
  # the control: holdout images, nearest training image and nearest holdout image of another patient
  ctrl = hold[np.sort(np.random.default_rng(config.seed).choice(len(hold), len(audited), False))]
  s_t = ctrl.astype(np.float64) @ train.astype(np.float64).T
  s_h = ctrl.astype(np.float64) @ hold.astype(np.float64).T
  own = hp[np.sort(np.random.default_rng(config.seed).choice(len(hold), len(audited), False))]
  s_h[own[:, None] == hp[None]] = -np.inf
  np.testing.assert_allclose(result["arrays"]["control_holdout_nn"], s_h.max(1), atol=1e-5)
  assert d["control_share"] == pytest.approx(np.mean(s_t.max(1) > s_h.max(1)))


def test_statistics_match_independent_formulas():
  rng = np.random.default_rng(3)
  n, m = 80, 90
  t, h = rng.uniform(0.5, 1, n), rng.uniform(0.5, 1, n)
  ct, ch = rng.uniform(0.5, 1, m), rng.uniform(0.5, 1, m)
  clusters = np.repeat(np.arange(n // 2), 2)
  d = dcr.statistics(t, h, ct, ch, clusters=clusters, control_clusters=None)
  k = int((t > h).sum())
  assert d["closer_to_train"] == k and d["share"] == k / n
  tail = sum(math.comb(n, i) for i in range(k, n + 1)) / 2 ** n
  assert d["binomial_p"] == pytest.approx(tail, rel=1e-9)
  low = stats.beta.ppf(0.025, k, n - k + 1)
  high = stats.beta.ppf(0.975, k + 1, n - k)
  assert d["share_ci"] == pytest.approx([low, high], rel=1e-6)
  # cluster-robust error of the released share: sum of cluster residuals, by loop
  p = k / n
  resid = [sum((t[i] > h[i]) - p for i in np.flatnonzero(clusters == c)) for c in range(n // 2)]
  c = n // 2
  se = math.sqrt(sum(r * r for r in resid) * c / (c - 1)) / n
  assert d["share_se"] == pytest.approx(se, rel=1e-9)
  pc = float(np.mean(ct > ch))
  assert d["control_se"] == pytest.approx(math.sqrt(pc * (1 - pc) / m), rel=1e-9)
  z = (p - pc) / math.hypot(se, math.sqrt(pc * (1 - pc) / m))
  assert d["p"] == pytest.approx(0.5 * math.erfc(z / math.sqrt(2)), rel=1e-9)


def test_clustering_widens_the_error_of_duplicated_images():
  flags = np.random.default_rng(0).random(60) < 0.4
  single = dcr.clustered_share(flags)[1]
  twice = dcr.clustered_share(np.repeat(flags, 2), np.repeat(np.arange(60), 2))[1]
  # each image counted twice is still 60 draws: the error stays that of 60, not of 120
  assert twice == pytest.approx(single * math.sqrt(60 / 59), rel=1e-9)
  assert dcr.clustered_share(np.repeat(flags, 2))[1] < twice


def test_a_release_nearer_training_than_its_control_is_flagged():
  train, tp, hold, hp, _ = _sets(1, n_train=90, n_hold=90)
  rng = np.random.default_rng(5)
  unseen = _unit(rng.standard_normal((60, 12)))
  config = load_config("tiny")
  null = audit.audit_embeddings(config, unseen, train, tp, hold, hp, 0.99)["dcr"]
  # half of the release are training images with a little noise: nearer training than holdout
  leaky = unseen.copy()
  leaky[:30] = _unit(train[:30] + 0.05 * rng.standard_normal((30, 12)))
  flagged = audit.audit_embeddings(config, leaky, train, tp, hold, hp, 0.99)["dcr"]
  assert null["p"] > 0.05 and flagged["p"] < 0.01 and flagged["share"] > null["share"] + 0.2


def test_bad_similarities_are_refused():
  good = np.full(5, 0.5)
  with pytest.raises(UserError, match="NaN/Inf"):
    dcr.statistics(np.r_[good[:4], np.nan], good, good, good)
  with pytest.raises(UserError, match="one training and one holdout similarity"):
    dcr.statistics(good, good[:3], good, good)

"""AUROC, bootstrap, pair building and tau calibration against scikit-learn and brute force."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from pso_jax.privacy import reid
from pso_jax.errors import UserError
from pso_jax.evaluate import utility

FINDINGS = ("No Finding", "Atelectasis", "Cardiomegaly", "Consolidation", "Edema",
            "Pleural Effusion", "Pneumonia", "Pneumothorax")


def _scores(n, seed, ties=False):
  rng = np.random.default_rng(seed)
  labels = rng.random(n) < 0.3
  scores = rng.normal(size=n) + labels
  return (np.round(scores, 1) if ties else scores), labels


@pytest.mark.parametrize("ties", [False, True])
def test_auc_equals_sklearn(ties):
  scores, labels = _scores(400, 1, ties)
  assert utility.roc_auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_auc_undefined_for_one_class():
  assert utility.roc_auc([0.1, 0.5, 0.9], [1, 1, 1]) is None
  assert utility.roc_auc([0.1, 0.5, 0.9], [0, 0, 0]) is None


def test_weighted_auc_equals_sklearn_on_resampled_data():
  scores, labels = _scores(300, 2, ties=True)
  weights = utility.bootstrap_weights(300, 4, seed=3)
  got = utility.weighted_auc(scores, labels, weights)
  for r in range(4):
    idx = np.repeat(np.arange(300), weights[r].astype(int))
    assert got[r] == pytest.approx(roc_auc_score(labels[idx], scores[idx]), abs=1e-12)


def test_stratified_bootstrap_keeps_class_counts():
  labels = np.r_[np.ones(7), np.zeros(50)].astype(bool)
  w = utility.bootstrap_weights(57, 20, seed=0, strata=labels)
  np.testing.assert_array_equal(w[:, labels].sum(1), 7)
  np.testing.assert_array_equal(w[:, ~labels].sum(1), 50)


def test_utility_report_matches_sklearn_and_handles_undefined_findings():
  rng = np.random.default_rng(0)
  n = 200
  labels = (rng.random((n, 8)) < 0.25).astype(np.float32)
  labels[:, 6] = 0  # Pneumonia: no positives in test
  labels[:, 0] = 1  # No Finding: no negatives in test
  real = np.clip(labels * 0.3 + rng.random((n, 8)) * 0.7, 0, 1)
  syn = np.clip(labels * 0.2 + rng.random((n, 8)) * 0.8, 0, 1)
  report = utility.utility_report({"real": real, "synthetic": syn}, labels, FINDINGS,
                                  resamples=60, seed=1)
  assert report["defined"] == [False, True, True, True, True, True, False, True]
  assert len(report["notes"]) == 2 and "Pneumonia" in report["notes"][1]
  for name, probs in (("real", real), ("synthetic", syn)):
    model = report["models"][name]
    expected = [roc_auc_score(labels[:, c], probs[:, c]) for c in (1, 2, 3, 4, 5, 7)]
    got = [model["per_class"][FINDINGS[c]]["auroc"] for c in (1, 2, 3, 4, 5, 7)]
    np.testing.assert_allclose(got, expected, atol=1e-12)
    assert model["per_class"]["Pneumonia"]["auroc"] == utility.UNDEFINED
    assert model["mean_auroc"] == pytest.approx(np.mean(expected), abs=1e-12)
    lo, hi = model["mean_auroc_ci"]
    assert lo < model["mean_auroc"] < hi
  diff = report["difference"]
  assert diff["value"] == pytest.approx(report["models"]["synthetic"]["mean_auroc"]
                                        - report["models"]["real"]["mean_auroc"])
  assert diff["ci"][0] < diff["ci"][1]


def test_paired_difference_of_identical_models_is_exactly_zero():
  scores, labels = _scores(120, 5)
  probs = np.tile(scores[:, None], (1, 8))
  lab = np.tile(labels[:, None], (1, 8)).astype(np.float32)
  report = utility.utility_report({"real": probs, "synthetic": probs.copy()}, lab, FINDINGS,
                                  resamples=30, seed=0)
  assert report["difference"]["value"] == 0.0 and report["difference"]["ci"] == [0.0, 0.0]


def test_make_pairs_all_and_capped():
  patients = np.array(["a", "a", "b", "c", "c", "c", "d"])
  i, j, same = reid.make_pairs(patients, max_pairs=1000)
  brute = [(a, b, patients[a] == patients[b]) for a, b in itertools.combinations(range(7), 2)]
  assert sorted(zip(i.tolist(), j.tolist(), same.tolist())) == sorted(brute)
  patients = np.repeat(np.arange(50), 3).astype(str)
  i, j, same = reid.make_pairs(patients, max_pairs=500, seed=1)
  assert same.sum() == 50 * 3 and len(i) == 500       # every positive kept, negatives fill up
  assert (patients[i][~same] != patients[j][~same]).all() and (i < j).all()
  assert len(set(zip(i.tolist(), j.tolist()))) == 500


@pytest.mark.parametrize("target", [0.0, 0.001, 0.05, 0.3])
def test_tau_at_target_fpr_gives_that_fpr(target):
  rng = np.random.default_rng(0)
  sims = np.r_[rng.normal(0.8, 0.1, 300), rng.normal(0.2, 0.2, 3000)].astype(np.float32)
  same = np.r_[np.ones(300), np.zeros(3000)].astype(bool)
  tau = reid.calibrate_tau(sims, same, "fpr", target)
  fpr = reid.rates_at(sims, same, tau)["fpr"]
  assert fpr == int(np.floor(target * 3000 + 1e-9)) / 3000 <= target
  # the lowest such threshold up to the margin: the next lower negative would exceed the target
  neg = np.sort(sims[~same])[::-1]
  below = neg[neg < np.float32(tau)][0]
  assert np.mean(sims[~same] >= below) > target
  assert 0 < tau - below <= reid.TAU_MARGIN * 1.01


def test_tau_prob05_is_the_balanced_crossing():
  rng = np.random.default_rng(1)
  sims = np.r_[rng.normal(0.7, 0.1, 4000), rng.normal(0.3, 0.1, 40000)]
  same = np.r_[np.ones(4000), np.zeros(40000)].astype(bool)
  # equal-variance Gaussians, balanced classes: p = 0.5 where the densities cross, at 0.5
  assert reid.calibrate_tau(sims, same, "prob05", 0) == pytest.approx(0.5, abs=0.01)
  with pytest.raises(UserError):
    reid.calibrate_tau(sims, same, "median", 0)


def test_supcon_loss_matches_numpy():
  rng = np.random.default_rng(0)
  z = rng.normal(size=(12, 5)).astype(np.float32)
  z /= np.linalg.norm(z, axis=1, keepdims=True)
  labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 4, 4])  # patient 3 has no positive
  loss_fn = jax.jit(lambda x: reid.supcon_loss(x, jnp.asarray(labels), 0.2))
  loss, metrics = loss_fn(jnp.asarray(z))
  losses, hits = [], []
  for i in range(12):
    others = [j for j in range(12) if j != i]
    logits = z[i] @ z[others].T / 0.2
    log_prob = logits - np.log(np.exp(logits).sum())
    pos = [k for k, j in enumerate(others) if labels[j] == labels[i]]
    hits.append(labels[others[int(np.argmax(logits))]] == labels[i])
    if pos:
      losses.append(-log_prob[pos].mean())
  assert float(loss) == pytest.approx(np.mean(losses), rel=1e-5)
  assert float(metrics["top1"]) == pytest.approx(np.mean(hits))


def test_reid_bad_splits_fail_before_training():
  from pso_jax.privacy import reid_training as reid_train
  from tests.conftest import load_config
  section = load_config("tiny").reid

  def split(*patients):
    return {"image": np.zeros((len(patients), 4, 4, 1), np.uint8), "patient_id": np.array(patients)}

  good = {"train": split("a", "a", "b"), "val": split("c", "c", "d"), "test": split("e", "e", "f")}
  reid_train.check_splits(good, section)
  with pytest.raises(UserError, match="share 1 patients"):
    reid_train.check_splits(dict(good, test=split("a", "e", "e")), section)
  with pytest.raises(UserError, match="the val split has 3 patients with at most 1"):
    reid_train.check_splits(dict(good, val=split("c", "d", "g")), section)
  section.tau_mode = "median"
  with pytest.raises(UserError, match="tau_mode"):
    reid_train.check_splits(good, section)

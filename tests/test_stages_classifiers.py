"""train_reid, train_classifier and evaluate on a real tiny workdir (prepare's TFDS files),
checked against scikit-learn and against prepare's own features."""

import os
import time

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

import tolerances as T
from pso_jax import io_utils, stages
from pso_jax.privacy import reid
from pso_jax.data import dataset
from pso_jax.errors import UserError
from pso_jax.evaluate import classifier as classifier_lib
from pso_jax.evaluate import synthetic_utility
from tests.conftest import clone_workdir


@pytest.fixture(scope="module")
def trained(tiny_trained_workdir, tmp_path_factory):
  """The suite's tiny trained workdir, copied (evaluate writes into it); the finished stages
  return their stored results."""
  config, src = tiny_trained_workdir
  workdir = clone_workdir(src, tmp_path_factory.mktemp("cnn") / "run")
  results = {m: stages.get_stage(m)(config, workdir) for m in ("train_reid", "train_classifier")}
  return config, workdir, results


def test_reid_stage(trained):
  config, workdir, results = trained
  result = results["train_reid"]
  assert os.path.exists(os.path.join(workdir, "reid", "COMPLETE"))
  assert result == io_utils.read_json(os.path.join(workdir, "reid", "reid.json"))
  model = reid.load_reid(workdir)
  assert model.tau == result["tau"]
  for split, metrics in (("val", result["val"]), ("test", result["test"])):
    data = dataset.load_arrays(workdir, split, ("image", "patient_id"))
    emb = model.embed(data["image"])
    assert emb.dtype == np.float32 and emb.shape == (len(data["image"]), config.reid.embed_dim)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    # independent recomputation: every pair of the split, sklearn's AUC, FPR of sim >= tau
    sims = emb @ emb.T
    iu = np.triu_indices(len(emb), 1)
    same = (data["patient_id"][:, None] == data["patient_id"][None, :])[iu]
    assert metrics["auc"] == pytest.approx(roc_auc_score(same, sims[iu]), abs=1e-5)
    # tau sits a float32 ulp above a negative pair's similarity (its FPR boundary), so a pair at
    # the boundary may flip with the summation order: bracket the FPR with a 1e-5 margin
    neg = sims[iu][~same]
    assert np.mean(neg >= model.tau + 1e-5) <= metrics["fpr"] <= np.mean(neg >= model.tau - 1e-5)
    lo, hi = metrics["auc_ci"]
    assert lo <= metrics["auc"] <= hi
  assert result["val"]["fpr"] <= config.reid.target_fpr  # calibrated on val at the target FPR
  assert result["auc"] == result["test"]["auc"]


def test_classifier_stage(trained):
  config, workdir, results = trained
  result = results["train_classifier"]
  model = classifier_lib.load_classifier(workdir)
  test = dataset.load_arrays(workdir, "test", ("image", "labels"))
  probs = model.predict(test["image"])
  assert probs.shape == (len(test["image"]), 8) and (probs >= 0).all() and (probs <= 1).all()
  defined = [c for c in range(8) if 0 < test["labels"][:, c].sum() < len(probs)]
  expected = [roc_auc_score(test["labels"][:, c], probs[:, c]) for c in defined]
  assert result["mean_auroc"] == pytest.approx(np.mean(expected), abs=1e-6)
  findings = config.data.findings
  for c in range(8):
    value = result["per_class"][findings[c]]["auroc"]
    assert value == "undefined" if c not in defined else value == pytest.approx(
        expected[defined.index(c)], abs=1e-6)
  assert result["training"]["best_step"] <= result["training"]["steps"] == config.classifier.steps
  start = time.time()  # complete: the stage returns at once with the same result
  assert stages.get_stage("train_classifier")(config, workdir) == result
  assert time.time() - start < 2


def test_evaluate_on_a_released_set(trained):
  config, workdir, _ = trained
  train = dataset.load_arrays(workdir, "train", ("image", "labels"))
  n = len(train["image"])
  released = {"images": train["image"], "labels": train["labels"].copy(),
              "paths": [f"images/{i}.png" for i in range(n)], "source_index": np.arange(n)}
  # features of the released images, computed as prepare computes them: here the train images
  # themselves, so they must reproduce prepare's stored train features
  (syn, train_feats, _), note = synthetic_utility.synthetic_features(config, workdir, train["image"],
                                                                     train["image"])
  assert note is None
  f = config.data.features  # pooled, then projected from pool^2 x channels values
  T.assert_close(syn, train_feats,
                 T.sequential_rtol(2, T.reduction_rtol(f.pool_size ** 2 * config.data.channels)))

  splits = {s: dataset.load_arrays(workdir, s, ("image", "labels")) for s in ("train", "val", "test")}
  result = synthetic_utility.evaluate(config, workdir, splits, released)
  util = result["utility"]
  assert util["difference"]["value"] == pytest.approx(
      util["models"]["synthetic"]["mean_auroc"] - util["models"]["real"]["mean_auroc"])
  assert result["steps"] == result["synthetic_classifier"]["steps"] == config.classifier.steps
  irs = result["diversity"]["image_retrieval"]["synthetic"]
  assert irs["distinct"] == min(len(splits["test"]["image"]), n)  # every image retrieves itself

  bad = dict(released, labels=released["labels"][:, :7])
  with pytest.raises(UserError, match="labels have shape"):
    synthetic_utility.check_synthetic(bad, splits["train"], config.data.findings)
  flipped = released["labels"].copy()
  flipped[0] = 1 - flipped[0]
  with pytest.raises(UserError, match="differ from their source"):
    synthetic_utility.check_synthetic(dict(released, labels=flipped), splits["train"],
                                      config.data.findings)
  with pytest.raises(UserError, match="no labels"):
    synthetic_utility.check_synthetic(dict(released, labels=None), splits["train"],
                                      config.data.findings)

"""Diversity on every run (issue 15, item 5): with features from an external extractor
(`data.features.kind=file`, the reference's recipe) pso_jax cannot embed synthetic images in that
space, and diversity was skipped. It is now computed in the real-data classifier's penultimate
embedding, and the result names the space. Checked against an independent computation: the
embedding read from flax's captured intermediates (and reproducing the classifier's outputs through
its head), retrieval by brute-force cosine argmax, the Fréchet distance by scipy's sqrtm."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import linalg

from conftest import load_config
from pso_jax.data import dataset
from pso_jax.evaluate import classifier as classifier_lib
from pso_jax.evaluate import synthetic_utility
from pso_jax.models import cnn


@pytest.fixture(scope="module")
def file_features_workdir(tmp_path_factory):
  """A tiny workdir prepared from a features .npy (one row per phantom scan), with the real-data
  classifier trained."""
  from pso_jax.stages import prepare, train_classifier
  root = tmp_path_factory.mktemp("file_features")
  config = load_config("tiny")
  phantom = config.data.phantom
  n_scans = phantom.num_patients * phantom.scans_per_patient
  path = str(root / "features.npy")
  np.save(path, np.random.default_rng(3).normal(size=(n_scans, config.data.features.dim)))
  config.data.features.kind, config.data.features.path = "file", path
  workdir = str(root / "run")
  prepare.run(config, workdir)
  train_classifier.run(config, workdir)
  return config, workdir


def _penultimate_reference(classifier, images) -> np.ndarray:
  """The pooled output of the last residual block, read from captured intermediates."""
  spec = classifier.spec
  assert spec.arch == "small_resnet"
  model = cnn.build_cnn(spec)
  _, state = model.apply(classifier.variables, cnn.preprocess(jnp.asarray(images), spec),
                         train=False, capture_intermediates=True, mutable=["intermediates"])
  blocks = sorted(k for k in state["intermediates"] if k.startswith("BasicBlock_"))
  last = state["intermediates"][blocks[-1]]["__call__"][0]
  return np.asarray(jnp.mean(last, axis=(1, 2)), np.float64)


def _frechet_scipy(a, b) -> float:
  s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  root = np.real(linalg.sqrtm(s_a @ s_b))
  return float(np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(s_a + s_b - 2 * root))


def _retrieved_share(queries, train) -> float:
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  return len(np.unique(np.argmax(unit(queries) @ unit(train).T, axis=1))) / len(train)


def test_file_features_get_diversity_in_the_classifier_space(file_features_workdir):
  config, workdir = file_features_workdir
  splits = {s: dataset.load_arrays(workdir, s, ("image", "labels")) for s in ("train", "val", "test")}
  train, test = splits["train"], splits["test"]
  # a collapsed "synthetic" set as large as the test split: a few training images, repeated
  n = len(test["image"])
  source = np.arange(n) % 4
  released = {"images": train["image"][source], "labels": train["labels"][source].copy(),
              "paths": [f"images/{i}.png" for i in range(n)], "source_index": source}
  result = synthetic_utility.evaluate(config, workdir, splits, released)
  div = result["diversity"]
  assert div["feature_space"] == "classifier_penultimate"
  assert "penultimate" in div["feature_space_description"]

  # the embedding, independently: captured intermediates, and through the head the classifier's
  # own probabilities
  model = classifier_lib.load_classifier(workdir)
  ref = {k: _penultimate_reference(model, x) for k, x in
         (("synthetic", released["images"]), ("train", train["image"]), ("test", test["image"]))}
  ours = synthetic_utility.classifier_embedding(model, train["image"])
  np.testing.assert_allclose(ours, ref["train"], rtol=1e-4, atol=1e-5)
  head = model.variables["params"]["Head_0"]["Dense_0"]
  probs = jax.nn.sigmoid(ref["test"] @ np.asarray(head["kernel"]) + np.asarray(head["bias"]))
  np.testing.assert_allclose(probs, model.predict(test["image"]), rtol=1e-4, atol=1e-5)

  centre = ref["train"].mean(axis=0)
  syn, tr, te = (ref[k] - centre for k in ("synthetic", "train", "test"))
  irs = div["image_retrieval"]
  assert irs["synthetic"]["share"] == pytest.approx(_retrieved_share(syn, tr))
  assert irs["real"]["share"] == pytest.approx(_retrieved_share(te, tr))
  assert irs["synthetic"]["distinct"] <= 4 < irs["real"]["distinct"]  # collapsed vs real
  assert div["frechet_synthetic_train"] == pytest.approx(_frechet_scipy(syn, tr), rel=1e-3)
  assert div["frechet_real_train"] == pytest.approx(_frechet_scipy(te, tr), rel=1e-3)


def test_the_report_names_the_diversity_space():
  from pso_jax.report import results_page
  r = {"evaluate": {"diversity": {"feature_space": "classifier_penultimate",
                                  "image_retrieval": {"ratio": 0.5}}}}
  h = results_page.headline(r)
  assert h["diversity_space"] == "classifier_penultimate" and h["irs_ratio"] == 0.5

"""The phantom dataset: patients re-identifiable, findings learnable, everything deterministic."""

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler

from conftest import load_config
from pso_jax.data import phantom


@pytest.fixture(scope="module")
def medium():
  """400 patients x 4 scans at 32 px: enough positives of every finding for a held-out AUROC."""
  c = load_config("tiny")
  c.data.image_size = 32
  c.data.phantom.num_patients = 400
  c.data.phantom.scans_per_patient = 4
  idx, images = phantom.generate(c)
  return c, idx, images


def _pooled(images, size=16):
  n, h = images.shape[:2]
  k = h // size
  return images[..., 0].astype(np.float32).reshape(n, size, k, size, k).mean((2, 4)).reshape(n, -1)


def test_shapes_paths_and_labels(medium):
  c, idx, images = medium
  assert images.shape == (1600, 32, 32, 1) and images.dtype == np.uint8
  assert idx.paths[5] == "images/00000002_001.png" and idx.patient_ids[5] == "00000002"
  assert len(set(idx.paths)) == len(idx.paths)
  positives = idx.labels.sum(1)
  assert positives.min() == 1 and positives.max() == 2  # always a label; some multi-label scans
  assert np.all(idx.labels[positives == 2, 0] == 0)     # No Finding never co-occurs
  # prevalence follows the config within sampling error (binomial, 4 standard deviations)
  p = np.asarray(c.data.phantom.prevalence[1:])
  observed = idx.labels[:, 1:].mean(0)
  assert np.all(np.abs(observed - p) < 4 * np.sqrt(p * (1 - p) / len(idx)) + 0.02)
  assert 0.03 < (positives == 2).mean() < 0.15


def test_patients_are_reidentifiable(medium):
  """Nearest neighbour on standardised 16x16 pixels finds another scan of the same patient."""
  _, idx, images = medium
  x = _pooled(images)
  z = (x - x.mean(1, keepdims=True)) / x.std(1, keepdims=True)
  sims = z @ z.T
  np.fill_diagonal(sims, -np.inf)
  same = idx.patient[sims.argmax(1)] == idx.patient
  chance = (4 - 1) / (len(idx) - 1)
  assert same.mean() > 100 * chance, (same.mean(), chance)


def test_findings_are_learnable_on_held_out_patients(medium):
  """Per-finding logistic regression on pixels, trained and tested on disjoint patients."""
  _, idx, images = medium
  x = _pooled(images) / 255
  train = idx.patient < 260
  scaler = StandardScaler().fit(x[train])
  xtr, xte = scaler.transform(x[train]), scaler.transform(x[~train])
  aucs = []
  for k in range(1, 8):
    y = idx.labels[:, k]
    clf = LogisticRegression(C=0.05, max_iter=1000).fit(xtr, y[train])
    aucs.append(roc_auc_score(y[~train], clf.decision_function(xte)))
  assert min(aucs) > 0.7, np.round(aucs, 3)


def test_findings_change_the_image_where_expected():
  """Same patient and scan with and without a finding: the difference sits in the right place."""
  c = load_config("tiny")
  c.data.image_size = 32
  idx = phantom.index(c.data.phantom)
  base = np.zeros_like(idx.labels[:1])
  base[0, 0] = 1
  def draw(k):
    labels = base.copy()
    if k:
      labels[0] = 0
      labels[0, k] = 1
    one = phantom.PhantomIndex(idx.patient[:1], idx.scan[:1], labels, idx.paths[:1], idx.patient_ids[:1])
    return phantom.render(c.data.phantom, one, 32, 1)[0, ..., 0].astype(np.float32)
  normal = draw(0)
  rows = lambda diff: np.abs(diff).sum(1)
  cardio = draw(2) - normal                 # bigger heart: brighter, lower half
  assert cardio.sum() > 0 and rows(cardio)[16:].sum() > rows(cardio)[:16].sum()
  effusion = draw(5) - normal               # basal fluid: brighter, lower half
  assert effusion.sum() > 0 and rows(effusion)[16:].sum() > 2 * rows(effusion)[:16].sum()
  pneumothorax = draw(7) - normal           # apical air: darker, upper half
  assert pneumothorax.sum() < 0 and rows(pneumothorax)[:16].sum() > rows(pneumothorax)[16:].sum()
  for k in range(1, 8):
    assert np.abs(draw(k) - normal).max() >= 20, k


def test_deterministic_and_chunkable():
  c = load_config("tiny")
  idx1, a = phantom.generate(c)
  idx2, b = phantom.generate(c)
  assert np.array_equal(a, b) and np.array_equal(idx1.labels, idx2.labels)
  rows = np.array([7, 3, 100, 0])
  part = phantom.render(c.data.phantom, idx1, c.data.image_size, c.data.channels, rows)
  assert np.array_equal(part, a[rows])  # any subset draws the same pixels (chunked prepare)
  c.data.phantom.seed = 1
  _, other = phantom.generate(c)
  assert not np.array_equal(a, other)
  c.data.channels = 3
  _, rgb = phantom.generate(c)
  assert rgb.shape[-1] == 3 and np.array_equal(rgb[..., 0], rgb[..., 2])


def test_render_size_draws_small_and_interpolates():
  """data.phantom.render_size (the scale variant): bilinear weights as jax.image.resize's, the
  default and sizes >= image_size leave the drawing bit-identical, and a 64-px image drawn at 16
  averages back to the 16-px drawing (same anatomy; only the detector noise is drawn anew)."""
  import jax
  import tolerances as T
  from pso_jax.errors import UserError
  for out, size in ((8, 4), (256, 64), (10, 3)):
    want = np.asarray(jax.image.resize(np.eye(size, dtype=np.float32), (size, out), "linear",
                                       antialias=False)).T
    T.assert_close(phantom.interpolation_matrix(out, size), want, 4 * T.EPS32)
  c = load_config("tiny")
  idx = phantom.index(c.data.phantom)
  rows = np.arange(24)
  base = phantom.render(c.data.phantom, idx, 32, 1, rows)
  for same in (0, 32, 64):
    c.data.phantom.render_size = same
    T.assert_identical(phantom.render(c.data.phantom, idx, 32, 1, rows), base)
  c.data.phantom.render_size = 16
  big = phantom.render(c.data.phantom, idx, 64, 1, rows).astype(np.float32)
  c.data.phantom.render_size = 0
  small = phantom.render(c.data.phantom, idx, 16, 1, rows).astype(np.float32)
  pooled = big[..., 0].reshape(len(rows), 16, 4, 16, 4).mean((2, 4))
  for p, s in zip(pooled, small[..., 0]):
    assert np.corrcoef(p.ravel(), s.ravel())[0, 1] > 0.9
  c.data.phantom.render_size = -1
  with pytest.raises(UserError, match="render_size"):
    phantom.render(c.data.phantom, idx, 32, 1, rows)

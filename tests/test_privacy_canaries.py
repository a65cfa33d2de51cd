"""A trained re-id embedder flags near copies of training images, shifted ones included, and names
their patient, while real images of unseen patients stay at the control's rate.

The embedder is trained here, on the demo's geometry (32 px phantom scans seen by the net at
16 px, where a 1-px shift is a half-pixel one) but on 48 training patients for 400 steps, ~25 s
on 2 cores; the suite's tiny workdir re-id (20 steps, test AUC ~0.73) is too weak for this.
Without the shift augmentation and shift-averaged embeddings both tests fail (2 of 10 shifted
canaries not singled out; 1% of shifted training images nearest another patient).
"""

import os

import numpy as np
import pytest

from conftest import load_config
from pso_jax.privacy import audit as audit_lib, reid_training as reid_train
from pso_jax.privacy import canaries as canaries_lib, reid
from pso_jax.data import phantom

N_PATIENTS = 80
STEPS = 400


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  config = load_config("demo")
  config.data.phantom.num_patients = N_PATIENTS
  config.reid.steps = STEPS
  config.reid.bootstrap = 50
  index, images = phantom.generate(config)
  group = index.patient % 5  # patient-disjoint: 3/5 train, 1/5 val (tau), 1/5 test
  pick = lambda mask: {"image": images[mask], "patient_id": index.patient_ids[mask]}
  splits = {"train": pick(group < 3), "val": pick(group == 3), "test": pick(group == 4)}
  workdir = str(tmp_path_factory.mktemp("reid_canaries"))
  result = reid_train.train_and_write(config, splits, os.path.join(workdir, reid.SUBDIR))
  model = reid.load_reid(workdir)
  return config, splits, result, model


def test_shifted_canaries_flagged_with_their_patient(trained, tmp_path):
  """Planted copies in a set of real images of unseen patients: every shifted copy is flagged
  (re-identified, isolated, singled out) with its source patient; every copy of any kind has its
  source patient nearest; the real images are flagged no more often than the control's bound.
  (A copy of any kind can miss isolation when its source image itself matches another training
  patient at tau, as config.audit.chance_match_rate lets ~1% of training images do.)"""
  config, splits, result, model = trained
  assert result["auc"] >= 0.95
  assert result["embed_shifts"] == model.embed_shifts == config.reid.embed_shifts == 1
  train, unseen = splits["train"], splits["val"]
  a = config.audit
  audited, planted = canaries_lib.plant(unseen["image"], train["image"], train["patient_id"], 40,
                                        seed=3, noise=a.canary_noise, shift=a.canary_shift,
                                        contrast=a.canary_contrast)
  res = audit_lib.audit_images(config, str(tmp_path), audited, embedder=model, canaries=planted,
                               train=train, holdout=splits["test"])
  c = res["canaries"]
  assert c["by_kind"]["shift"] == {"n": 10, "named": 10, "singled_out": 10}  # 8 singled out before
  ev = res["evidence"]
  for pos, patient, kind in zip(planted.position, planted.patient, planted.kind):
    assert ev[pos]["nearest_patient"] == patient
    if kind == "shift":
      assert ev[pos]["matched_patients"] == [patient] and ev[pos]["similarity"] >= res["meta"]["tau"]
  real = np.setdiff1d(np.arange(len(audited)), planted.position)
  flagged_real = sum(ev[i]["singles_out"] for i in real)
  assert flagged_real / len(real) <= res["summary"]["control"]["high"]


def test_shifted_training_images_stay_nearest_their_own(trained):
  """Every training image rolled by (+-1, +-1) px, as the shift canaries are: the nearest training
  image is one of its patient's, at a similarity above the re-id threshold."""
  _, splits, result, model = trained
  x, patients = splits["train"]["image"], splits["train"]["patient_id"]
  rng = np.random.default_rng(0)
  d = rng.choice([-1, 1], size=(len(x), 2))
  shifted = np.stack([np.roll(im, tuple(dd), axis=(0, 1)) for im, dd in zip(x, d)])
  emb = model.embed(x)
  sims = model.embed(shifted) @ emb.T
  own = sims[np.arange(len(x)), np.arange(len(x))]
  named = patients[np.argmax(sims, axis=1)] == patients
  assert named.all()
  assert (own >= result["tau"]).mean() >= 0.98  # 0.958 without the shift augmentation

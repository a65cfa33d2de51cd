"""The audit on phantom data: canaries are flagged with their patient, real unseen images are not;
bad inputs are clear errors; the stage writes its report."""

import copy
import json
import os

import numpy as np
import pytest

import tolerances as T
from conftest import clone_workdir, load_config
from pso_jax import stages
from pso_jax.privacy import audit as audit_lib
from pso_jax.privacy import canaries as canaries_lib
from pso_jax.data import release as synthetic_set
from pso_jax.data import phantom
from pso_jax.errors import UserError
from pso_jax.report import html


class FourierEmbedder:
  """A fixed embedding: normalised |FFT| of the mean-free image. It ignores circular shifts and is
  near-blind to noise and contrast, so copies of an image stay closer to it than any other scan."""
  tau = 0.99

  def embed(self, images):
    x = images[..., 0].astype(np.float64)
    x -= x.mean(axis=(1, 2), keepdims=True)
    f = np.abs(np.fft.rfft2(x)).reshape(len(x), -1)
    return (f / np.linalg.norm(f, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def phantom_sets():
  config = load_config("tiny")
  config.data.phantom.num_patients = 90
  index, images = phantom.generate(config)
  group = index.patient % 3  # train / holdout / unseen patients
  pick = lambda g: {"image": images[group == g], "patient_id": index.patient_ids[group == g]}
  return config, pick(0), pick(1), pick(2)


def test_canaries_flagged_and_named_unseen_real_not(phantom_sets, tmp_path):
  config, train, holdout, unseen = phantom_sets
  config = copy.deepcopy(config)
  config.audit.top_k = 3
  audited, planted = canaries_lib.plant(unseen["image"], train["image"], train["patient_id"], 12,
                                        seed=1, noise=4.0, shift=1, contrast=1.15)
  assert sorted(set(planted.kind)) == sorted(canaries_lib.KINDS)
  result = audit_lib.audit_images(config, str(tmp_path), audited, embedder=FourierEmbedder(),
                                  canaries=planted, train=train, holdout=holdout)
  c = result["canaries"]
  assert c["all_flagged"] and c["named"] == 12 and c["singled_out"] == 12
  assert all(v["n"] == 3 and v["named"] == v["singled_out"] == 3 for v in c["by_kind"].values())
  ev = result["evidence"]
  flagged = {e["index"] for e in ev if e["singles_out"]}
  assert flagged == set(planted.position.tolist())
  for pos, pat, src in zip(planted.position, planted.patient, planted.train_index):
    assert ev[pos]["nearest_patient"] == pat and ev[pos]["matched_patients"] == [pat]
  s = result["summary"]
  assert s["attack"]["successes"] == 12 and s["control"]["successes"] == 0
  assert s["verdict"] == "fail"  # a release that contains copies must fail
  # independent check of the attack rate from the embeddings
  e = FourierEmbedder()
  sims = e.embed(audited).astype(np.float64) @ e.embed(train["image"]).astype(np.float64).T
  assert s["attack"]["value"] == pytest.approx(np.mean(
      [len(set(train["patient_id"][row >= e.tau])) == 1 for row in sims]))


def test_control_is_not_flagged_without_copies(phantom_sets, tmp_path):
  config, train, holdout, unseen = phantom_sets
  result = audit_lib.audit_images(config, str(tmp_path), unseen["image"],
                                  embedder=FourierEmbedder(), train=train, holdout=holdout)
  s = result["summary"]
  assert s["attack"]["successes"] == 0 and s["verdict"] == "pass"
  # the control is a holdout sample of the audited set's size, so no size warning
  assert result["meta"]["n_control"] == len(unseen["image"]) == len(holdout["image"])
  assert not any("control has" in w for w in s["warnings"])


def test_smaller_control_is_named_in_the_warnings(phantom_sets):
  config, train, holdout, unseen = phantom_sets
  e = FourierEmbedder()
  audited = e.embed(np.concatenate([unseen["image"], unseen["image"][:7]]))
  result = audit_lib.audit_embeddings(config, audited, e.embed(train["image"]),
                                      train["patient_id"], e.embed(holdout["image"]),
                                      holdout["patient_id"], e.tau)
  n_hold = len(holdout["image"])
  assert result["meta"]["n_control"] == n_hold == len(audited) - 7
  assert result["summary"]["control"]["n"] == n_hold
  assert any(f"control has {n_hold} holdout images, fewer than the {len(audited)} audited" in w
             for w in result["summary"]["warnings"])


def test_bad_inputs(phantom_sets):
  config, train, holdout, _ = phantom_sets
  e = FourierEmbedder()
  a, t, h = (e.embed(x["image"]) for x in (train, train, holdout))
  tp, hp = train["patient_id"], holdout["patient_id"]
  run = lambda *args, tau=0.99: audit_lib.audit_embeddings(config, *args, tau)
  with pytest.raises(UserError, match="shares .* patients with training"):
    run(a, t, tp, t, tp)
  with pytest.raises(UserError, match="outside the similarity range"):
    run(a, t, tp, h, hp, tau=1.5)
  with pytest.raises(UserError, match="dimension"):
    run(a[:, :5], t, tp, h, hp)
  bad = a.copy()
  bad[2, 0] = np.inf
  with pytest.raises(UserError, match="NaN/Inf"):
    run(bad, t, tp, h, hp)
  with pytest.raises(UserError, match="empty"):
    run(a[:0], t, tp, h, hp)
  missing = tp.copy()
  missing[4] = " "
  with pytest.raises(UserError, match="no patient id"):
    run(a, t, missing, h, hp)
  with pytest.raises(UserError, match="patient ids for"):
    run(a, t, tp[:-1], h, hp)


def _write_released(workdir, images, paths, source_index):
  """A released set in the select stage's on-disk format (`data.release`)."""
  writer, src = synthetic_set.ReleaseWriter(workdir), [int(s) for s in source_index]
  for img, s in zip(images, src):
    writer.save(s, False, img)
  writer.write_lists([(s, False) for s in src], dict(zip(src, paths)), {s: [1] + [0] * 7 for s in src})
  n, root = len(src), os.path.join(workdir, synthetic_set.SUBDIR)
  summary = dict(image_shape=list(images.shape[1:]), released=n, released_primary=n,
                 released_second=0, train_images=n, candidates=n, tau=0.9, skipped_images=0,
                 first_round_rejection_rate=0.0, rejection_rate=0.0)
  writer.write_card(synthetic_set.selection_card(load_config("tiny"), summary))
  json.dump(summary, open(os.path.join(root, "summary.json"), "w"))
  open(os.path.join(root, "COMPLETE"), "w").write("ok\n")


def test_stage_with_trained_reid_and_canaries(tiny_trained_workdir, tmp_path):
  from pso_jax.data import dataset
  config, trained = tiny_trained_workdir
  config = copy.deepcopy(config)
  config.audit.canaries = 4
  wd = clone_workdir(trained, tmp_path / "run")  # the suite's trained re-id, copied to write into
  val = dataset.load_arrays(wd, "val", keys=("image", "path"))
  n_train = len(dataset.load_split(wd, "train"))
  src = np.arange(len(val["image"])) % n_train
  _write_released(wd, val["image"], [p.replace(".png", "_syn.png") for p in val["path"]], src)
  summary = stages.get_stage("audit")(config, wd)
  out = os.path.join(wd, "audit")
  assert os.path.exists(os.path.join(out, "COMPLETE"))
  saved = json.load(open(os.path.join(out, "audit.json")))
  assert saved["meta"]["n_audited"] == len(val["image"]) + 4
  assert set(saved["attackers"]) == set(config.audit.attackers) | {"self_check"}
  # the self-check is selection's model at its tau; the attackers have their own
  own = saved["attackers"]["self_check"]["meta"]
  reid_tau = json.load(open(os.path.join(wd, "reid", "reid.json")))["tau"]
  assert own["tau_given"] == pytest.approx(reid_tau) and not own["independent"]
  assert own["tau"] >= own["tau_given"]  # 1-vs-N calibration only raises it
  assert summary["memorisation_1to1"]["n"] == len(val["image"]) + 4
  assert set(summary["attackers"]) == set(config.audit.attackers)
  assert {t["attacker"] for t in summary["tests"]} == set(config.audit.attackers)
  rows = saved["attackers"]["self_check"]["canaries"]["rows"]
  exact = [r for r in rows if r["kind"] == "exact"]
  assert exact and all(r["named"] and r["similarity"] > 0.999 for r in exact)
  for name in saved["attackers"]:  # an exact copy is at similarity 1 in every space
    exact = [r for r in saved["attackers"][name]["canaries"]["rows"] if r["kind"] == "exact"]
    assert all(r["similarity"] > 0.999 for r in exact), name
  names = [e["name"] for e in saved["attackers"]["pixels"]["evidence"]]
  assert sum(n.startswith("canary:") for n in names) == 4
  assert summary == saved["summary"]
  page = open(os.path.join(out, "audit.html")).read()
  refs = html.referenced_files(page)
  assert len(refs) == 3 + len(saved["attackers"])  # the figures and one gallery per attacker
  assert all(os.path.getsize(os.path.join(out, r)) > 1000 for r in refs)
  card = json.load(open(os.path.join(wd, "release", "card.json")))  # the verdict goes on the card
  assert card["audit"]["verdict"] == summary["verdict"] and card["audit"]["planted_canaries"] == 4
  assert stages.get_stage("audit")(config, wd) == summary  # complete: returns at once


def test_chance_match_calibration_raises_tau(phantom_sets):
  config, train, holdout, unseen = phantom_sets
  config = copy.deepcopy(config)
  config.audit.chance_match_rate = 0.05
  e = FourierEmbedder()
  emb = {k: e.embed(v["image"]) for k, v in (("train", train), ("holdout", holdout),
                                             ("unseen", unseen))}
  result = audit_lib.audit_embeddings(config, emb["unseen"], emb["train"], train["patient_id"],
                                      emb["holdout"], holdout["patient_id"], 0.5)
  tau = result["meta"]["tau"]
  other = result["arrays"]["train_other_nn"]
  assert result["meta"]["tau_given"] == 0.5 and tau > 0.9
  assert np.mean(other >= tau) <= 0.05 < np.mean(other >= tau - 0.01)
  # brute-force check of the train -> other-patient nearest similarities
  s = emb["train"].astype(np.float64) @ emb["train"].astype(np.float64).T
  s[train["patient_id"][:, None] == train["patient_id"][None]] = -np.inf
  T.assert_close(np.sort(other), np.sort(s.max(1)), T.reduction_rtol(emb["train"].shape[1]))


def test_a_canary_is_flagged_when_named_even_if_it_matches_two_patients():
  """Flag = linked to a training patient with its own patient nearest; isolation is not needed (a
  copy of a patient who chance-matches another matches both), a wrong nearest patient is a miss."""
  def evidence(nearest, matched, singles_out):
    return {"nearest_patient": nearest, "reidentified": matched > 0, "singles_out": singles_out,
            "n_patients_matched": matched, "similarity": 0.99}
  planted = canaries_lib.Canaries(position=np.array([0, 1]), train_index=np.array([5, 6]),
                                  patient=np.array(["p1", "p2"]), kind=np.array(["exact", "shift"]))
  two_patients = {"evidence": [evidence("p1", 1, True), evidence("p2", 2, False)]}
  c = audit_lib.check_canaries(two_patients, planted)
  assert c["all_flagged"] and c["named"] == 2 and c["singled_out"] == 1
  assert c["by_kind"]["shift"] == {"n": 1, "named": 1, "singled_out": 0}
  wrong = {"evidence": [evidence("p1", 1, True), evidence("p9", 1, True)]}
  c = audit_lib.check_canaries(wrong, planted)
  assert not c["all_flagged"] and c["named"] == 1
  unlinked = {"evidence": [evidence("p1", 1, True), evidence("p2", 0, False)]}
  assert not audit_lib.check_canaries(unlinked, planted)["all_flagged"]

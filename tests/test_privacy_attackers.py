"""The independent attackers and the one verdict: the attacker split carved at prepare time, each
attacker's embedding and tau against independent computations, the refusals (overlapping patients,
another image size, embeddings that are not unit-norm, NaN), Holm's correction against a
step-down loop, and the verdict on phantom releases: real unseen images pass, the same with 10%
near copies of training images fail."""

import copy
import json
import os

import numpy as np
import pytest

from conftest import load_config
from pso_jax.data import filelists, phantom
from pso_jax.errors import UserError
from pso_jax.privacy import attackers, canaries, release_audit, reid, verdict


# ----------------------------------------------------------------------------- the attacker split

def test_attacker_split_is_the_last_patients_and_leaves_the_others_split_as_before():
  ids = np.array([f"p{i:03d}" for i in range(50) for _ in range(2)])
  without = filelists.split_patients(ids[:80], (0.8, 0.1, 0.1), 42)
  with_attacker = filelists.split_patients(ids, (0.8, 0.1, 0.1), 42, attacker_patients=10)
  assert with_attacker[filelists.ATTACKER].tolist() == [f"p{i:03d}" for i in range(40, 50)]
  for s in filelists.SPLITS:
    assert np.array_equal(with_attacker[s], without[s])
  with pytest.raises(UserError, match="attacker_patients=48 must be between 0 and 47"):
    filelists.split_patients(ids, (0.8, 0.1, 0.1), 42, attacker_patients=48)


@pytest.mark.parametrize("variant,grow", [("demo", 0), ("tiny", 8)])
def test_grown_phantom_keeps_its_splits(variant, grow):
  """A phantom grown by the attacker split (the demo's is) keeps its train/val/test."""
  config = load_config(variant)
  config.data.phantom.num_patients += grow
  config.data.attacker_patients += grow
  n_attack = int(config.data.attacker_patients)
  assert n_attack > 0
  def rows(c):
    idx = phantom.index(c.data.phantom)
    table = filelists.Table(idx.paths, idx.labels, idx.patient_ids)
    return table, filelists.split_rows(table, c.data)[0]
  table, got = rows(config)
  before = copy.deepcopy(config)
  before.data.phantom.num_patients -= n_attack
  before.data.attacker_patients = 0
  old_table, old = rows(before)
  for s in filelists.SPLITS:
    assert table.paths[got[s]].tolist() == old_table.paths[old[s]].tolist()
  attack = set(table.patient_ids[got[filelists.ATTACKER]])
  assert len(attack) == n_attack and not old[filelists.ATTACKER].size
  assert all(not attack & set(table.patient_ids[got[s]]) for s in filelists.SPLITS)
  assert np.all(table.labels[got[filelists.ATTACKER]].sum(1) == 1)  # trained on like train


@pytest.fixture(scope="module")
def attacker_run(tmp_path_factory):
  """A tiny workdir with an attacker split, selection's re-id model, a stand-in release (real val
  images) and the audit by all three attackers."""
  from pso_jax import stages, workdir as workdir_lib
  from pso_jax.data import dataset
  from test_stages_audit import _write_released
  config = load_config("tiny")
  config.data.phantom.num_patients += 8
  config.data.attacker_patients = 8
  config.audit.attackers = ("reid", "features", "pixels")
  workdir = str(tmp_path_factory.mktemp("attacker_run"))
  workdir_lib.prepare_workdir(workdir, config)
  for mode in ("prepare", "train_reid"):
    stages.get_stage(mode)(config, workdir)
  val = dataset.load_arrays(workdir, "val", keys=("image", "path"))
  n_train = len(dataset.load_split(workdir, "train"))
  _write_released(workdir, val["image"], [p.replace(".png", "_syn.png") for p in val["path"]],
                  np.arange(len(val["image"])) % n_train)
  return config, workdir, stages.get_stage("audit")(config, workdir)


def test_prepare_writes_the_attacker_split(attacker_run):
  from pso_jax.data import dataset
  config, workdir, _ = attacker_run
  card = dataset.load_card(workdir)
  split = dataset.load_arrays(workdir, filelists.ATTACKER, ("image", "patient_id"))
  assert card["splits"][filelists.ATTACKER]["records"] == len(split["image"]) > 0
  assert card["splits"][filelists.ATTACKER]["patients"] == config.data.attacker_patients
  others = {p for s in filelists.SPLITS
            for p in dataset.load_arrays(workdir, s, ("patient_id",))["patient_id"]}
  assert not others & set(split["patient_id"])


def test_reid_attacker_is_trained_on_the_attacker_split_with_its_own_seed(attacker_run):
  from pso_jax.data import dataset
  config, workdir, summary = attacker_run
  model_dir = os.path.join(workdir, "audit", attackers.MODEL_SUBDIR)
  model = json.load(open(os.path.join(model_dir, reid.RESULT_FILE)))
  assert model["seed"] == config.audit.attacker_seed != config.seed
  assert model["data_image_shape"] == [config.data.image_size] * 2 + [config.data.channels]
  trained_on = open(os.path.join(model_dir, reid.PATIENTS_FILE)).read().split()
  split = dataset.load_arrays(workdir, filelists.ATTACKER, keys=("patient_id",))["patient_id"]
  assert sorted(trained_on) == sorted(set(split))
  assert set(summary["attackers"]) == {"reid", "features", "pixels"}
  assert {t["attacker"] for t in summary["tests"]} == {"reid", "features", "pixels"}
  assert set(summary["self_check"]) == {attackers.SELF_CHECK}
  saved = json.load(open(os.path.join(workdir, "audit", "audit.json")))
  assert saved["attackers"]["reid"]["meta"]["provenance"]["model"] == model_dir


def test_selections_own_model_as_attacker_is_refused(attacker_run, tmp_path):
  """Selection's re-id model was trained on the training patients: not an independent attacker."""
  from pso_jax import stages
  from conftest import clone_workdir
  config, workdir, _ = attacker_run
  wd = clone_workdir(workdir, tmp_path / "run")
  os.remove(os.path.join(wd, "audit", "COMPLETE"))
  config = copy.deepcopy(config)
  config.audit.attacker_model = os.path.join(wd, reid.SUBDIR)
  with pytest.raises(UserError, match=r"the attacker model in .* shares \d+ patients with the "
                                      r"training set \('0000"):
    stages.get_stage("audit")(config, wd)


# ----------------------------------------------------------------------------- refusals

def test_an_attacker_sharing_patients_is_refused_naming_them():
  train, holdout = np.array(["a", "b", "c"]), np.array(["d", "e"])
  attackers.check_independent("the attacker split", ["x", "y"], training=train, holdout=holdout)
  with pytest.raises(UserError, match=r"shares 2 patients with the holdout set \('d', 'e'\)"):
    attackers.check_independent("the attacker split", ["x", "d", "e"], training=train,
                                holdout=holdout)


def _external_model(folder, shape, patients):
  folder.mkdir()
  (folder / reid.RESULT_FILE).write_text('{"data_image_shape": %s, "tau": 0.9}' % list(shape))
  (folder / reid.PATIENTS_FILE).write_text("".join(f"{p}\n" for p in patients))
  return str(folder)


def test_an_external_attacker_model_is_checked_before_use(tmp_path):
  config = load_config("tiny")
  train = {"image": np.zeros((4, 16, 16, 1), np.uint8), "patient_id": np.array(["a"] * 4)}
  holdout = {"image": np.zeros((2, 16, 16, 1), np.uint8), "patient_id": np.array(["h", "h"])}
  config.audit.attacker_model = _external_model(tmp_path / "other_size", (32, 32, 1), ["z"])
  with pytest.raises(UserError, match=r"trained on images of shape \[32, 32, 1\], this dataset's "
                                      r"are \[16, 16, 1\]"):
    attackers._reid_attacker(config, str(tmp_path), str(tmp_path), train, holdout, holdout)
  config.audit.attacker_model = _external_model(tmp_path / "holdout_patient", (16, 16, 1),
                                                ["z", "h"])
  with pytest.raises(UserError, match=r"shares 1 patients with the holdout set \('h'\)"):
    attackers._reid_attacker(config, str(tmp_path), str(tmp_path), train, holdout, holdout)


def test_bad_embeddings_are_refused():
  good = np.eye(3, dtype=np.float32)
  assert attackers.check_unit_norm("pixels", good).dtype == np.float32
  with pytest.raises(UserError, match="pixels attacker's embeddings are not unit-norm: 1 of 3"):
    attackers.check_unit_norm("pixels", good * np.array([[1], [1], [2]], np.float32))
  nan = good.copy()
  nan[1, 0] = np.nan
  with pytest.raises(UserError, match="first: row 1, norm nan"):
    attackers.check_unit_norm("features", nan)
  flat = np.full((2, 16, 16, 1), 7, np.uint8)
  with pytest.raises(UserError, match="without any contrast"):
    attackers.PixelEmbedder(8).embed(flat)


@pytest.mark.parametrize("field,value,needle", [
    ("audit.attackers", ("pixels", "nope"), "must name each of its attackers once"),
    ("audit.attackers", (), "must name each of its attackers once"),
    ("audit.attackers", ("pixels", "pixels"), "must name each of its attackers once"),
    ("data.features.kind", "file", "comes from an external extractor"),
    ("audit.pixel_size", 5, "pixel_size=5 must be a positive divisor"),
    ("audit.test_size", 1.5, "test_size=1.5 is the verdict's false-alarm rate"),
    ("audit.holdout_split", "attacker", "must be val or test"),
])
def test_bad_attacker_settings_are_refused(field, value, needle):
  config = load_config("tiny")
  section, name = field.rsplit(".", 1)
  node = config
  for part in section.split("."):
    node = node[part]
  node[name] = value
  with pytest.raises(UserError, match=needle):
    attackers.check_config(config)


def test_reid_attacker_without_an_attacker_split_is_refused(tmp_path):
  from pso_jax import workdir as workdir_lib
  from pso_jax.stages import prepare
  config = load_config("tiny")
  config.data.attacker_patients = 0
  workdir_lib.prepare_workdir(str(tmp_path), config)
  prepare.run(config, str(tmp_path))
  with pytest.raises(UserError, match="no attacker split: prepare a new workdir with "
                                      "--config.data.attacker_patients=N"):
    attackers.attacker_split(str(tmp_path))


# ----------------------------------------------------------------------------- embeddings, tau

def test_pixel_and_feature_spaces_match_independent_computations(tiny_trained_workdir):
  from pso_jax.data import dataset
  config, workdir = tiny_trained_workdir
  train = dataset.load_arrays(workdir, "train", ("image",))["image"]
  test = dataset.load_arrays(workdir, "test", ("image",))["image"]
  # features: what prepare stored for the real images
  emb = attackers.FeatureEmbedder(config, train)
  np.testing.assert_allclose(emb.embed(test), dataset.load_features(workdir, "test"), atol=1e-5)
  # pixels: block means by loop, mean-free, unit-norm
  size, img = 8, test[3, ..., 0].astype(np.float64)
  k = img.shape[0] // size
  pooled = np.array([[img[i * k:(i + 1) * k, j * k:(j + 1) * k].mean() for j in range(size)]
                     for i in range(size)]).ravel()
  pooled -= pooled.mean()
  np.testing.assert_allclose(attackers.PixelEmbedder(size).embed(test[3:4])[0],
                             pooled / np.linalg.norm(pooled), atol=1e-6)


def test_tau_is_calibrated_on_val_pairs_at_the_target_fpr():
  config = load_config("tiny")
  config.reid.target_fpr = 0.05
  index, images = phantom.generate(config)
  val = {"image": images[:60], "patient_id": index.patient_ids[:60]}
  tau, source = attackers.calibrate(config, attackers.PixelEmbedder(8), val)
  e = attackers.PixelEmbedder(8).embed(val["image"]).astype(np.float64)
  s = e @ e.T
  different = val["patient_id"][:, None] != val["patient_id"][None]
  neg = s[np.triu(different, 1)]
  assert np.mean(neg >= tau) <= 0.05 < np.mean(neg >= np.max(neg[neg < tau]))
  assert f"{len(neg)} different-patient val pairs" in source


# ----------------------------------------------------------------------------- the verdict

def _holm_step_down(p, alpha):
  """Holm (1979) as written: sort, compare p_(i) with alpha / (m - i), stop at the first miss."""
  order = np.argsort(p)
  rejected = np.zeros(len(p), bool)
  for i, j in enumerate(order):
    if p[j] > alpha / (len(p) - i):
      break
    rejected[j] = True
  return rejected


def test_holm_matches_the_step_down_procedure():
  rng = np.random.default_rng(0)
  for _ in range(200):
    p = rng.uniform(0, 0.1, rng.integers(1, 9)) ** rng.uniform(0.5, 3)
    for alpha in (0.01, 0.05):
      assert np.array_equal(verdict.holm(p) <= alpha, _holm_step_down(p, alpha))


def test_verdict_names_the_attacker_that_decided_it():
  d = verdict.decide({"reid": {"pso": 0.2, "dcr": 0.03}, "pixels": {"pso": 0.004, "dcr": 0.5}},
                     0.05)
  assert d["verdict"] == "fail" and d["decided_by"]["attacker"] == "pixels"
  assert d["decided_by"]["p_holm"] == pytest.approx(0.016)
  assert [t["rejected"] for t in d["tests"]] == [False, False, True, False]
  assert verdict.decide({"reid": {"pso": 0.02, "dcr": 0.03}}, 0.01)["verdict"] == "pass"


@pytest.fixture(scope="module")
def phantom_release():
  """Training, holdout and unseen patients of a small phantom, and the pixels and features
  attackers calibrated on the holdout's pairs (val stands in)."""
  config = load_config("tiny")
  config.data.phantom.num_patients = 120
  config.audit.attackers = ("features", "pixels")
  index, images = phantom.generate(config)
  keep = filelists.keep_rows(index.labels, "train")
  group = index.patient % 3
  pick = lambda g: {"image": images[(group == g) & keep],
                    "patient_id": index.patient_ids[(group == g) & keep]}
  train, holdout, unseen = pick(0), pick(1), pick(2)
  found = []
  for name, e in (("features", attackers.FeatureEmbedder(config, train["image"])),
                  ("pixels", attackers.PixelEmbedder(config.audit.pixel_size))):
    tau, source = attackers.calibrate(config, e, holdout)
    found.append(attackers.Attacker(name, e, tau, source, {}))
  spaces = release_audit.spaces(config, found, train, holdout, len(unseen["image"]))
  return config, spaces, train, unseen


def test_dcr_is_judged_against_the_control_not_against_one_half():
  """Training holds three times the holdout's images: any unseen image is nearer training about
  3/4 of the time. The binomial test against 0.5 fires on such a release that does not leak; the
  verdict, which compares with the control, does not."""
  config = load_config("tiny")
  rng = np.random.default_rng(0)
  noise = lambda n: rng.integers(0, 256, (n, 4, 4, 1), dtype=np.uint8)
  train = {"image": noise(240), "patient_id": np.array([f"t{i}" for i in range(240)])}
  holdout = {"image": noise(80), "patient_id": np.array([f"h{i}" for i in range(80)])}
  released = noise(150)
  pixels = attackers.Attacker("pixels", attackers.PixelEmbedder(4), 0.99, "given", {})
  spaces = release_audit.spaces(config, [pixels], train, holdout, len(released))
  result = release_audit.audit_release(config, spaces, released)
  d = result["attackers"]["pixels"]["dcr"]
  assert d["share"] > 0.65 and d["control_share"] > 0.65 and d["binomial_p"] < 1e-4
  assert d["p"] > 0.05 and result["summary"]["verdict"] == "pass"


def test_null_release_passes_and_near_copies_fail(phantom_release):
  config, spaces, train, unseen = phantom_release
  clusters = unseen["patient_id"]
  null = release_audit.audit_release(config, spaces, unseen["image"], clusters=clusters)
  assert null["summary"]["verdict"] == "pass" and null["summary"]["decided_by"] is None
  rng = np.random.default_rng(1)
  leaky, leaky_clusters = unseen["image"].copy(), clusters.astype(object)
  where = rng.choice(len(leaky), len(leaky) // 10, replace=False)
  leaky[where], src = canaries.leaking_copies(train["image"], len(where), rng, noise=4.0,
                                              contrast=1.15)
  leaky_clusters[where] = train["patient_id"][src]
  failed = release_audit.audit_release(config, spaces, leaky, clusters=leaky_clusters.astype(str))
  s = failed["summary"]
  assert s["verdict"] == "fail" and s["decided_by"]["attacker"] in ("features", "pixels")
  assert s["headline_attacker"] == s["decided_by"]["attacker"]
  # the copies are what single out (a real image may too, by chance, as in the control)
  flagged = {e["index"] for e in failed["attackers"][s["headline_attacker"]]["evidence"]
             if e["singles_out"]}
  copies = set(where.tolist())
  assert len(flagged & copies) >= len(copies) / 2 and len(flagged - copies) <= 2

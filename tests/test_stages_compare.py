"""--mode=compare: every method of the paper's comparison trained, released with and without
selection, audited and evaluated on `tiny`, with the shared stages run once, compare.json
consistent with each method's own files, and a killed comparison resumed where it stopped."""

import importlib
import json
import os

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from conftest import load_config
from pso_jax import main, stages, workdir as workdir_lib
from pso_jax.data import dataset, release
from pso_jax.errors import UserError
from pso_jax.evaluate import classifier as classifier_lib
from pso_jax.evaluate import synthetic_utility
from pso_jax.privacy import reid
from pso_jax.report import compare_page, comparison, html
from pso_jax.stages import checks
from tolerances import reduction_rtol

ALL = ("edm2_uncond", "edm2_class", "diadm", "diadm_autoguidance", "ours")
SAME_NUMBERS = [c for c in comparison.COLUMNS if c not in ("timings", "seconds", "workdir")]


def _config(**compare):
  c = load_config("tiny")
  c.mesh.data = 1                    # one device: compiles and runs fastest on the suite's 2 cores
  c.select.chunk_images = 128        # one chunk per release: fewer, larger sampler calls
  c.data.attacker_patients = 6       # the audit's reid attacker, trained once in shared/
  c.audit.attackers = ("reid", "pixels")
  c.audit.tau = 0.96                 # tiny's calibrated tau (~0.99) links no sample: this links some
  c.compare.guidance = ()
  for k, v in compare.items():
    c.compare[k] = v
  return c


def _run_compare(config, workdir) -> dict:
  """What `python -m pso_jax.main ... --mode=compare` does (checks, workdir, run_modes)."""
  modes = main.modes_of("compare")
  checks.check_config(config, modes)
  workdir_lib.check_workdir(str(workdir), config)
  return main.run_modes(config, str(workdir), modes)["results"]["compare"]


def _timings(workdir) -> list:
  path = os.path.join(workdir, "timings.jsonl")
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(line)["stage"] for line in f if line.strip()]


def _read(workdir, mode):
  return stages.done(workdir, mode)


@pytest.fixture(scope="module")
def full(tmp_path_factory):
  """Every method, selected releases only (the unselected ones: `resumed`)."""
  workdir = tmp_path_factory.mktemp("compare_full")
  return _run_compare(_config(methods=ALL, unselected=False), workdir), str(workdir)


RESUMED = dict(methods=("edm2_uncond", "ours"), guidance=(1.0, 1.5))


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
  """Two methods with unselected releases and ours' guidance sweep, killed in ours' evaluate
  (after edm2_uncond was done, and ours' train, select and audit), then rerun. Returns (result of
  the rerun, workdir, the markers' mtimes before the rerun, the stages that each rerun ran)."""
  workdir = str(tmp_path_factory.mktemp("compare_resumed"))
  config = _config(**RESUMED)
  evaluate = importlib.import_module("pso_jax.stages.evaluate")
  real_run = evaluate.run

  def killed(config, wd, **kw):
    if wd.endswith(os.path.join("methods", "ours")):
      raise RuntimeError("killed")
    return real_run(config, wd, **kw)
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(evaluate, "run", killed)
    with pytest.raises(RuntimeError, match="killed"):
      _run_compare(config, workdir)
  markers = [os.path.join(workdir, "methods", "edm2_uncond", d, stages.COMPLETE)
             for d in ("diffusion", "synthetic", "audit", "evaluate")]
  markers += [os.path.join(workdir, "methods", "ours", d, stages.COMPLETE)
              for d in ("diffusion", "synthetic", "audit")]
  before = {p: os.stat(p).st_mtime_ns for p in markers}
  return _run_compare(config, workdir), workdir, before


# ----------------------------------------------------------------------------- without training

def test_compare_is_a_mode_outside_the_pipeline():
  assert "compare" in stages.MODES and "compare" not in stages.PIPELINE
  assert main.modes_of("compare") == ["compare"]
  assert [m.name for m in comparison.METHODS] == list(ALL) == list(load_config("").compare.methods)


@pytest.mark.parametrize("compare,needle", [
    ({"methods": ("diadm", "ours")}, "not 'edm2_uncond', whose model guides it"),
    ({"methods": ("ours", "nope")}, "'nope' unknown"),
    ({"guidance": (1.0, 1.5), "sweep_method": "edm2_uncond", "methods": ALL},
     "sweep of 'edm2_uncond' at g = 1.5: config.sample.guide='null_cond'"),
    ({"guidance": (0.0,)}, "distinct positive guidance values"),
    ({"autoguidance_step": 4, "methods": ALL}, "'diadm_autoguidance'.*guide_step=4 is not an "
                                              "earlier checkpoint"),
], ids=["guide missing", "unknown method", "sweep needs a guide", "bad guidance", "no checkpoint"])
def test_methods_that_cannot_work_are_refused_before_training(tmp_path, compare, needle):
  config = _config(**compare)
  with pytest.raises(UserError, match=needle):
    _run_compare(config, tmp_path)
  assert os.listdir(tmp_path) == []  # refused before anything was written


def test_a_method_may_not_change_what_the_shared_stages_read(monkeypatch):
  bad = comparison.Method("bad", "bad", (("classifier.steps", 3),), "changes a shared stage")
  monkeypatch.setattr(comparison, "_BY_NAME", {**comparison._BY_NAME, "bad": bad})
  with pytest.raises(UserError, match="'bad' changes config sections the shared stages read "
                                      r"\(classifier\)"):
    checks.check_config(_config(methods=("bad",)), ["compare"])


def test_autoguidance_takes_the_first_checkpoint_after_a_tenth_of_training():
  config = load_config("tiny")       # 6 steps, a checkpoint every 3
  assert comparison.autoguidance_step(config) == 3
  config.train.total_images, config.train.checkpoint_images = 8 * 600, 8 * 25
  assert comparison.autoguidance_step(config) == 75   # 60 -> the next multiple of 25
  config.compare.autoguidance_step = 50
  assert comparison.autoguidance_step(config) == 50


# ----------------------------------------------------------------------------- every method on tiny

def test_every_method_and_release_is_a_row_with_every_column(full, resumed):
  result, workdir = full
  assert [(r["method"], r["release"]) for r in result["rows"]] == [(m, "selected") for m in ALL]
  assert [(r["method"], r["release"]) for r in resumed[0]["rows"]] == [
      (m, kind) for m in RESUMED["methods"] for kind in comparison.RELEASES]
  assert result["columns"] == list(comparison.COLUMNS)
  findings = list(load_config("tiny").data.findings)
  for r in result["rows"] + resumed[0]["rows"]:
    assert list(r) == list(comparison.COLUMNS)
    assert 0 <= r["mean_auroc"] <= 1 and r["mean_auroc_ci"][0] <= r["mean_auroc"] <= r["mean_auroc_ci"][1]
    assert r["auroc_gap"] == pytest.approx(r["mean_auroc"] - r["real_mean_auroc"], abs=1e-12)
    assert list(r["per_class"]) == findings
    assert r["frechet_distance"] >= 0 and 0 <= r["image_retrieval_score"] <= 1
    assert 0 <= r["first_round_rejection_rate"] <= 1 and 0 <= r["memorisation_1to1"] <= 1
    assert r["audit_verdict"] in ("pass", "fail") and r["seconds"] > 0
  # one real classifier for every row: the same real AUROC and CI (the paired bootstrap's seeds)
  assert len({json.dumps([r["real_mean_auroc"], r["real_mean_auroc_ci"]]) for r in result["rows"]}) == 1
  page = open(os.path.join(workdir, comparison.PAGE_FILE), encoding="utf-8").read()
  for target in html.referenced_files(page):
    assert os.path.exists(os.path.join(workdir, target)), target
  for r in result["rows"]:
    assert html.esc(r["title"]) in page


@pytest.mark.parametrize("run", ["full", "resumed"])
def test_rows_are_each_workdirs_own_results(run, request):
  result, workdir = request.getfixturevalue(run)[:2]
  for r in result["rows"]:
    wd = os.path.join(workdir, r["workdir"])
    ev, sel, audit = _read(wd, "evaluate"), _read(wd, "select"), _read(wd, "audit")
    util = ev["utility"]
    assert r["mean_auroc"] == util["models"]["synthetic"]["mean_auroc"]
    assert r["mean_auroc_ci"] == util["models"]["synthetic"]["mean_auroc_ci"]
    assert r["auroc_gap"] == util["difference"]["value"] and r["auroc_gap_ci"] == util["difference"]["ci"]
    defined = lambda v: v if isinstance(v, float) else None  # "undefined": no positives
    for f, v in r["per_class"].items():
      syn, real = (util["models"][m]["per_class"][f]["auroc"] for m in ("synthetic", "real"))
      assert (v["auroc"], v["real"]) == ((defined(syn), defined(real)) if defined(syn) and
                                         defined(real) else (None, None))
    assert r["first_round_rejection_rate"] == sel["first_round_rejection_rate"]
    assert r["memorisation_1to1"] == sel["one_to_one_memorisation_rate"]
    assert r["audit_verdict"] == audit["summary"]["verdict"] and r["released"] == sel["released"]
    stored = [json.loads(x) for x in open(os.path.join(wd, "timings.jsonl"))]
    assert r["seconds"] == pytest.approx(sum(x["seconds"] for x in stored))


def test_the_tradeoff_figure_plots_the_audits_dcr_excess_not_selections_rate(full):
  """Leakage in the figure is the independent audit's DCR excess of each release, its verdict in
  the label; a release without a DCR test is left out (x None), not drawn at 0."""
  rows = full[0]["rows"]
  points = compare_page.tradeoff_points(rows)
  assert len(points) == len(rows)
  for (label, x, y, ci, marker), r in zip(points, rows):
    assert x == pytest.approx(r["dcr_share"] - r["dcr_control_share"], abs=1e-12)
    assert y == r["mean_auroc"] and ci == r["mean_auroc_ci"]
    assert label.endswith(r["audit_verdict"]) and marker == ("o" if r["release"] == "selected" else "s")
  assert [p[1] for p in points] != [r["first_round_rejection_rate"] for r in rows]
  assert compare_page.tradeoff_points([dict(rows[0], dcr_share=None)])[0][1] is None


def test_auroc_matches_scikit_learn_on_the_synthetic_classifier(full):
  result, workdir = full
  row = next(r for r in result["rows"] if (r["method"], r["release"]) == ("ours", "selected"))
  wd = os.path.join(workdir, row["workdir"])
  test = dataset.load_arrays(wd, "test", keys=("image", "labels"))
  probs = classifier_lib.load_classifier(wd, synthetic_utility.SYNTHETIC_CLASSIFIER).predict(test["image"])
  labels = np.asarray(test["labels"]) > 0.5
  aucs = [roc_auc_score(labels[:, c], probs[:, c]) for c in range(labels.shape[1])
          if 0 < labels[:, c].sum() < len(labels)]
  assert row["mean_auroc"] == pytest.approx(np.mean(aucs), rel=reduction_rtol(len(labels)))


def test_unselected_releases_are_one_unrejected_sample_per_training_image(resumed):
  """The re-id statistics of an unselected release against numpy: every released image against
  every training image's embedding, and against its own source image."""
  result, workdir = resumed[:2]
  shared = os.path.join(workdir, comparison.SHARED)
  model = reid.load_reid(shared)
  train = dataset.load_arrays(shared, "train", keys=("image", "labels", "patient_id"))
  real = np.asarray(model.embed(train["image"]), np.float64)
  for r in (r for r in result["rows"] if r["release"] == "unselected"):
    wd = os.path.join(workdir, r["workdir"])
    released = release.load_released(wd)
    n = len(train["image"])
    assert r["released"] == n and released["source_index"].tolist() == list(range(n))
    np.testing.assert_array_equal(released["labels"], train["labels"])
    sims = np.asarray(model.embed(released["images"]), np.float64) @ real.T
    tau = float(_config().audit.tau)
    assert 0 < (sims.max(1) >= tau).mean() < 1  # a threshold that tells images apart
    assert r["first_round_rejection_rate"] == pytest.approx((sims.max(1) >= tau).mean(), abs=1 / n)
    assert r["memorisation_1to1"] == pytest.approx((np.diag(sims) >= tau).mean(), abs=1 / n)
    # image by image: the records score the released image against its own source and all others
    with open(os.path.join(wd, release.SUBDIR, "selection.jsonl"), encoding="utf-8") as f:
      records = [json.loads(line) for line in f]
    assert [x["index"] for x in records] == list(range(n))
    assert {x["outcome"] for x in records} <= {"kept", "rejected"}  # one candidate each
    np.testing.assert_allclose([x["self_sim"] for x in records], np.diag(sims), atol=1e-5)
    np.testing.assert_allclose([x["nearest_sim"] for x in records], sims.max(1), atol=1e-5)


@pytest.mark.parametrize("run", ["full", "resumed"])
def test_shared_stages_and_the_attacker_run_once_and_are_linked(run, request):
  result, workdir = request.getfixturevalue(run)[:2]
  shared = os.path.join(workdir, comparison.SHARED)
  assert sorted(_timings(shared)) == sorted(comparison.SHARED_MODES + (comparison.ATTACKER_TIMING,))
  attacker = os.path.realpath(os.path.join(shared, result["shared"]["attacker_reid"].split("/", 1)[1]))
  for r in result["rows"]:
    wd = os.path.join(workdir, r["workdir"])
    assert not set(_timings(wd)) & set(comparison.SHARED_MODES)
    for folder in comparison.LINKED:
      assert os.path.islink(os.path.join(wd, folder))
      assert os.path.realpath(os.path.join(wd, folder)) == os.path.realpath(os.path.join(shared, folder))
    audit = json.load(open(os.path.join(wd, "audit", "audit.json")))
    used = audit["attackers"]["reid"]["meta"]["provenance"]["model"]
    assert os.path.realpath(used) == attacker
  # ours: train, select, audit (the killed run), then evaluate and report (the rerun): once each
  assert _timings(os.path.join(workdir, "methods", "ours")) == list(comparison.METHOD_MODES)
  if run == "resumed":
    assert _timings(os.path.join(workdir, "unselected", "ours")) == [
        comparison.UNSELECTED_TIMING] + list(comparison.UNSELECTED_MODES)


def test_guides_are_the_unconditional_model_and_an_early_checkpoint(full):
  _, workdir = full
  method = lambda name: os.path.join(workdir, "methods", name)
  uncond = _read(method("edm2_uncond"), "select")["fingerprint"]
  assert uncond["guide"] == "none"  # unguided
  for name in ("edm2_class", "diadm"):
    config = workdir_lib.load_config(method(name))
    assert os.path.realpath(config.sample.guide_workdir) == os.path.realpath(method("edm2_uncond"))
    assert config.sample.ema_std == 0 and not config.regulariser.enabled
    # the guide's weights are the unconditional model's raw weights, as that model sampled them
    assert _read(method(name), "select")["fingerprint"]["guide_weights"] == uncond["weights"]
  ag = workdir_lib.load_config(method("diadm_autoguidance"))
  assert ag.sample.guide == "autoguidance" and ag.sample.guide_step == 3
  assert os.path.isdir(os.path.join(method("diadm_autoguidance"), "diffusion", "checkpoints", "3"))
  fp = _read(method("diadm_autoguidance"), "select")["fingerprint"]
  assert fp["guide"] == "autoguidance" and fp["guide_weights"] not in (None, fp["weights"])


# ----------------------------------------------------------------------------- resume, sweep

def test_a_killed_comparison_resumes_with_the_uninterrupted_numbers(full, resumed):
  result, workdir, before = resumed
  assert {p: os.stat(p).st_mtime_ns for p in before} == before  # nothing finished was redone
  expected = {(r["method"], r["release"]): r for r in full[0]["rows"]}
  for r in (r for r in result["rows"] if r["release"] == "selected"):
    want = expected[(r["method"], r["release"])]
    assert {c: r[c] for c in SAME_NUMBERS} == {c: want[c] for c in SAME_NUMBERS}, r["method"]


def test_the_guidance_sweep_reuses_one_model(resumed):
  result, workdir, _ = resumed
  sweep = result["sweep"]
  assert sweep["method"] == "ours" and sweep["selection"] is False
  assert [p["guidance"] for p in sweep["points"]] == [1.0, 1.5]
  for p in sweep["points"]:
    wd = os.path.join(workdir, p["workdir"])
    assert workdir_lib.load_config(wd).sample.guidance == p["guidance"]
    assert os.path.realpath(os.path.join(wd, "diffusion")) == os.path.realpath(
        os.path.join(workdir, "methods", "ours", "diffusion"))
    assert p["mean_auroc"] == _read(wd, "evaluate")["utility"]["models"]["synthetic"]["mean_auroc"]
    assert p["first_round_rejection_rate"] == _read(wd, "select")["first_round_rejection_rate"]
    assert _timings(wd) == [comparison.UNSELECTED_TIMING] + list(comparison.SWEEP_MODES)
  assert not os.path.exists(os.path.join(workdir, "sweep", "edm2_uncond"))
  assert os.path.exists(os.path.join(workdir, comparison.FIG_DIR, "guidance_sweep.png"))

"""audit_power: the audit's false-alarm rate on null releases (real images of unseen patients) and
its detection rate on leaking ones (near copies of training images), measured and written."""

import json
import os

import numpy as np
import pytest

from conftest import clone_workdir, load_config
from test_privacy_attackers import phantom_release  # noqa: F401 (a fixture)
from test_stages_audit import _write_released
from pso_jax import main, stages
from pso_jax.data import dataset
from pso_jax.privacy import power, pso
from pso_jax.report import html


def test_audit_power_follows_audit_outside_the_pipeline():
  order = [s.mode for s in stages.STAGES]
  assert order.index("audit_power") > order.index("audit")
  assert "audit" in stages.stage("audit_power").inputs
  assert "audit_power" not in stages.PIPELINE and "audit_power" in stages.MODES
  assert main.modes_of("pipeline") == list(stages.PIPELINE)
  assert main.modes_of("audit_power") == ["audit_power"]


def test_phantom_null_images_are_fresh_patients(tiny_trained_workdir):
  config, workdir = tiny_trained_workdir
  holdout = dataset.load_arrays(workdir, "test", ("image", "patient_id"))
  pool, kept, source = power.null_pool(config, holdout, config.data.phantom.num_patients, 30, 0)
  assert kept is holdout and len(pool["image"]) >= 30 and "freshly drawn" in source
  splits = [s for s, c in dataset.load_card(workdir)["splits"].items() if c["records"]]
  prepared = {p for s in splits
              for p in dataset.load_arrays(workdir, s, ("patient_id",))["patient_id"]}
  assert not prepared & set(pool["patient_id"])
  assert min(int(p) for p in pool["patient_id"]) > config.data.phantom.num_patients
  assert np.all(pool["labels"].sum(1) == 1)  # the training split's label rule, as released images


def test_other_data_split_the_holdout_by_patient():
  config = load_config("tiny")
  config.data.source = "filelist"
  pids = np.repeat([f"p{i}" for i in range(10)], 3)
  holdout = {"image": np.zeros((30, 4, 4, 1), np.uint8), "patient_id": pids}
  pool, kept, source = power.null_pool(config, holdout, 0, 10, 0)
  assert len(pool["image"]) == len(kept["image"]) == 15 and "half of the holdout" in source
  assert not set(pool["patient_id"]) & set(kept["patient_id"])


def test_rates_on_phantom_releases(phantom_release):  # noqa: F811
  config, spaces, train, unseen = phantom_release
  config = config.copy_and_resolve_references()
  config.audit.power_draws, config.audit.power_shares = 4, (0.1,)
  pool = {"image": unseen["image"], "patient_id": unseen["patient_id"]}
  result = power.run(config, spaces, train, pool, 100, seed=0, log=lambda _: None)
  assert result["who"] == ["features", "pixels", "verdict"]
  null, leak = result["null"]["rejected"], result["leaking"][0]
  assert leak["copies"] == 10 and leak["rejected"]["verdict"]["successes"] == 4
  assert null["verdict"]["successes"] <= 1
  # Wilson intervals of the counts
  r = leak["rejected"]["verdict"]
  assert r == pso.wilson(4, 4).to_dict()
  # the verdict fails a release when any attacker alone would (Holm over more tests is stricter)
  for arm in [result["null"]] + result["leaking"]:
    rej = arm["rejected"]
    assert rej["verdict"]["successes"] <= sum(rej[w]["successes"] for w in ("features", "pixels"))


def test_stage_writes_rates_and_adds_them_to_the_audit_page(tiny_trained_workdir, tmp_path):
  config, trained = tiny_trained_workdir
  config = config.copy_and_resolve_references()
  config.audit.power_draws, config.audit.power_shares = 2, (0.2,)
  wd = clone_workdir(trained, tmp_path / "run")
  val = dataset.load_arrays(wd, "val", keys=("image", "path"))
  n_train = len(dataset.load_split(wd, "train"))
  _write_released(wd, val["image"], [p.replace(".png", "_syn.png") for p in val["path"]],
                  np.arange(len(val["image"])) % n_train)
  stages.get_stage("audit")(config, wd)
  result = stages.get_stage("audit_power")(config, wd)
  out = stages.output_dir(wd, "audit_power")
  assert json.load(open(os.path.join(out, "power.json"))) == json.loads(json.dumps(result))
  assert result["size"] == len(val["image"]) and result["draws"] == 2
  assert result["who"] == list(config.audit.attackers) + ["verdict"]
  assert [a["copies"] for a in result["leaking"]] == [round(0.2 * len(val["image"]))]
  for arm in [result["null"]] + result["leaking"]:
    assert all(r["n"] == 2 for r in arm["rejected"].values())
  page = open(os.path.join(stages.output_dir(wd, "audit"), "audit.html")).read()
  assert "power and false-alarm rate" in page
  refs = html.referenced_files(page)
  assert "../audit_power/power.png" in refs
  assert all(os.path.exists(os.path.join(stages.output_dir(wd, "audit"), r)) for r in refs)
  assert stages.get_stage("audit_power")(config, wd) == result  # complete: returns at once


def test_stage_before_the_audit_is_refused(tiny_trained_workdir, tmp_path):
  from pso_jax.errors import UserError
  config, trained = tiny_trained_workdir
  wd = clone_workdir(trained, tmp_path / "run")
  with pytest.raises(UserError, match=r"missing: select .*; audit .*Run --mode=pipeline"):
    stages.get_stage("audit_power")(config, wd)
  val = dataset.load_arrays(wd, "val", keys=("image", "path"))
  _write_released(wd, val["image"], list(val["path"]), np.arange(len(val["image"])))
  with pytest.raises(UserError, match=r"missing: audit \("):  # selected, not audited yet
    stages.get_stage("audit_power")(config, wd)
  assert not os.path.exists(os.path.join(wd, "audit"))  # refused before any work


@pytest.mark.parametrize("field,value", [("power_draws", 0), ("power_shares", (0.0,))])
def test_bad_power_settings_are_refused(phantom_release, field, value):  # noqa: F811
  from pso_jax.errors import UserError
  config, spaces, train, unseen = phantom_release
  config = config.copy_and_resolve_references()
  config.audit[field] = value
  with pytest.raises(UserError, match="power_draws=.* must be >= 1"):
    power.run(config, spaces, train, unseen, 10, seed=0)

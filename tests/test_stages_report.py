"""The report stage on a real tiny run: every referenced file exists, the numbers are the stages'."""

import json
import os

import pytest

from conftest import clone_workdir
from pso_jax import stages
from pso_jax.errors import UserError
from pso_jax.report import html
from pso_jax.stages import report as report_stage

DOWNSTREAM = ("sample", "select", "audit", "evaluate")


@pytest.fixture(scope="module")
def finished(tiny_trained_workdir, tmp_path_factory):
  config, trained = tiny_trained_workdir
  workdir = clone_workdir(trained, tmp_path_factory.mktemp("report") / "run")
  with pytest.raises(UserError, match="select .*synthetic/summary.json"):
    report_stage.run(config, workdir)             # before select: names what is missing
  for mode in DOWNSTREAM:
    stages.get_stage(mode)(config, workdir)
  return config, workdir


def test_report_files_and_numbers(finished):
  config, workdir = finished
  headline = report_stage.run(config, workdir)
  page = open(os.path.join(workdir, "report.html"), encoding="utf-8").read()
  refs = html.referenced_files(page)
  assert {"report/auroc_per_class.png", "report/real_vs_synthetic.png", "audit/audit.html",
          "report/loss_curves.png"} <= set(refs)
  for ref in refs:
    assert os.path.getsize(os.path.join(workdir, ref)) > 0, ref
  results = json.load(open(os.path.join(workdir, "results.json")))
  evaluate = json.load(open(os.path.join(workdir, "evaluate", "evaluate.json")))
  audit = json.load(open(os.path.join(workdir, "audit", "audit.json")))
  util = evaluate["utility"]
  assert headline["real_mean_auroc"] == util["models"]["real"]["mean_auroc"]
  assert headline["auroc_gap"] == pytest.approx(
      util["models"]["synthetic"]["mean_auroc"] - util["models"]["real"]["mean_auroc"])
  assert headline["pso_verdict"] == audit["summary"]["verdict"]
  assert results["headline"] == json.loads(json.dumps(headline))
  assert set(results["timings"]) == set()  # stages were called directly, not through main
  # every number shown in the headline table is the one in results.json
  assert html.fmt(headline["reid_auc"]) in page


def test_report_compare(finished, tmp_path):
  config, workdir = finished
  other = clone_workdir(workdir, tmp_path / "other")
  cfg = json.load(open(os.path.join(other, "config.json")))
  cfg["regulariser"]["enabled"] = False
  json.dump(cfg, open(os.path.join(other, "config.json"), "w"))
  report_stage.run(config, other)
  report_stage.run(config, workdir, compare=other)
  page = open(os.path.join(workdir, "report.html"), encoding="utf-8").read()
  assert "Side by side" in page and "regulariser.enabled: False -&gt; True" in page
  with pytest.raises(UserError, match="run --mode=report there first"):
    report_stage.run(config, workdir, compare=str(tmp_path))

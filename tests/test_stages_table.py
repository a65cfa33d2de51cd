"""The stage table: every row's inputs come earlier, every module has `run`, and the one "done"
protocol (result file, then COMPLETE last) reads back what it wrote, for every stage."""

import importlib
import os

import pytest

from pso_jax import stages
from pso_jax.errors import UserError


def test_rows_are_in_pipeline_order_with_distinct_outputs():
  order = [s.mode for s in stages.STAGES]
  for i, s in enumerate(stages.STAGES):
    assert all(order.index(m) < i for m in s.inputs), s
    assert callable(getattr(importlib.import_module(s.module), "run")), s.module
  marked = [s.folder for s in stages.STAGES if s.marker]
  assert len(set(marked)) == len(marked) and "" not in marked
  assert stages.MODES[-1] == "pipeline" and stages.get_stage("audit").__module__ == "pso_jax.stages.audit"
  with pytest.raises(UserError, match="unknown --mode='nope'"):
    stages.stage("nope")


@pytest.mark.parametrize("mode", [s.mode for s in stages.STAGES])
def test_finish_then_done_returns_the_result(tmp_path, mode):
  workdir, s = str(tmp_path), stages.stage(mode)
  assert stages.done(workdir, mode) is None
  os.makedirs(stages.output_dir(workdir, mode), exist_ok=True)
  stages.finish(workdir, mode, {"mode": mode, "n": 3})
  assert os.path.exists(os.path.join(workdir, s.result_path))
  if s.marker:  # COMPLETE last; train's COMPLETE is its result (the JSON summary)
    assert stages.done(workdir, mode) == {"mode": mode, "n": 3}
    assert os.path.exists(os.path.join(stages.output_dir(workdir, mode), stages.COMPLETE))
  else:         # the report: redone every time
    assert stages.done(workdir, mode) is None


def test_a_result_written_by_the_stage_gets_only_the_marker(tmp_path):
  workdir = str(tmp_path)
  out = stages.output_dir(workdir, "audit")
  os.makedirs(out)
  open(os.path.join(out, stages.stage("audit").result), "w").write('{"summary": {}}')
  assert stages.done(workdir, "audit") is None  # a result without its marker is not done
  stages.finish(workdir, "audit", None)
  assert stages.done(workdir, "audit") == {"summary": {}}


def test_missing_inputs_name_the_unfinished_stages(tmp_path):
  workdir = str(tmp_path)
  assert stages.missing_inputs(workdir, "prepare") == []
  os.makedirs(stages.output_dir(workdir, "prepare"))
  stages.finish(workdir, "prepare", {})
  missing = stages.missing_inputs(workdir, "select")
  assert [m.split()[0] for m in missing] == ["train", "train_reid", "train_classifier"]
  assert "reid/reid.json" in missing[1]

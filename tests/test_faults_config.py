"""Bad settings of issue 12 (items 3, 5 and 6): every stage's config checks run before the first
stage starts, ranges are checked, and a refused or failed run leaves config.json as it was."""

import json
import os
import subprocess
import sys

import jax
import pytest

from conftest import ROOT, load_config
from pso_jax import stages
from pso_jax.errors import UserError
from pso_jax.training import checkpoint as ckpt_lib

TINY = "--config=configs/cxr.py:tiny"


def _main(workdir, *args):
  return subprocess.run([sys.executable, "-m", "pso_jax.main", TINY, f"--workdir={workdir}", *args],
                        cwd=ROOT, capture_output=True, text=True, timeout=600)


def _refused(r, needle: str) -> None:
  """One `pso_jax: error:` line naming the field, exit 2, no traceback."""
  assert r.returncode == 2, r.stderr[-3000:]
  assert needle in r.stderr and "Traceback" not in r.stderr, r.stderr[-3000:]


# ---------------------------------------------------------------- item 3: the verdict's bounds


@pytest.mark.parametrize("override, needle", [
    ("--config.audit.risk_bound=5", "config.audit.risk_bound=5.0 must be in (0, 1) (a probability: 5% is 0.05)"),
    ("--config.audit.weight_bound=0", "config.audit.weight_bound=0.0 must be in (0, 1]"),
])
def test_3_audit_bounds_that_flip_the_verdict_are_refused(tmp_path, override, needle):
  """risk_bound=5 (meant as 5%) passed a failing audit; weight_bound=0 made every attack 0/n."""
  r = _main(tmp_path / "run", "--mode=audit", override)
  _refused(r, needle)
  assert not os.path.exists(tmp_path / "run" / "config.json")


# ---------------------------------------------------------------- item 5: checked before work


def test_5_pipeline_refuses_a_select_setting_before_prepare_starts(tmp_path):
  r = _main(tmp_path / "run", "--mode=pipeline", "--config.select.n_candidates=0")
  _refused(r, "config.select.n_candidates=0 must be >= 1")
  left = os.listdir(tmp_path / "run") if os.path.isdir(tmp_path / "run") else []
  assert left == [], left  # neither prepare's data nor config.json


@pytest.mark.parametrize("mode, override, needle", [
    ("train_reid", "--config.reid.steps=0", "config.reid.steps=0 must be an integer >= 1"),
    ("train_classifier", "--config.classifier.batch_size=0",
     "config.classifier.batch_size=0 must be an integer >= 1"),
    ("prepare", "--config.data.split_fractions=0.5",
     "config.data.split_fractions=(0.5,) must hold 3 values"),
])
def test_5_late_failures_named_settings_are_refused_at_once(tmp_path, mode, override, needle):
  """reid.steps=0 raised IndexError after saving an untrained model, classifier.batch_size=0 a
  ZeroDivisionError, split_fractions=0.5 a traceback."""
  _refused(_main(tmp_path / "run", f"--mode={mode}", override), needle)


# every stage's ranges, field by field, through the checks `main` runs (config only, no data)
BAD = [
    ("prepare", "data.split_fractions", (0.8, 0.1, 0.2), "must sum to 1"),
    ("prepare", "data.split_fractions", (1.0, 0.0, 0.0), "each in (0, 1)"),
    ("prepare", "data.prepare_chunk", 0, ">= 1"),
    ("prepare", "data.batch_size", 0, ">= 1"),
    ("prepare", "data.features.pool_size", 0, ">= 1"),   # ZeroDivisionError in check_kind
    ("prepare", "data.features.dim", 0, ">= 1"),
    ("prepare", "data.phantom.num_patients", 2, ">= 3"),
    ("prepare", "data.phantom.multi_label_rate", 1.5, "in [0, 1]"),
    ("prepare", "data.split_seed", -1, ">= 0"),
    ("prepare", "seed", -1, ">= 0"),                   # numpy generators refuse negative seeds
    ("prepare", "data.worker_count", -1, ">= 0"),
    ("train", "train.batch_size", 0, ">= 1"),
    ("train", "train.grad_accum", 0, ">= 1"),
    ("train", "train.keep_checkpoints", 0, ">= 1"),
    ("train", "train.lr_ref", 0.0, "> 0"),
    ("train", "train.adam_b2", 1.0, "in [0, 1)"),
    ("train", "train.adam_eps", 0.0, "> 0"),
    ("train", "train.warmup_images", -1, ">= 0"),
    ("train", "model.dropout", 1.0, "< 1"),
    ("train", "model.sigma_data", 0.0, "> 0"),
    ("train", "diffusion.p_std", 0.0, "> 0"),
    ("train", "mesh.fsdp", 0, "fsdp=0 must be >= 1"),
    ("train_reid", "reid.batch_size", 0, ">= 1"),
    ("train_reid", "reid.scans_per_patient", 1, ">= 2"),
    ("train_reid", "reid.scans_per_patient", 3, "multiple of config.reid.scans_per_patient=3"),
    ("train_reid", "reid.batch_size", 20, "not divisible by the 8 devices"),  # after train
    ("evaluate", "classifier.batch_size", 12, "not divisible by the 8 devices"),
    ("train_reid", "reid.lr", -1e-3, "> 0"),
    ("train_reid", "reid.temperature", 0.0, "> 0"),
    ("train_reid", "reid.target_fpr", 0.0, "in (0, 1)"),
    ("train_reid", "reid.bootstrap", 0, ">= 1"),
    ("train_reid", "reid.max_pairs", 0, ">= 1"),
    ("train_reid", "reid.crop_min_scale", 0.0, "in (0, 1]"),
    ("train_reid", "reid.blocks", (1, 0), "each >= 1"),
    ("train_reid", "reid.arch", "vit", "is unknown"),
    ("train_classifier", "classifier.epochs", 0, ">= 1"),
    ("train_classifier", "classifier.steps", -5, ">= 0"),
    ("train_classifier", "classifier.plateau_factor", 0.0, "in (0, 1]"),
    ("train_classifier", "classifier.norm", "layer", "is unknown"),
    ("train_classifier", "evaluate.bootstrap", 0, ">= 1"),
    ("sample", "sample.grid", 0, ">= 1"),
    ("sample", "sample.steps", 0, ">= 1"),
    ("sample", "sample.ema_std", -0.1, ">= 0"),
    ("select", "select.chunk_images", 0, ">= 1"),
    ("select", "select.max_rounds", 0, ">= 1"),
    ("audit", "audit.risk_bound", 0.0, "in (0, 1)"),
    ("audit", "audit.weight_bound", 1.5, "in (0, 1]"),
    ("audit", "audit.tau", 1.5, "in [0, 1]"),
    ("audit", "audit.top_k", 0, ">= 1"),
    ("audit", "audit.query_block", 0, ">= 1"),
    ("audit", "audit.count_k", 0, ">= 1"),
    ("audit", "audit.train_queries", 0, ">= 1"),
    ("audit", "audit.canaries", -1, ">= 0"),
    ("audit", "audit.chance_match_rate", 1.0, "in [0, 1)"),
    ("audit", "audit.holdout_split", "train", "is unknown"),
    ("audit", "audit.dtype", "float16", "is unknown"),
    ("evaluate", "evaluate.fd_dim", 0, ">= 1"),
    ("evaluate", "classifier.batch_size", 0, ">= 1"),
    ("report", "report.grid", 0, ">= 1"),
]


@pytest.mark.parametrize("mode, field, value, needle", BAD, ids=[f"{b[1]}={b[2]}" for b in BAD])
def test_5_every_stage_checks_its_ranges(mode, field, value, needle):
  from pso_jax.stages import checks
  config = load_config("tiny")
  *parents, name = field.split(".")
  section = config
  for p in parents:
    section = section[p]
  section[name] = value
  with pytest.raises(UserError, match="config." + field) as e:
    checks.check_config(config, [mode])
  assert needle in str(e.value)


@pytest.mark.parametrize("mode", ["sample", "select"])
@pytest.mark.parametrize("overrides, needle", [
    ({"regulariser.enabled": False}, "regulariser.enabled=False turns condition dropout off"),
    ({"sample.guide": "separate"}, "guide='separate' needs --config.sample.guide_workdir"),
    ({"sample.guide": "autoguidance"}, "guide='autoguidance' needs --config.sample.guide_step"),
], ids=["null_cond without dropout", "separate without workdir", "autoguidance without step"])
def test_5_a_guide_the_config_cannot_give_is_refused_before_training(mode, overrides, needle):
  """Found when sample or select loaded the model, after training."""
  from pso_jax.stages import checks
  config = load_config("tiny")
  for field, value in overrides.items():
    section, name = field.split(".")
    config[section][name] = value
  with pytest.raises(UserError, match=needle):
    checks.check_config(config, [mode])
  config.sample.guidance, config.select.guidance_step = 1.0, 0.0  # unguided: no guide needed
  checks.check_config(config, [mode])


def test_5_the_variants_pass_and_every_mode_has_a_check():
  from pso_jax.stages import checks
  assert set(checks.CHECKS) == {s.mode for s in stages.STAGES}
  for variant in ("", "demo", "tiny"):
    checks.check_config(load_config(variant), list(checks.CHECKS))
  config = load_config("tiny")
  config.audit.weight_bound, config.audit.tau = -1.0, -1.0  # the "use the default" values
  checks.check_config(config, ["audit"])
  # the mesh is checked only where it is used: a report needs no devices of the training run's
  config.mesh.data = 64
  checks.check_config(config, ["prepare", "audit", "report"])
  with pytest.raises(UserError, match="mesh"):
    checks.check_config(config, ["train_classifier"])


# ---------------------------------------------------------------- item 6: config.json


def test_6_a_refused_or_failed_run_leaves_config_json_as_it_was(tmp_path):
  run = tmp_path / "run"
  # refused first run, then the corrected run is accepted
  _refused(_main(run, "--mode=prepare", "--config.data.split_fractions=0.5"), "split_fractions")
  assert not os.path.exists(run / "config.json")
  # a first run that fails inside its stage (the filelist is missing) stores no config either
  r = _main(run, "--mode=prepare", "--config.data.source=filelist",
            f"--config.data.filelist={tmp_path / 'missing.txt'}")
  assert r.returncode == 2 and "missing.txt" in r.stderr, r.stderr[-2000:]
  assert not os.path.exists(run / "config.json")
  r = _main(run, "--mode=prepare")
  assert r.returncode == 0, r.stderr[-3000:]
  stored = json.loads((run / "config.json").read_text())
  assert stored["data"]["source"] == "phantom"
  # a refused --allow_config_change keeps the stored config, and the plain run still works
  _refused(_main(run, "--mode=prepare", "--allow_config_change",
                 "--config.data.split_fractions=0.5"), "split_fractions")
  assert json.loads((run / "config.json").read_text()) == stored
  assert _main(run, "--mode=prepare").returncode == 0


def test_6_the_checkpoint_shape_error_names_the_config_that_wrote_it(tmp_path):
  """It said "see config.json", which by then may hold the new config: it now names the
  checkpoint's own record of its config."""
  ckpt = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints"), keep=2, async_save=False)
  ckpt.save(1, {"w": jax.numpy.zeros(4)}, None, {"step": 1, "config": {"model": {"channels": 4}}})
  with pytest.raises(UserError, match="another shape") as e:
    ckpt.restore(1, jax.eval_shape(lambda: {"w": jax.numpy.zeros(5)}))
  ckpt.close()
  assert "config.json" not in str(e.value)
  assert os.path.join(str(tmp_path / "checkpoints"), "1", "meta") in str(e.value)

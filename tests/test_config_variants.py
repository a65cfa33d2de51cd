"""configs/cxr.py's variants, and guide/regulariser/checkpoint combinations that cannot work,
refused when the config is read (issue 15, item 1): before any training, with one message that
names the fix."""

import os
import shlex
import subprocess
import sys

import numpy as np
import pytest

import test_readme
from conftest import ROOT, load_config
from pso_jax.data import filelists
from pso_jax.errors import UserError
from pso_jax.stages import checks

PIPELINE = ["prepare", "train", "train_reid", "train_classifier", "sample", "select", "audit",
            "evaluate", "report"]
STAGE_CHECKS = PIPELINE + ["audit_power"]  # --mode=compare checks its own methods' configs


def _set(config, overrides: dict):
  for field, value in overrides.items():
    *parents, name = field.split(".")
    section = config
    for p in parents:
      section = section[p]
    section[name] = value
  return config


# ---------------------------------------------------------------- the reference's recipe


def test_reference_is_the_reference_diadm_recipe():
  """trichotomy.md §3.3-4.2: pseudocond EDM2-xs on 2048-d SwAV features, no label dropout (nor any
  other regulariser part), guided at g = 1.2 by a separate unconditional network, raw weights,
  the 80 Mi-image checkpoint (83,886 kimg = 40,960 steps of 2048)."""
  c = load_config("reference")
  assert c.variant == "reference"
  assert (c.model.preset, c.model.cond, c.data.features.kind, c.data.features.dim) == \
      ("xs", "pseudo", "file", 2048)
  assert not c.regulariser.enabled
  assert (c.regulariser.cond_dropout, c.regulariser.jitter, c.regulariser.kanon_k) == (0, 0, 0)
  assert (c.sample.guide, c.sample.guidance, c.sample.ema_std) == ("separate", 1.2, 0.0)
  assert c.train.batch_size == 2048 and c.train.total_images == 80 * 2 ** 20
  assert c.train.total_images // c.train.batch_size == 40960
  assert round(c.train.total_images / 1000) == 83886  # kimg, as the reference names it
  assert (c.train.lr_ref, c.train.t_ref_batches, c.sample.steps) == (0.0012, 17000, 32)
  assert (c.select.n_candidates, c.select.guidance_step) == (32, 0.1)
  # everything else is the recipe's: variants change numbers, never structure
  recipe = load_config("")
  assert set(c.to_dict()) == set(recipe.to_dict())
  assert c.data.to_dict() == {**recipe.data.to_dict(), "features": c.data.features.to_dict()}


def test_reference_trains_alone_and_samples_only_with_its_guide():
  c = load_config("reference")
  checks.check_config(c, ["prepare", "train"])  # the guide is trained in its own workdir
  with pytest.raises(UserError, match="guide='separate' needs --config.sample.guide_workdir"):
    checks.check_config(c, PIPELINE)
  c.sample.guide_workdir = "/runs/reference_uncond"
  checks.check_config(c, STAGE_CHECKS)
  # its guide: the same variant, unconditional (no regulariser to refuse), train alone
  guide = _set(load_config("reference"), {"model.cond": "uncond"})
  checks.check_config(guide, ["prepare", "train"])


# ---------------------------------------------------------------- combinations that cannot work

UNGUIDED = {"sample.guidance": 1.0, "select.guidance_step": 0.0}

REFUSED = [
    # the null condition is learned only through condition dropout
    ({"regulariser.enabled": False}, ["sample"], "regulariser.enabled=False turns condition dropout off"),
    ({"regulariser.cond_dropout": 0.0}, ["select"], "cond_dropout=0 (no condition dropout)"),
    ({"model.cond": "uncond", "regulariser.enabled": False}, ["select"], "this model is unconditional"),
    # g = 1 at the start, but later selection rounds lower it to 0.9, 0.8, ...: still guided
    ({"regulariser.enabled": False, "sample.guidance": 1.0}, ["select"], "turns condition dropout off"),
    ({"sample.guide": "separate"}, ["sample"], "needs --config.sample.guide_workdir"),
    # autoguidance: tiny trains 6 steps and saves a checkpoint every 3 (steps 3 and 6)
    ({"sample.guide": "autoguidance"}, ["train"], "needs --config.sample.guide_step"),
    ({"sample.guide": "autoguidance", "sample.guide_step": 2}, ["train"], "guide_step=2 is not an earlier checkpoint"),
    ({"sample.guide": "autoguidance", "sample.guide_step": 6}, ["select"], "choose a multiple of 3 below 6, e.g. 3"),
    ({"sample.guide": "autoguidance", "sample.guide_step": 9}, ["sample"], "guide_step=9 is not an earlier"),
    ({"sample.guide": "autoguidance", "sample.guide_step": 0}, ["train"], "guide_step=0 is not an earlier"),
    # an EMA width that is not tracked is rebuilt from snapshots up to the guide's step (every 3)
    ({"sample.guide": "autoguidance", "sample.guide_step": 1, "train.checkpoint_images": 8,
      "sample.ema_std": 0.07}, ["train"], "the first is saved at step 3"),
    # the regulariser needs a condition, and k-anonymity k + 1 training patients
    ({"model.cond": "uncond"}, ["train"], "add --config.regulariser.enabled=False"),
    ({"regulariser.kanon_k": 32}, ["train"], "kanon_k=32 needs more than 32 patients"),
]


@pytest.mark.parametrize("overrides, modes, needle", REFUSED,
                         ids=[f"{'+'.join(f'{k}={v}' for k, v in o.items())}@{m[0]}"
                              for o, m, _ in REFUSED])
def test_a_combination_that_cannot_work_is_refused(overrides, modes, needle):
  config = _set(load_config("tiny"), overrides)
  with pytest.raises(UserError) as e:
    checks.check_config(config, modes)
  assert needle in str(e.value), str(e.value)
  with pytest.raises(UserError, match=needle.replace("(", r"\(").replace(")", r"\)")):
    checks.check_config(config, PIPELINE)  # the pipeline refuses whatever one of its stages does


@pytest.mark.parametrize("overrides", [
    {"regulariser.enabled": False, **UNGUIDED},              # the README's ablation
    {"regulariser.cond_dropout": 0.0, **UNGUIDED},
    {"model.cond": "uncond", "regulariser.enabled": False, **UNGUIDED},
    {"model.cond": "uncond", "regulariser.enabled": False, "sample.guide": "autoguidance",
     "sample.guide_step": 3},                                 # EDM2's autoguidance
    {"regulariser.enabled": False, "sample.guide": "separate", "sample.guide_workdir": "/runs/u"},
    {"sample.guide": "autoguidance", "sample.guide_step": 3, "train.keep_checkpoints": 1},
    {"sample.guide": "autoguidance", "sample.guide_step": 1, "train.checkpoint_images": 8,
     "sample.ema_std": 0.0},                                  # raw weights need no snapshot
    {"regulariser.kanon_k": 31},
    {"model.cond": "class"},                                  # class conditions take every part
], ids=lambda o: "+".join(f"{k}={v}" for k, v in o.items()))
def test_a_combination_that_works_passes(overrides):
  checks.check_config(_set(load_config("tiny"), overrides), STAGE_CHECKS)


def test_train_alone_refuses_only_what_train_can_know():
  """A guide that sampling cannot use is sampling's business; the checkpoint it must keep, or a
  regulariser with nothing to act on, is train's."""
  no_dropout = _set(load_config("tiny"), {"regulariser.enabled": False})
  checks.check_config(no_dropout, ["prepare", "train"])
  unguided_autoguidance = _set(load_config("tiny"), {"sample.guide": "autoguidance", **UNGUIDED})
  checks.check_config(unguided_autoguidance, ["train"])  # no guide will be loaded: none to keep
  checks.check_config(unguided_autoguidance, PIPELINE)


def test_the_kanon_bound_is_the_split_s_own_train_patient_count():
  """The check's count for the phantom equals what the patient split gives (tiny: 40 patients,
  80% train; demo_pseudo: 420 after its 100 attacker patients, 45% train)."""
  for variant in ("tiny", "demo_pseudo"):
    c = load_config(variant)
    ids = np.arange(c.data.phantom.num_patients)
    n = len(filelists.split_patients(ids, c.data.split_fractions, c.data.split_seed,
                                     c.data.attacker_patients)["train"])
    _set(c, {"regulariser.kanon_k": n - 1})
    checks.check_config(c, ["train"])
    _set(c, {"regulariser.kanon_k": n})
    with pytest.raises(UserError, match=f"at most {n}"):
      checks.check_config(c, ["train"])


# ---------------------------------------------------------------- the README's commands


def _readme_overrides(argv):
  """(mode, {field: value}) of a README command's flags, values parsed as the config flags do."""
  import ast
  mode, overrides = "pipeline", {}
  for a in argv:
    if a.startswith("--mode="):
      mode = a.split("=", 1)[1]
    elif a.startswith("--config."):
      field, value = a[len("--config."):].split("=", 1)
      try:
        overrides[field] = ast.literal_eval(value)
      except (ValueError, SyntaxError):
        overrides[field] = value
  return mode, overrides


def _readme_variant(argv) -> str:
  """The variant a README command names (`--config=configs/cxr.py:demo` -> "demo")."""
  (path,) = [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
  return path.partition(":")[2]


def test_every_readme_command_passes_the_config_checks_on_tiny_and_its_own_variant():
  """test_readme runs the commands on tiny (pseudo-conditioned); the variant a command names may
  differ in what a check refuses (demo is class-conditional), so both are checked."""
  from pso_jax.main import modes_of
  text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
  commands = [c for c in test_readme.pso_jax_main_commands(text) if not test_readme.needs_user_data(c)]
  assert any("--config.regulariser.enabled=False" in c for c in commands)
  assert {_readme_variant(c) for c in commands} >= {"demo", "scale_cpu"}
  for argv in commands:
    mode, overrides = _readme_overrides(argv)
    for variant in ("tiny", _readme_variant(argv)):
      checks.check_config(_set(load_config(variant), overrides), modes_of(mode))


def test_the_ablation_without_unguided_sampling_is_refused_before_any_work(tmp_path):
  """It trained for minutes, then stopped at sample: the null-condition guide needs the
  condition dropout that enabled=False turns off. Now one line names both ways out."""
  workdir = tmp_path / "noreg"
  argv = shlex.split("python -m pso_jax.main --config=configs/cxr.py:tiny "
                     f"--workdir={workdir} --config.regulariser.enabled=False")
  r = subprocess.run([sys.executable] + argv[1:], cwd=ROOT, capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 2, r.stderr[-3000:]
  errors = [line for line in r.stderr.splitlines() if line.startswith("pso_jax: error:")]
  assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
  assert "--config.sample.guidance=1 --config.select.guidance_step=0" in errors[0]
  assert "--config.sample.guide=separate" in errors[0]
  assert not os.path.exists(workdir) or os.listdir(workdir) == []


@pytest.mark.parametrize("variant", ["demo", "demo_long", "demo_pseudo", "tiny", "scale",
                                     "scale_cpu"])
def test_every_phantom_variant_passes_every_stage_check(variant):
  """A shipped variant that a stage would refuse (e.g. k-anonymous sampling conditions on a
  class-conditional model) is caught here, not minutes into a user's run."""
  checks.check_config(load_config(variant), STAGE_CHECKS)


def _differs_only_in(base: str, variant: str, changed: dict):
  want, got = _set(load_config(base), changed), load_config(variant)
  assert got.variant == variant
  want.variant = variant
  assert want.to_dict() == got.to_dict()


def test_demo_is_the_guided_class_conditional_run():
  """demo is run e28 of docs/utility_gap.md: demo_pseudo (the e10 demo) with these fields
  changed, no others."""
  _differs_only_in("demo_pseudo", "demo", {
      "model.cond": "class", "model.dropout": 0.1, "regulariser.kanon_k": 0, "select.cond_k": 0,
      "train.total_images": 32 * 1500, "sample.guidance": 2.0, "select.guidance_floor": 1.0,
      "select.n_candidates": 4, "audit.tau": 0.75,
      "compare.guidance": (0.7, 1.0, 1.2, 1.5, 1.7, 2.0, 3.0)})


def test_demo_long_is_the_demo_trained_longer():
  """demo_long is run e34 of docs/utility_gap.md: the demo with these fields changed, no others."""
  _differs_only_in("demo", "demo_long", {"train.total_images": 32 * 4000, "train.augment_p": 0.3})

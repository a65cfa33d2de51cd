"""Bad input stops the sample/select stages with a clear UserError before any sampling; the
preview grid layout; the model fingerprint that guards a resumed selection."""

import os

import jax
import numpy as np
import pytest

from pso_jax.stages import select as select_stage
from pso_jax.diffusion import sampling
from pso_jax.privacy import selection_workdir
from pso_jax.errors import UserError
from tests.conftest import load_config


def tiny_train(n=5, dim=16):
  rng = np.random.default_rng(0)
  f = rng.normal(size=(n, dim)).astype(np.float32)
  f /= np.linalg.norm(f, axis=1, keepdims=True)
  return dict(labels=(rng.random((n, 8)) < 0.3).astype(np.float32), feature=f)


def test_conditions_follow_the_condition_mode():
  config, train = load_config("tiny"), tiny_train()
  np.testing.assert_array_equal(sampling.conditions_for(config, train), train["feature"])
  config.model.cond = "class"
  np.testing.assert_array_equal(sampling.conditions_for(config, train), train["labels"])
  config.model.cond = "uncond"
  assert sampling.conditions_for(config, train).shape == (5, 0)


@pytest.mark.parametrize("break_features, message", [
    (lambda f: f[:3], "one feature per training image"),
    (lambda f: np.concatenate([f, f], axis=1), "32 dimensions"),
    (lambda f: np.where(np.arange(5)[:, None] == 2, 0.0, f), "1 training images have no feature"),
    (lambda f: np.where(np.arange(5)[:, None] == 4, np.nan, f), "e.g. train index 4"),
])
def test_missing_or_mismatched_features_are_refused(break_features, message):
  config, train = load_config("tiny"), tiny_train()
  train["feature"] = break_features(train["feature"])
  with pytest.raises(UserError, match=message):
    sampling.conditions_for(config, train)


@pytest.mark.parametrize("field, value, message", [
    ("select.n_candidates", 0, "n_candidates=0 must be >= 1"),
    ("select.guidance_floor", 1.5, "guidance_floor=1.5 is above the starting guidance"),
    ("select.chunk_images", 0, "chunk_images=0"),
    ("sample.steps", 0, "steps=0"),
    ("sample.guide", "cfg", "guide='cfg' is unknown"),
])
def test_select_refuses_bad_settings_before_loading_anything(tmp_path, field, value, message):
  config = load_config("tiny")
  section, name = field.split(".")
  config[section][name] = value
  with pytest.raises(UserError, match=message):
    select_stage.run(config, str(tmp_path))  # the workdir is empty: nothing else was read
  assert not os.path.exists(tmp_path / "synthetic")


def test_null_condition_guide_needs_condition_dropout():
  from pso_jax.diffusion.sampler import Denoiser
  config = load_config("tiny")
  config.regulariser.cond_dropout = 0.0
  net = Denoiser(lambda v, x, s, c: x, {})
  with pytest.raises(UserError, match="condition dropout"):
    sampling._guide(config, "unused", net)
  config.sample.guide = "separate"
  with pytest.raises(UserError, match="guide_workdir"):
    sampling._guide(config, "unused", net)
  config.sample.guide = "autoguidance"
  with pytest.raises(UserError, match="guide_step"):
    sampling._guide(config, "unused", net)


def test_separate_guide_must_be_unconditional_and_same_shape(tmp_path):
  from pso_jax import workdir as workdir_lib
  from pso_jax.diffusion.sampler import Denoiser
  guide_dir = str(tmp_path / "guide")
  guide_config = load_config("tiny")  # a conditional (pseudo) model
  workdir_lib.prepare_workdir(guide_dir, guide_config)
  config = load_config("tiny")
  config.sample.guide, config.sample.guide_workdir = "separate", guide_dir
  net = Denoiser(lambda v, x, s, c: x, {})
  with pytest.raises(UserError, match="needs an unconditional one"):
    sampling._guide(config, "unused", net)
  guide_config.model.cond = "uncond"
  guide_config.data.image_size = 32
  workdir_lib.prepare_workdir(guide_dir, guide_config, allow_config_change=True)
  with pytest.raises(UserError, match=r"works on \(32, 32, 1\) inputs"):
    sampling._guide(config, "unused", net)


def test_a_selection_by_another_model_is_refused(tmp_path):
  out = str(tmp_path)
  fp = dict(config_hash="abc", weights=1.5, guide="null_cond", guide_weights=None)
  selection_workdir.check_same_model(out, fp, 4)
  selection_workdir.check_same_model(out, fp, 4)  # the same model resumes
  with pytest.raises(UserError, match="another model"):
    selection_workdir.check_same_model(out, dict(fp, weights=2.5), 4)
  with pytest.raises(UserError, match="another model"):
    selection_workdir.check_same_model(out, fp, 8)


def test_fingerprint_tells_weights_and_configs_apart():
  a = {"params": {"w": jax.numpy.arange(12.0).reshape(3, 4)}}
  b = {"params": {"w": jax.numpy.arange(12.0).reshape(3, 4).at[1, 2].add(0.01)}}
  assert sampling.weight_checksum(a) != sampling.weight_checksum(b)
  assert sampling.weight_checksum(a) == sampling.weight_checksum(
      jax.tree.map(lambda x: x + 0, a))
  c1, c2 = load_config("tiny"), load_config("tiny")
  c2.sample.batch_size = 3  # how to run, not what to compute
  assert sampling._config_hash(c1) == sampling._config_hash(c2)
  c2.select.n_candidates = 7
  assert sampling._config_hash(c1) != sampling._config_hash(c2)


def test_preview_grid_alternates_real_and_generated_rows():
  real = np.full((6, 4, 4, 1), 10, np.uint8) + np.arange(6, dtype=np.uint8)[:, None, None, None]
  generated = real + 100
  grid = sampling.preview_grid(real, generated, columns=3, pad=1)
  assert grid.shape == (2 * 2 * 5 + 1, 3 * 5 + 1, 1)
  cell = lambda row, col: grid[1 + row * 5:1 + row * 5 + 4, 1 + col * 5:1 + col * 5 + 4]
  assert (cell(0, 2) == 12).all() and (cell(1, 2) == 112).all()  # real 2 above its candidate
  assert (cell(2, 0) == 13).all() and (cell(3, 1) == 114).all()

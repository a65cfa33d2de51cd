"""Checkpoints a configured guide needs survive `train.keep_checkpoints` (issue 15, item 1):
autoguidance samples with an earlier checkpoint of the same run, which the newest-N rotation
deleted before sampling could load it."""

import os

import jax
import jax.numpy as jnp
import pytest

from conftest import load_config
from pso_jax.diffusion import denoiser, sampling
from pso_jax.training import checkpoint as ckpt_lib


@pytest.mark.parametrize("keep_steps, left", [((), [5]), ((2,), [2, 5]), ((2, 4), [2, 4, 5])])
def test_rotation_keeps_the_newest_and_the_named_steps(tmp_path, keep_steps, left):
  ckpt = ckpt_lib.Checkpointer(str(tmp_path / "ckpt"), keep=1, keep_steps=keep_steps,
                               async_save=True)
  for step in range(1, 6):
    ckpt.save(step, {"w": jnp.full(3, float(step))}, None, {"step": step})
  ckpt.wait()
  assert ckpt.all_steps() == left
  ckpt.close()


def test_kept_steps_follow_the_configured_guide():
  config = load_config("tiny")
  assert sampling.kept_checkpoint_steps(config) == ()  # null_cond: nothing beyond the newest
  config.sample.guide, config.sample.guide_step = "autoguidance", 3
  assert sampling.kept_checkpoint_steps(config) == (3,)
  config.sample.guide = "separate"  # another run's checkpoints, not this one's
  assert sampling.kept_checkpoint_steps(config) == ()


def test_autoguidance_guide_survives_keep_one_and_samples(tmp_path):
  """tiny trains 6 steps with a checkpoint every 3: keep_checkpoints=1 leaves step 6 only, unless
  the guide's step 3 is kept; the sample stage then guides with exactly that checkpoint."""
  from pso_jax.stages import checks, prepare, sample, train
  config = load_config("tiny")
  config.train.keep_checkpoints = 1
  config.train.async_checkpoint = False
  config.sample.guide, config.sample.guide_step = "autoguidance", 3
  config.sample.guidance = 1.5
  config.sample.grid = 2
  checks.check_config(config, ["train", "sample"])
  workdir = str(tmp_path / "run")
  prepare.run(config, workdir)
  summary = train.run(config, workdir)
  assert summary["steps"] == 6
  directory = denoiser.checkpoint_dir(workdir)
  assert sorted(int(s) for s in os.listdir(directory) if s.isdigit()) == [3, 6]
  guide = denoiser.load(config, workdir, step=3)
  final = denoiser.load(config, workdir)
  assert (guide.step, final.step) == (3, 6)
  result = sample.run(config, workdir)
  fingerprint = result["fingerprint"]
  assert fingerprint["guide"] == "autoguidance" and fingerprint["checkpoint_step"] == 6
  assert fingerprint["guide_weights"] == pytest.approx(
      round(sampling.weight_checksum(guide.variables), 3))
  assert fingerprint["guide_weights"] != pytest.approx(fingerprint["weights"])
  assert os.path.exists(os.path.join(workdir, "samples", "grid.png"))
  jax.clear_caches()

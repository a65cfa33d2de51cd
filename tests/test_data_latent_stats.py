"""Per-dataset latent statistics (config.data.latent.stats=dataset): computed by prepare on the
train split, recorded in the dataset card, and the ones training and sampling map with."""

import os

import numpy as np
import pytest

import tolerances as T
from conftest import load_config, save_tiny_sd_vae
from pso_jax.data import dataset, latents
from pso_jax.errors import UserError
from pso_jax.models import sd_vae
from pso_jax.stages import prepare


def _tiny(stats="dataset", channels=1):
  config = load_config("tiny")
  config.data.latent.stats = stats
  config.data.channels = channels
  return config


@pytest.mark.parametrize("channels", [1, 3])
def test_recorded_stats_equal_numpy_on_the_train_images(tmp_path, channels):
  config = _tiny(channels=channels)
  workdir = str(tmp_path / "run")
  card = prepare.run(config, workdir)
  images = dataset.load_arrays(workdir, "train", ("image",))["image"]
  unit = images.astype(np.float64) / 127.5 - 1.0  # identity's raw space, written out
  want_mean, want_std = unit.mean(axis=(0, 1, 2)), unit.std(axis=(0, 1, 2))
  stats = card["latent_stats"]
  n = unit[..., 0].size
  assert stats["used"] == "dataset" and stats["train_values"] == n
  T.assert_close(np.array(stats["train_mean"]), want_mean, T.reduction_rtol(n))
  T.assert_close(np.array(stats["train_std"]), want_std, T.reduction_rtol(n))
  assert stats["mean"] == stats["train_mean"] and len(stats["mean"]) == channels
  assert "latent.stats=dataset" in open(os.path.join(workdir, "data", "card.md")).read()

  # what training and sampling map with: the recorded statistics, and back again
  resolved = latents.resolve_stats(config, workdir)
  assert resolved.data.latent.mean == tuple(stats["mean"])
  x = latents.to_model_space(images, resolved)
  want = (unit - want_mean) * (0.5 / want_std)
  T.assert_close(x, want, T.reduction_rtol(n))
  T.assert_close(x.reshape(-1, channels).std(0), np.full(channels, 0.5), T.reduction_rtol(n))
  assert np.array_equal(latents.from_model_space(x, resolved), images)
  # the config's own mean/std stay untouched (a copy was resolved)
  assert config.data.latent.mean == (0.0,)


def test_config_stats_keep_identity_pixels_and_are_recorded(tmp_path):
  config = _tiny(stats="config")
  workdir = str(tmp_path / "run")
  card = prepare.run(config, workdir)
  stats = card["latent_stats"]
  assert stats["used"] == "config" and stats["mean"] is None and len(stats["train_mean"]) == 1
  assert latents.resolve_stats(config, workdir) is config
  pixels = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
  assert np.array_equal(latents.to_model_space(pixels, config), pixels / np.float32(127.5) - 1)
  # a dataset prepared with config statistics cannot serve stats=dataset: refused, with the fix
  with pytest.raises(UserError, match="prepared with config statistics; prepare it again"):
    latents.resolve_stats(_tiny(), workdir)


def test_unresolved_dataset_stats_are_never_used_silently():
  config = _tiny()
  with pytest.raises(RuntimeError, match="resolve_stats"):
    latents.to_model_space(np.zeros((1, 16, 16, 1), np.uint8), config)
  config.data.latent.stats = "batch"
  with pytest.raises(UserError, match="latent.stats='batch' is unknown"):
    latents.check_stats(config)


def test_running_stats_merge_equals_numpy():
  rng = np.random.default_rng(0)
  parts = [rng.normal(3.0, 2.0, (n, 4, 4, 3)) for n in (1, 7, 50, 3)]
  running = latents.RunningStats()
  for p in parts:
    running.update(p)
  whole = np.concatenate(parts).reshape(-1, 3)
  mean, std = running.result()
  T.assert_close(mean, whole.mean(0), T.reduction_rtol(len(whole)))
  T.assert_close(std, whole.std(0), T.reduction_rtol(len(whole)))


def test_sd_vae_records_are_normalised_by_the_dataset_stats(tmp_path):
  """sd_vae: the records hold (raw - mean_c) * 0.5 / std_c with the train split's raw statistics,
  so over the train split each channel has mean 0 and std 0.5 (an analytic property), and the
  recorded raw statistics equal numpy's on the VAE's raw latents."""
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  from pso_jax.data import vae_latents
  vae = save_tiny_sd_vae(str(tmp_path / "vae"))
  config = _tiny()
  config.data.latent.kind, config.data.latent.vae_dir = "sd_vae", str(tmp_path / "vae")
  config.data.prepare_chunk = 8
  workdir = str(tmp_path / "run")
  card = prepare.run(config, workdir)
  z = dataset.load_arrays(workdir, "train", ("latent",))["latent"].reshape(-1, 4).astype(np.float64)
  n = len(z)
  assert np.abs(z.mean(0)).max() <= T.reduction_rtol(n) * np.abs(z).max()
  T.assert_close(z.std(0), np.full(4, 0.5), T.reduction_rtol(n))
  stats = card["latent_stats"]
  images = dataset.load_arrays(workdir, "train", ("image",))["image"]
  raw = vae_latents.encode_images(config, images, normalised=False).reshape(-1, 4).astype(np.float64)
  rtol = T.network_rtol(sd_vae.load_vae(config.data.latent.vae_dir)[1])
  T.assert_close(np.array(stats["train_std"]), raw.std(0), rtol)
  # decoding uses the recorded statistics (the config's cxr8 constants would give other images)
  resolved = latents.resolve_stats(config, workdir)
  assert resolved.data.latent.std == tuple(stats["std"]) != tuple(config.data.latent.std)
  assert latents.from_model_space(z[:4 * 64].reshape(4, 8, 8, 4), resolved).shape == (4, 16, 16, 1)


def test_train_and_sample_map_with_the_recorded_stats(tmp_path, monkeypatch):
  """End to end on tiny: train reads its batches through the recorded statistics (an unresolved
  config would raise), and the sampler decodes with them."""
  from pso_jax.diffusion import sampling, train_setup
  from pso_jax.stages import train
  config = _tiny()
  config.train.total_images = config.train.batch_size * 2
  workdir = str(tmp_path / "run")
  card = prepare.run(config, workdir)
  seen = []
  real = train_setup.model_batch
  monkeypatch.setattr(train_setup, "model_batch",
                      lambda records, c, *a: seen.append(c.data.latent.mean) or real(records, c, *a))
  train.run(config, workdir)
  assert seen and all(m == tuple(card["latent_stats"]["mean"]) for m in seen)
  loaded = sampling.load_sampler(config, workdir, stream=sampling.PREVIEW_STREAM, guided=False)
  assert loaded.config.data.latent.std == tuple(card["latent_stats"]["std"])
  cond = np.zeros((2, config.data.features.dim), np.float32)
  images = loaded.generate(np.arange(2), cond, 1.0)
  assert images.shape == (2, 16, 16, 1) and images.dtype == np.uint8

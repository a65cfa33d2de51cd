"""The reference recipe (`configs/cxr.py` default variant) on a test-made ChestX-ray14-layout
dataset: 512 px PNGs -> SD-VAE latents (4x64x64) + ResNet-50 features, both networks loaded from
random-weight files in their original formats; then a few xs training steps and a preview sample.

Only counts and speed-critical sizes are overridden (image count, batch sizes, steps); the networks
are small random stand-ins for the downloads (a 4-block VAE keeps the 8x downsampling and 4 latent
channels; ResNet-50 is full size).
"""

import importlib.util
import os

import numpy as np
import pytest
from PIL import Image

from conftest import load_config
from pso_jax import stages, workdir as workdir_lib
from pso_jax.data import dataset, vae_latents
from pso_jax.tools import random_weights

N_PATIENTS, SCANS, SIZE = 10, 2, 512


def _write_cxr14(root) -> list[tuple[str, np.ndarray]]:
  """Grey 512x512 PNGs at images/<patient>_<scan>.png and one finding per scan."""
  rng = np.random.default_rng(0)
  rows = []
  for p in range(N_PATIENTS):
    for s in range(SCANS):
      rel = f"images/{p + 1:08d}_{s:03d}.png"
      coarse = rng.integers(0, 256, (32, 32), dtype=np.uint8)  # smooth-ish content, small PNGs
      pixels = np.kron(coarse, np.ones((16, 16), np.uint8))
      os.makedirs(os.path.join(root, "images"), exist_ok=True)
      Image.fromarray(pixels).save(os.path.join(root, rel))
      labels = np.zeros(8, np.int64)
      labels[(p + s) % 8] = 1
      rows.append((rel, labels))
  with open(os.path.join(root, "filelist.txt"), "w") as f:
    for rel, labels in rows:
      f.write(rel + " " + " ".join(map(str, labels)) + "\n")
  return rows


@pytest.mark.slow
@pytest.mark.exclusive  # ~7 GB (the xs model's state, its step and its checkpoint)
def test_reference_recipe_end_to_end(tmp_path):
  """One test, so pytest-xdist never prepares the dataset twice."""
  root = str(tmp_path)
  rows = _write_cxr14(root)
  random_weights.write_vae_folder(os.path.join(root, "vae"), block_out_channels=(8, 8, 16, 16))
  random_weights.write_torchvision("resnet50", os.path.join(root, "resnet50.safetensors"))
  config = load_config("")
  d = config.data
  d.filelist, d.image_root = os.path.join(root, "filelist.txt"), root
  d.latent.vae_dir = os.path.join(root, "vae")
  d.features.kind, d.features.weights = "resnet50", os.path.join(root, "resnet50.safetensors")
  d.batch_size = d.latent.batch_size = d.features.batch_size = 8
  d.prepare_chunk = 8
  # xs (125 M parameters) on one device: replicas on 8 fake CPU devices would need 8x the memory
  config.mesh.data, config.mesh.fsdp = 1, 1
  t = config.train
  t.batch_size, t.total_images, t.warmup_images = 2, 4, 2
  t.snapshot_images = t.checkpoint_images = 4
  t.log_every_steps = 1
  config.sample.steps, config.sample.grid, config.sample.batch_size = 2, 2, 2
  workdir = os.path.join(root, "run")
  workdir_lib.prepare_workdir(workdir, config)
  summary = stages.get_stage("prepare")(config, workdir)
  check_prepared(config, workdir, root, rows)
  assert stages.get_stage("prepare")(config, workdir) == summary  # a rerun returns at once

  if importlib.util.find_spec("pso_jax.stages.train") is None:
    pytest.skip("prepare checked; the train stage is not built yet")
  stages.get_stage("train")(config, workdir)
  assert os.path.exists(os.path.join(workdir, "diffusion", "COMPLETE"))
  sample = stages.get_stage("sample")(config, workdir)
  assert sample["images"] >= 1
  grid = np.asarray(Image.open(os.path.join(workdir, "samples", "grid.png")))
  assert grid.shape[0] > SIZE and grid.std() > 0


def check_prepared(config, workdir, root, rows):
  splits = {s: dataset.load_arrays(workdir, s, ("image", "latent", "feature", "path"))
            for s in ("train", "val", "test")}
  assert sum(len(s["path"]) for s in splits.values()) == len(rows)  # one finding each: all kept
  train = splits["train"]
  assert train["image"].shape[1:] == (SIZE, SIZE, 3) and train["image"].dtype == np.uint8
  assert train["latent"].shape[1:] == (64, 64, 4) and np.isfinite(train["latent"]).all()
  assert train["feature"].shape[1:] == (2048,)
  np.testing.assert_allclose(np.linalg.norm(train["feature"], axis=1), 1.0, atol=1e-5)
  # records are the PNGs the filelist names (grey replicated to RGB, already 512 px)
  for i in (0, len(train["path"]) - 1):
    png = np.asarray(Image.open(os.path.join(root, str(train["path"][i]))))
    np.testing.assert_array_equal(train["image"][i], np.repeat(png[..., None], 3, axis=-1))
  # decode brings the stored latents back to 512 px images through the same VAE
  images = vae_latents.decode_latents(config, train["latent"][:2])
  assert images.shape == (2, SIZE, SIZE, 3) and images.dtype == np.uint8

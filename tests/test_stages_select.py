"""The `sample` and `select` stages on a real tiny workdir (prepare -> train -> train_reid ->
train_classifier): grid, synthetic set, resumption after a kill and 1 vs 8 devices."""

import json
import os
import shutil

import numpy as np
import pytest

import tolerances as T
from pso_jax.privacy import selection as sel
from pso_jax.stages import select as select_stage
from pso_jax.data import release as synthetic_set
from pso_jax.stages import sample as sample_stage
from pso_jax.errors import UserError
from tests.conftest import load_config
from tests.test_privacy_selection import tree_files

pytest.importorskip("pso_jax.stages.train")
pytest.importorskip("pso_jax.stages.train_classifier")


@pytest.fixture(scope="module")
def trained(tiny_trained_workdir):
  """The suite's shared tiny workdir (prepare..train_classifier run once); tests clone it."""
  return tiny_trained_workdir


def clone(workdir, dst):
  """A copy of the trained workdir without any sampling outputs."""
  shutil.copytree(workdir, dst, ignore=shutil.ignore_patterns("synthetic", "release", "samples"))
  return str(dst)


def synthetic_files(workdir):
  """The internal records and the release."""
  return tree_files(workdir)


def test_sample_stage_writes_the_preview_grid(trained, tmp_path):
  from PIL import Image
  config, workdir = trained
  wd = clone(workdir, tmp_path / "wd")
  summary = sample_stage.run(config, wd)
  side, size = config.sample.grid, config.data.image_size
  with Image.open(os.path.join(wd, "samples", "grid.png")) as im:
    assert im.size == (side * (size + 2) + 2, side * (size + 2) + 2)
    grid = np.asarray(im)
  assert summary["images"] == side * side // 2
  assert os.path.exists(os.path.join(wd, "samples", "COMPLETE"))
  # generated rows are images, not constants; a rerun returns at once with the same summary
  row = grid[size + 4:2 * size + 4]
  assert row.std() > 5
  assert sample_stage.run(config, wd) == summary


def test_select_resumes_identically_and_matches_one_device(trained, tmp_path):
  config, workdir = trained
  # an uninterrupted run on one device (mesh data=1)
  one = clone(workdir, tmp_path / "one")
  config_one = load_config("tiny")
  config_one.mesh.data = 1
  summary = select_stage.run(config_one, one)
  files = synthetic_files(one)
  n_train = summary["train_images"]
  assert summary["released_primary"] + summary["skipped_images"] == n_train
  assert 0.0 <= summary["first_round_rejection_rate"] <= 1.0
  records = [json.loads(line) for line in files["synthetic/selection.jsonl"].decode().splitlines()]
  assert {r["index"] for r in records} == set(range(n_train))
  assert all((r["outcome"] == sel.REJECTED) == (r["n_patients_matched"] > 0) for r in records)
  released = synthetic_set.load_released(one)
  assert released["images"].dtype == np.uint8
  assert len(released["paths"]) == summary["released"]
  assert released["images"].shape[1:] == (config.data.image_size,) * 2 + (config.data.channels,)
  assert sorted(k for k in files if k.endswith(".png")) == sorted(
      "release/" + p for p in released["paths"])  # images in the release only, by opaque name
  card = json.loads(files["release/card.json"])
  assert card["images"]["count"] == summary["released"] and card["audit"] is None
  # on 8 devices, killed after one chunk, then rerun: the same files as the 1-device run (given
  # its secret key: the names are the same)
  killed = clone(workdir, tmp_path / "killed")
  os.makedirs(os.path.join(killed, "synthetic"))
  shutil.copy(os.path.join(one, "synthetic", "release.key"), os.path.join(killed, "synthetic"))
  partial = select_stage.run(config, killed, stop_after_chunks=1)
  assert partial["chunks_done"] == 1
  select_stage.run(config, killed)
  resumed = synthetic_files(killed)
  assert resumed.keys() == files.keys()
  assert all(resumed[k] == files[k] for k in files if k != "synthetic/selection.jsonl")  # images too
  # the same decisions; similarities to float rounding (8 devices embed in smaller batches)
  records_8 = [json.loads(line) for line in resumed["synthetic/selection.jsonl"].decode().splitlines()]
  assert len(records_8) == len(records)
  rtol = max(T.cnn_rtol(config.reid, config.data.channels),  # the re-id and classifier networks
             T.cnn_rtol(config.classifier, config.data.channels))
  for one_dev, eight_dev in zip(records, records_8):
    sims = [k for k in one_dev if k.endswith("_sim") or k == "consistency"]
    assert {k: v for k, v in one_dev.items() if k not in sims} == \
        {k: v for k, v in eight_dev.items() if k not in sims}
    T.assert_close([eight_dev[k] for k in sims], np.array([one_dev[k] for k in sims]), rtol)
  assert select_stage.run(config, killed)["released"] == summary["released"]  # COMPLETE: at once


def test_a_checkpoint_of_another_model_is_refused(trained, tmp_path):
  config, workdir = trained
  wd = clone(workdir, tmp_path / "wd")
  other = load_config("tiny")
  other.model.preset = "demo"
  with pytest.raises(UserError):
    sample_stage.run(other, wd)
  other = load_config("tiny")
  other.data.features.dim = 32
  with pytest.raises(UserError, match="32"):
    select_stage.run(other, wd)
  assert not os.path.exists(os.path.join(wd, "synthetic", "chunks"))
  assert not os.path.exists(os.path.join(wd, "release"))

"""Streaming reads (issue 16 item 1): lazy record columns and resident tables equal the in-memory
arrays (`dataset.load_arrays`), reads decode only a batch's rows, and the stages' computations
(re-id and classifier training, embedding passes, selection's inputs, the audit's spaces) give the
same numbers on streamed columns as on arrays held in memory."""

import os

import jax
import numpy as np
import pytest

import tolerances as T
from conftest import load_config
from pso_jax import parallel
from pso_jax.data import dataset, pipeline
from pso_jax.errors import UserError
from pso_jax.stages import prepare

KEYS = ("image", "labels", "patient_id", "path", "feature", "index")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("streaming"))
  prepare.run(load_config("tiny"), path)
  return path


def _columns_and_arrays(workdir, split, keys):
  return dataset.load_columns(workdir, split, keys), dataset.load_arrays(workdir, split, keys)


def test_columns_and_table_equal_the_arrays(workdir):
  cols, arrays = _columns_and_arrays(workdir, "train", KEYS)
  image, want = cols["image"], arrays["image"]
  assert isinstance(image, dataset.RecordColumn)
  assert image.shape == want.shape and image.dtype == want.dtype and len(image) == len(want)
  for k in KEYS[1:]:  # the resident table: the same values, dtypes and order
    assert not isinstance(cols[k], dataset.RecordColumn)
    assert cols[k].dtype == arrays[k].dtype and np.array_equal(cols[k], arrays[k]), k
  picks = [np.array([5, 3, 3, -1, 0]), slice(2, 40, 7), np.arange(len(want)) % 3 == 1,
           np.zeros(0, np.int64)]
  for pick in picks:
    T.assert_identical(image[pick], want[pick])
  T.assert_identical(image[7], want[7])
  T.assert_identical(np.asarray(image), want)
  keep = np.arange(len(want)) % 2 == 0
  view = dataset.take_rows(cols, keep)
  T.assert_identical(view["image"][np.array([4, 1])], want[keep][[4, 1]])
  assert np.array_equal(view["patient_id"], arrays["patient_id"][keep])
  with pytest.raises(IndexError):
    image[np.array([len(want)])]
  with pytest.raises(UserError, match="no 'latent'"):
    dataset.load_columns(workdir, "train", ("image", "latent"))


def test_batched_passes_read_only_their_batch(workdir):
  """FrozenNetwork (apply_in_batches) and pipeline.in_batches over a column decode one batch at a
  time, and give the outputs of the whole array."""
  from pso_jax.models.batched_apply import FrozenNetwork
  image = dataset.load_columns(workdir, "val", ("image",))["image"]
  want = dataset.load_arrays(workdir, "val", ("image",))["image"]
  net = FrozenNetwork(lambda v, x: x.reshape(x.shape[0], -1).astype(jax.numpy.float32).sum(1) * v,
                      np.float32(0.5), batch_size=8)
  dataset.LazyColumn.largest_read = 0
  got = net(image)
  assert dataset.LazyColumn.largest_read == 8
  T.assert_identical(got, want.reshape(len(want), -1).astype(np.float32).sum(1) * 0.5)
  dataset.LazyColumn.largest_read = 0
  rows = pipeline.in_batches(lambda x: x[:, 0, 0, 0].astype(np.int32), image, batch_size=5)
  assert dataset.LazyColumn.largest_read == 5
  T.assert_identical(rows, want[:, 0, 0, 0].astype(np.int32))


def test_in_batches_default_is_a_byte_budget():
  """pipeline.in_batches' default batch: the demo's small images in one batch (a float32 matmul
  then rounds as on the whole array), 512-px RGB images 85 at a time (64 MiB)."""
  sizes = []
  record = lambda x: (sizes.append(len(x)), np.zeros(len(x)))[1]
  pipeline.in_batches(record, np.broadcast_to(np.uint8(0), (1000, 32, 32, 1)))
  assert sizes == [1000]
  sizes.clear()
  pipeline.in_batches(record, np.broadcast_to(np.uint8(0), (200, 512, 512, 3)))
  assert sizes == [85, 85, 30]
  rng = np.random.default_rng(0)
  a, p = rng.random((1000, 64), np.float32), rng.standard_normal((64, 16)).astype(np.float32)
  T.assert_identical(pipeline.in_batches(lambda x: x @ p, a), a @ p)


def test_trainer_decodes_only_each_process_rows(workdir):
  """supervised.batch_reader: a sampler of record indices -> the images of this process's rows of
  the batch, read from the column, as the in-memory sampler's images."""
  from pso_jax.privacy import reid_training
  from pso_jax.training import supervised
  cols, arrays = _columns_and_arrays(workdir, "train", ("image", "patient_id"))
  sampler = reid_training.make_sampler(cols["patient_id"], 16, 4, seed=3)
  mesh = parallel.data_mesh()
  read = supervised.batch_reader(sampler, cols["image"], parallel.batch_sharding(mesh), 16)
  for step in range(3):
    dataset.LazyColumn.largest_read = 0
    batch, idx = read(step), sampler(step)["index"]
    assert dataset.LazyColumn.largest_read == 16  # one batch, not the split
    T.assert_identical(batch["image"], arrays["image"][idx])
    # P x K: 4 patients, 4 scans each, labels naming the patient of each row
    pids = arrays["patient_id"][idx].reshape(4, 4)
    assert (pids == pids[:, :1]).all() and len(set(pids[:, 0])) == 4
    assert "index" not in batch and batch["label"].shape == (16,)


def test_reid_and_classifier_training_equal_in_memory(workdir):
  """The same training on streamed columns and on arrays in memory: bit-identical weights,
  calibration and test figures (same batches, same programs)."""
  from pso_jax.evaluate import classifier_training
  from pso_jax.privacy import reid_training
  config = load_config("tiny")
  config.reid.steps = config.classifier.steps = 6
  out = {}
  for how in ("stream", "memory"):
    if how == "stream":
      reid_splits = reid_training.load_splits(workdir)
      cls_splits = classifier_training.load_labelled_splits(workdir)
      assert isinstance(reid_splits["train"]["image"], dataset.RecordColumn)
    else:
      reid_splits = {s: dataset.load_arrays(workdir, s, ("image", "patient_id"))
                     for s in ("train", "val", "test")}
      cls_splits = {s: dataset.load_arrays(workdir, s, ("image", "labels"))
                    for s in ("train", "val", "test")}
    base = os.path.join(workdir, "out_" + how)
    reid_result = reid_training.train_reid(config, reid_splits, os.path.join(base, "reid"))
    cls_result = classifier_training.train_and_test(config, cls_splits,
                                                    os.path.join(base, "classifier"))
    out[how] = (reid_result, cls_result)
  (r_s, c_s), (r_m, c_m) = out["stream"], out["memory"]
  for k in ("tau", "auc", "tpr", "fpr", "final_loss"):
    T.assert_identical(np.float64(r_s[k]), np.float64(r_m[k]), k)
  T.assert_identical(np.float64(c_s["mean_auroc"]), np.float64(c_m["mean_auroc"]))
  T.assert_identical(np.float64(c_s["training"]["best_val_loss"]),
                     np.float64(c_m["training"]["best_val_loss"]))
  T.assert_identical(np.float64(c_s["training"]["final_train_loss"]),
                     np.float64(c_m["training"]["final_train_loss"]))


def test_audit_attackers_equal_in_memory(workdir):
  """The pixels and features attackers embed streamed columns (in batches) as the whole arrays;
  the pixels space checked against a numpy reference written here."""
  from pso_jax.privacy import attackers
  config = load_config("tiny")
  cols, arrays = _columns_and_arrays(workdir, "train", ("image",))
  size = int(config.audit.pixel_size)
  x = arrays["image"].astype(np.float64)
  n, h, w, c = x.shape
  pooled = x.reshape(n, size, h // size, size, w // size, c).mean(axis=(2, 4)).reshape(n, -1)
  pooled -= pooled.mean(1, keepdims=True)
  want = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
  got = attackers.PixelEmbedder(size).embed(cols["image"])
  T.assert_close(got, want.astype(np.float32), T.EPS32)
  T.assert_identical(got, attackers.PixelEmbedder(size).embed(arrays["image"]))
  stream = attackers.FeatureEmbedder(config, cols["image"])
  memory = attackers.FeatureEmbedder(config, arrays["image"])
  T.assert_identical(stream.raw_train, memory.raw_train)
  val = dataset.load_columns(workdir, "val", ("image",))["image"]
  T.assert_identical(stream.embed(val), memory.embed(np.asarray(val)))


def test_selection_inputs_equal_in_memory(tiny_trained_workdir):
  """select's inputs from streamed columns (re-id embeddings and classifier outputs of every
  training image, conditions, labels) equal those from the arrays in memory."""
  from pso_jax.privacy import selection_workdir
  config, wd = tiny_trained_workdir
  keys = ("image", "labels", "patient_id", "path", "feature")
  cols, arrays = _columns_and_arrays(wd, "train", keys)
  dataset.LazyColumn.largest_read = 0
  stream = selection_workdir.build_inputs(config, wd, cols, generate=None)
  assert 0 < dataset.LazyColumn.largest_read <= len(arrays["image"])
  memory = selection_workdir.build_inputs(config, wd, arrays, generate=None)
  for k in ("real_embeddings", "real_probs", "conditions", "labels", "patients"):
    T.assert_identical(getattr(stream, k), getattr(memory, k), k)
  assert stream.paths == memory.paths


def test_audit_spaces_equal_in_memory(tiny_trained_workdir):
  """The audit's spaces (every attacker's embeddings of training and holdout images) from streamed
  columns equal those from arrays, the holdout a view under the training split's label rule."""
  from pso_jax.privacy import attackers, audit, release_audit
  config, wd = tiny_trained_workdir
  train, val = audit.load_real(wd, "train"), audit.load_real(wd, "val")
  holdout = release_audit.load_holdout(config, wd)
  assert isinstance(holdout["image"], dataset.RecordColumn)
  memory = {k: {c: np.asarray(v) for c, v in x.items()}
            for k, x in (("train", train), ("val", val), ("holdout", holdout))}
  out = {}
  for how, d in (("stream", dict(train=train, val=val, holdout=holdout)), ("memory", memory)):
    atk = attackers.build(config, wd, os.path.join(wd, "unused"), d["train"], d["val"],
                          d["holdout"])
    out[how] = release_audit.spaces(config, atk, d["train"], d["holdout"], 8)
  for s, m in zip(out["stream"], out["memory"]):
    assert s.attacker.name == m.attacker.name and s.attacker.tau == m.attacker.tau
    T.assert_identical(s.train_embeddings, m.train_embeddings, s.attacker.name)
    T.assert_identical(s.reference.holdout, m.reference.holdout, s.attacker.name)
    assert s.reference.tau == m.reference.tau
  # a "release" of val images as PNG files, read lazily (as the audit stage reads release/), with
  # canaries planted: the same audit as on the images in memory
  from pso_jax.data import release
  files, n = [], min(12, len(memory["val"]["image"]))
  for i, image in enumerate(memory["val"]["image"][:n]):
    files.append(os.path.join(wd, "unused", f"r{i}.png"))
    release.write_png(files[-1], image)
  lazy = dataset.FileColumn(files, lambda p: release.read_png(p, 1), memory["val"]["image"].shape[1:])
  source = np.arange(n)
  config.audit.canaries = 3
  results = {}
  for how, images in (("stream", lazy), ("memory", memory["val"]["image"][:n])):
    planted_images, src, names, planted = audit.with_canaries(
        config, dict(images=images, source_index=source, paths=[f"r{i}" for i in source]),
        memory["train"] if how == "memory" else train)
    assert dataset.is_lazy(planted_images) == (how == "stream") and len(planted.position) == 3
    results[how] = release_audit.audit_release(config, out[how], planted_images, source_index=src,
                                               names=names, canaries=planted)
    results[how]["images"] = np.asarray(planted_images)
  T.assert_identical(results["stream"]["images"], results["memory"]["images"])
  assert results["stream"]["summary"] == results["memory"]["summary"]


@pytest.mark.multiprocess
def test_split_pass_over_two_processes_equals_one(workdir, tmp_path):
  """pipeline.split_pass on 2 real JAX processes (127.0.0.1): each decodes only its half of the
  split, and both return the one-process result of the whole split."""
  import socket
  import subprocess
  import sys
  from conftest import ROOT
  from pso_jax.privacy import attackers
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  out = str(tmp_path / "res")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  worker = os.path.join(ROOT, "tests", "streaming_multiprocess_worker.py")
  procs = [subprocess.Popen([sys.executable, worker, str(port), str(i), workdir, out], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  logs = [p.communicate(timeout=240)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), "\n".join(logs)[-3000:]
  images = dataset.load_arrays(workdir, "train", ("image",))["image"]
  pixels = attackers.PixelEmbedder(8).embed(images)
  sums = images.reshape(len(images), -1).astype(np.float32).sum(1) * np.float32(0.5)
  half = -(-len(images) // 2)
  for pid in range(2):
    res = np.load(f"{out}.{pid}.npz")
    T.assert_identical(res["pixels"], pixels)
    T.assert_identical(res["sums"], sums)
    assert res["share"].tolist() == [pid * half, min((pid + 1) * half, len(images))]
    assert 0 < int(res["largest"]) <= half  # its own share only, never the whole split


def test_split_pass_in_pieces_with_progress_equals_whole(workdir, monkeypatch):
  """A pass with a progress bar runs a long share in pieces: the same rows as numpy over the
  whole column (row-wise fn), each piece decoding only its rows; a short pass runs whole."""
  column = dataset.load_columns(workdir, "train", keys=("image",))["image"]
  whole = np.asarray(column[np.arange(len(column))])
  want = whole.reshape(len(whole), -1).astype(np.float64).sum(1)
  seen = []

  def row_sums(x):
    x = np.asarray(x[np.arange(len(x))] if dataset.is_lazy(x) else x)
    seen.append(len(x))
    return x.reshape(len(x), -1).astype(np.float64).sum(1)
  monkeypatch.setattr(pipeline, "PASS_PIECE", 7)
  got = pipeline.split_pass(row_sums, column, desc="test pass")
  np.testing.assert_array_equal(got, want)
  assert seen == [7] * (len(column) // 7) + ([len(column) % 7] if len(column) % 7 else [])
  seen.clear()
  np.testing.assert_array_equal(pipeline.split_pass(row_sums, column), want)  # no desc: whole
  assert seen == [len(column)]

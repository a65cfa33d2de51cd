"""A prepared split's record files are checked against tfds's metadata when the split is opened
(issue 16, bad input): a deleted, cut or swapped ArrayRecord file gives one UserError naming the
file, what is wrong and the fix (rebuild the dataset), not a tfds traceback or a short split."""

import os
import shutil

import numpy as np
import pytest
from array_record.python import array_record_module

from conftest import load_config
from pso_jax.data import builder, dataset, shard_check
from pso_jax.errors import UserError
from pso_jax.stages import prepare

KEYS = ("image", "labels", "patient_id", "index")


def _prepare(workdir: str):
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(builder, "SHARD_BYTES", 20_000)  # tiny's train split: 3 files (38, 38, 12 records)
    prepare.run(load_config("tiny"), workdir)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """The tiny phantom dataset, prepared once, and its splits read before any damage."""
  workdir = str(tmp_path_factory.mktemp("shards") / "run")
  _prepare(workdir)
  return workdir, {s: dataset.load_arrays(workdir, s, KEYS) for s in ("train", "val", "test")}


@pytest.fixture(scope="module")
def train_files(prepared):
  """The train split's record files (names in order) and their record counts, read by the
  ArrayRecord reader itself."""
  folder = builder.builder_dir(dataset.data_dir(prepared[0]))
  names = sorted(f for f in os.listdir(folder) if f.startswith("pso_cxr-train.array_record-"))
  counts = []
  for name in names:
    reader = array_record_module.ArrayRecordReader(os.path.join(folder, name))
    counts.append(reader.num_records())
    reader.close()
  assert len(names) >= 3 and all(counts) and sum(counts) == len(prepared[1]["train"]["index"])
  return names, counts


@pytest.fixture
def copy(prepared, tmp_path):
  """A fresh copy of the prepared workdir (its record folder beside it), and the checks' memory of
  passed folders cleared, so each test checks from scratch."""
  shard_check._passed.clear()
  workdir = shutil.copytree(prepared[0], tmp_path / "run")
  return str(workdir), builder.builder_dir(dataset.data_dir(str(workdir)))


def _rewrite_first(path: str, keep: int):
  """Rewrites an ArrayRecord file with only its first `keep` records (a valid but short file)."""
  reader = array_record_module.ArrayRecordReader(path)
  records = reader.read(range(keep))
  reader.close()
  writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
  for r in records:
    writer.write(r)
  writer.close()


def _fails(workdir, split="train"):
  with pytest.raises(UserError) as err:
    dataset.load_columns(workdir, split, KEYS)
  message = str(err.value)
  assert f"delete {dataset.data_dir(workdir)} and rerun --mode=prepare" in message
  return message


def test_metadata_names_the_files(copy, train_files):
  """The files and counts the check compares against are the reader's own."""
  _, folder = copy
  assert shard_check._shards("", folder, "train") == [
      (os.path.join(folder, n), c) for n, c in zip(*train_files)]
  assert shard_check._shards("", folder, "attacker") == []  # an empty split is never written


def test_deleted_file_is_named(copy, train_files):
  workdir, folder = copy
  names, _ = train_files
  os.remove(os.path.join(folder, names[1]))
  message = _fails(workdir)
  assert f"{names[1]}: missing" in message
  assert f"1 damaged record file(s) of {len(names)}" in message
  assert all(n not in message for n in names if n != names[1])
  dataset.load_columns(workdir, "val", KEYS)  # other splits still open


def test_cut_file_is_named(copy, train_files):
  """Half a file's bytes (its footer lost): unreadable; a valid file with only its first half of
  records, or a file swapped for a shorter one: truncated, with the counts."""
  workdir, folder = copy
  names, counts = train_files
  path = [os.path.join(folder, n) for n in names]
  with open(path[0], "r+b") as f:
    f.truncate(os.path.getsize(path[0]) // 2)
  message = _fails(workdir)
  assert f"{names[0]}: unreadable" in message and f"should hold {counts[0]} records" in message
  _rewrite_first(path[1], counts[1] // 2)
  shutil.copyfile(path[-1], path[0])  # the last file holds the fewest records
  assert counts[-1] < counts[0]
  message = _fails(workdir)
  assert f"{names[0]}: truncated: has {counts[-1]} of {counts[0]} records" in message
  assert f"{names[1]}: truncated: has {counts[1] // 2} of {counts[1]} records" in message
  assert f"2 damaged record file(s) of {len(names)}" in message


def test_many_files_are_counted_not_all_listed(copy, train_files, monkeypatch):
  workdir, folder = copy
  names, _ = train_files
  monkeypatch.setattr(shard_check, "SHOWN", 2)
  for n in names:
    os.remove(os.path.join(folder, n))
  message = _fails(workdir)
  assert names[0] in message and names[1] in message and names[2] not in message
  assert f"and {len(names) - 2} more" in message
  assert f"{len(names)} damaged record file(s) of {len(names)}" in message


def test_intact_copy_gives_the_same_records_and_is_checked_once(copy, prepared, train_files,
                                                                 monkeypatch):
  workdir, folder = copy
  names, _ = train_files
  calls = []
  count = shard_check.count_records
  monkeypatch.setattr(shard_check, "count_records", lambda p: calls.append(p) or count(p))
  for split, want in prepared[1].items():
    got = dataset.load_arrays(workdir, split, KEYS)
    for k in KEYS:
      assert got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k]), (split, k)
  assert len(calls) == len(names) + 2  # every train file, val's and test's one
  cols = dataset.load_columns(workdir, "train", KEYS)  # opened again: the folder is unchanged
  assert len(calls) == len(names) + 2
  assert np.array_equal(np.asarray(cols["image"]), prepared[1]["train"]["image"])
  # damage after a passed check is still seen: the folder's state (sizes, mtimes) changed
  with open(os.path.join(folder, names[-1]), "r+b") as f:
    f.truncate(1000)
  assert f"{names[-1]}: unreadable" in _fails(workdir)


def test_rebuilt_dataset_loads_again(copy, prepared, train_files):
  workdir, folder = copy
  os.remove(os.path.join(folder, train_files[0][-1]))
  _fails(workdir)
  shutil.rmtree(dataset.data_dir(workdir))  # the fix the message gives
  _prepare(workdir)
  got = dataset.load_arrays(workdir, "train", KEYS)
  for k in KEYS:
    assert np.array_equal(got[k], prepared[1]["train"][k]), k

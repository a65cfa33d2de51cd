"""builder.write: ArrayRecord files in tfds's layout written record by record (issue 16: prepare
at scale). The records are byte-identical to tfds's own builder's and open with
tfds.builder_from_directory; memory stays at a record while tfds's builder holds the split."""

import contextlib
import io
import os
import tracemalloc

import numpy as np
import pytest
import tensorflow_datasets as tfds
from array_record.python import array_record_module

from pso_jax.data import builder

SPEC = builder.RecordSpec((64, 64, 1), 16)


def _records(split, n, size=64):
  rng = np.random.default_rng(len(split))
  for i in range(n):
    yield {"image": rng.integers(0, 255, (size, size, 1), dtype=np.uint8),
           "labels": np.eye(8, dtype=np.float32)[i % 8],
           "feature": rng.standard_normal(16).astype(np.float32), "index": i,
           "patient_id": f"{i // 3:08d}", "path": f"images/{i:08d}_000.png", "split": split}


class _TfdsBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """The reference: tfds's own generator builder over the same records (what builder.write used)."""
  name = builder.NAME
  VERSION = tfds.core.Version(builder.VERSION)

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    return None

  def __init__(self, *, spec, examples, data_dir):
    self._spec, self._examples = spec, examples
    super().__init__(data_dir=data_dir, file_format="array_record")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=self._spec.features(),
                                 disable_shuffling=True)

  def _split_generators(self, dl_manager):
    return {s: self._generate_examples(s) for s in self._examples}

  def _generate_examples(self, split):
    for record in self._examples[split]():
      yield int(record["index"]), record


def _tfds_write(data_dir, examples, scratch, spec=SPEC):
  tfds.disable_progress_bar()
  b = _TfdsBuilder(spec=spec, examples=examples, data_dir=data_dir)
  with contextlib.redirect_stdout(io.StringIO()):
    b.download_and_prepare(download_dir=scratch,
                           download_config=tfds.download.DownloadConfig(try_download_gcs=False))


def _raw(data_dir, split):
  folder = builder.builder_dir(data_dir)
  out = []
  for name in sorted(f for f in os.listdir(folder) if f.startswith(f"{builder.NAME}-{split}.")):
    reader = array_record_module.ArrayRecordReader(os.path.join(folder, name))
    out += reader.read(list(range(reader.num_records())))
    reader.close()
  return out


def test_records_equal_tfds_builder_and_open(tmp_path, monkeypatch):
  examples = {"train": lambda: _records("train", 60), "val": lambda: _records("val", 7)}
  monkeypatch.setattr(builder, "SHARD_BYTES", 100_000)  # several files for train
  ours, ref = str(tmp_path / "ours"), str(tmp_path / "ref")
  builder.write(ours, SPEC, examples)
  _tfds_write(ref, examples, str(tmp_path / "scratch"))
  for split, n in (("train", 60), ("val", 7)):
    assert _raw(ours, split) == _raw(ref, split) and len(_raw(ours, split)) == n
    source = builder.open_split(ours, split)
    assert len(source) == n
    for i, want in zip(range(n), _records(split, n)):
      got = source[i]
      assert np.array_equal(got["image"], want["image"]) and got["index"] == i
      assert got["patient_id"].decode() == want["patient_id"]
  files = [f for f in os.listdir(builder.builder_dir(ours)) if "-train." in f]
  assert len(files) > 1 and not [f for f in os.listdir(builder.builder_dir(ours)) if ".part" in f]
  assert builder.record_shapes(ours) == builder.record_shapes(ref)


def test_memory_holds_a_record_not_the_split(tmp_path):
  """200 records of 64 KiB (13 MB): builder.write peaks under 4 MB of Python allocations; tfds's
  builder over the same records holds them all."""
  examples = {"train": lambda: _records("train", 200, size=256)}
  spec = builder.RecordSpec((256, 256, 1), 16)
  writers = {"ours": lambda d: builder.write(d, spec, examples),
             "tfds": lambda d: _tfds_write(d, examples, str(tmp_path / "scratch"), spec)}
  peaks = {}
  for name, write in writers.items():
    tracemalloc.start()
    write(str(tmp_path / name))
    peaks[name] = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
  assert peaks["ours"] < 4 << 20, peaks
  assert peaks["tfds"] > 13 << 20, peaks

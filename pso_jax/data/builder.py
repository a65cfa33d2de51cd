"""The prepared dataset as ArrayRecord files in tensorflow_datasets' layout (no TensorFlow).

Records: `image` uint8 [H, W, C] (stored raw or as PNG: config.data.image_codec), `labels` float32
[8], `patient_id`, `path`, `split` (text), `index` int64 (position in the split), `feature` float32
[dim] and, for latent kinds other than identity, `latent` float32 [h, w, c]. Shuffling is disabled
so a record's position is its index and the order is the split filelist's. Readers open the folder
with `tfds.builder_from_directory` (`open_split`), so they need no builder class, only the files.
"""

import dataclasses
import json
import os
from typing import Callable, Iterator

import numpy as np
import tensorflow_datasets as tfds

from pso_jax.data import record_codec

NAME = "pso_cxr"
VERSION = "1.0.0"
TEXT_KEYS = ("patient_id", "path", "split")


@dataclasses.dataclass(frozen=True)
class RecordSpec:
  image_shape: tuple[int, int, int]
  feature_dim: int
  latent_shape: tuple[int, int, int] | None = None
  image_codec: str = "raw"  # raw | png (pso_jax.data.record_codec)

  def features(self) -> tfds.features.FeaturesDict:
    spec = {
        "image": record_codec.image_feature(self.image_shape, self.image_codec),
        "labels": tfds.features.Tensor(shape=(8,), dtype=np.float32),
        "feature": tfds.features.Tensor(shape=(self.feature_dim,), dtype=np.float32),
        "index": tfds.features.Scalar(dtype=np.int64),
        **{k: tfds.features.Text() for k in TEXT_KEYS},
    }
    if self.latent_shape is not None:
      spec["latent"] = tfds.features.Tensor(shape=tuple(self.latent_shape), dtype=np.float32)
    return tfds.features.FeaturesDict(spec)


SHARD_BYTES = 256 << 20  # serialized bytes per ArrayRecord file: a new file starts past this
_TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"  # tfds's file names


def part_name(split: str, start: int, stop: int) -> str:
  return f".{split}.{start:012d}-{stop:012d}"


def read_manifest(folder: str, split: str, start: int, stop: int) -> dict | None:
  """The manifest of a finished part (`write_part`), or None when the part is not finished."""
  path = os.path.join(folder, part_name(split, start, stop) + ".json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def write_part(folder: str, spec: "RecordSpec", split: str, start: int, stop: int,
               records: Iterator[dict]) -> dict:
  """Streams records [start, stop) of one split into ArrayRecord files of about SHARD_BYTES each,
  under temporary names (`finish` gives them tfds's names once every part is known), and writes
  the part's manifest last: a part with a manifest is complete and is not written again, so an
  interrupted prepare resumes per part. Memory holds one record at a time. Returns the manifest."""
  from array_record.python import array_record_module
  from pso_jax import io_utils
  done = read_manifest(folder, split, start, stop)
  if done is not None:
    return done
  base = os.path.join(folder, part_name(split, start, stop))
  features = spec.features()
  files, lengths, sizes, writer = [], [], [], None
  for record in records:
    data = features.serialize_example(record)
    if writer is None or sizes[-1] >= SHARD_BYTES:
      if writer is not None:
        writer.close()
      files.append(f"{os.path.basename(base)}.file{len(files)}")
      writer = array_record_module.ArrayRecordWriter(os.path.join(folder, files[-1]),
                                                     "group_size:1")  # random access
      lengths.append(0)
      sizes.append(0)
    writer.write(data)
    lengths[-1] += 1
    sizes[-1] += len(data)
  if writer is not None:
    writer.close()
  if sum(lengths) != stop - start:
    raise ValueError(f"split {split!r} part [{start}, {stop}) got {sum(lengths)} records")
  manifest = {"split": split, "start": start, "stop": stop, "files": files, "lengths": lengths,
              "sizes": sizes}
  io_utils.write_json(base + ".json", manifest)
  return manifest


def finish(folder: str, spec: "RecordSpec", parts: dict[str, list[dict]]) -> str:
  """Gives the parts' files (per split, in record order) tfds's names and writes the metadata;
  removes whatever else is hidden in the folder (manifests, parts of an abandoned cut)."""
  infos = []
  for split, manifests in parts.items():
    manifests = sorted(manifests, key=lambda m: m["start"])
    files = [f for m in manifests for f in m["files"]]
    if not files:
      raise ValueError(f"split {split!r} has no records (tfds cannot describe an empty split)")
    for i, name in enumerate(files):
      final = os.path.join(folder, f"{NAME}-{split}.array_record-{i:05d}-of-{len(files):05d}")
      if os.path.exists(os.path.join(folder, name)) or not os.path.exists(final):
        os.replace(os.path.join(folder, name), final)  # (renamed already by an interrupted finish)
    template = tfds.core.ShardedFileTemplate(data_dir=folder, template=_TEMPLATE, dataset_name=NAME,
                                             split=split, filetype_suffix="array_record")
    infos.append(tfds.core.SplitInfo(
        name=split, shard_lengths=[n for m in manifests for n in m["lengths"]],
        num_bytes=sum(n for m in manifests for n in m["sizes"]), filename_template=template))
  for name in os.listdir(folder):
    if name.startswith(".") and os.path.isfile(os.path.join(folder, name)):
      os.remove(os.path.join(folder, name))
  tfds.folder_dataset.write_metadata(
      data_dir=folder, features=spec.features(), split_infos=infos, version=VERSION,
      check_data=False, description="pso_jax prepared chest radiographs", disable_shuffling=True)
  return folder


def write(data_dir: str, spec: RecordSpec, examples: dict[str, Callable[[], Iterator[dict]]]) -> str:
  """Writes the splits (record iterators, in record order) as ArrayRecord files under data_dir in
  tfds's layout, so `tfds.builder_from_directory` opens them; returns the builder folder. One
  writer: `write_part` + `finish` are the same in pieces, for several processes.

  Each record is serialized and written as it comes: memory does not grow with the split. (tfds's
  own builder collects a split in memory before writing it: with shuffling disabled every record
  lands in one bucket of its shuffler, read back whole, a split's bytes at once.) Each split is
  counted by a first pass over its iterator (a part is named by its record range)."""
  folder = builder_dir(data_dir)
  os.makedirs(folder, exist_ok=True)
  parts = {}
  for split, make in examples.items():
    n = sum(1 for _ in make())
    parts[split] = [write_part(folder, spec, split, 0, n, make())]
  return finish(folder, spec, parts)


def builder_dir(data_dir: str) -> str:
  return os.path.join(data_dir, NAME, VERSION)


def open_split(data_dir: str, split: str):
  """The tfds ArrayRecord data source of one split (records as dicts, text as bytes)."""
  return tfds.builder_from_directory(builder_dir(data_dir)).as_data_source(split)


def record_shapes(data_dir: str) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """(shape, dtype) of each non-text record key, from the stored feature spec."""
  feats = tfds.builder_from_directory(builder_dir(data_dir)).info.features
  return {k: (tuple(f.shape), np.dtype(f.np_dtype)) for k, f in feats.items() if k not in TEXT_KEYS}


def record_keys(data_dir: str) -> tuple[str, ...]:
  return tuple(tfds.builder_from_directory(builder_dir(data_dir)).info.features.keys())

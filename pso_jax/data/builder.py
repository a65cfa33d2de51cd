"""The prepared dataset as ArrayRecord files in tensorflow_datasets' layout (no TensorFlow).

Records: `image` uint8 [H, W, C] (stored raw or as PNG: config.data.image_codec), `labels` float32
[8], `patient_id`, `path`, `split` (text), `index` int64 (position in the split), `feature` float32
[dim] and, for latent kinds other than identity, `latent` float32 [h, w, c]. Shuffling is disabled
so a record's position is its index and the order is the split filelist's. Readers open the folder
with `tfds.builder_from_directory` (`open_split`), so they need no builder class, only the files.
"""

import dataclasses
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


def _write_split(folder: str, features, split: str, records: Iterator[dict]) -> tfds.core.SplitInfo:
  """Streams one split's records into ArrayRecord files of about SHARD_BYTES each (under
  temporary names, renamed once their number is known): memory holds one record at a time."""
  from array_record.python import array_record_module
  parts, lengths, sizes, writer = [], [], [], None
  for record in records:
    data = features.serialize_example(record)
    if writer is None or sizes[-1] >= SHARD_BYTES:
      if writer is not None:
        writer.close()
      parts.append(os.path.join(folder, f".{split}.part{len(parts)}"))
      writer = array_record_module.ArrayRecordWriter(parts[-1], "group_size:1")  # random access
      lengths.append(0)
      sizes.append(0)
    writer.write(data)
    lengths[-1] += 1
    sizes[-1] += len(data)
  if writer is None:
    raise ValueError(f"split {split!r} has no records (tfds cannot describe an empty split)")
  writer.close()
  for i, part in enumerate(parts):
    os.replace(part, os.path.join(folder, f"{NAME}-{split}.array_record-{i:05d}-of-{len(parts):05d}"))
  template = tfds.core.ShardedFileTemplate(data_dir=folder, template=_TEMPLATE, dataset_name=NAME,
                                           split=split, filetype_suffix="array_record")
  return tfds.core.SplitInfo(name=split, shard_lengths=lengths, num_bytes=sum(sizes),
                             filename_template=template)


def write(data_dir: str, spec: RecordSpec, examples: dict[str, Callable[[], Iterator[dict]]],
          scratch_dir: str | None = None) -> str:
  """Writes the splits (record iterators, in record order) as ArrayRecord files under data_dir in
  tfds's layout, so `tfds.builder_from_directory` opens them; returns the builder folder.

  Each record is serialized and written as it comes: memory does not grow with the split. (tfds's
  own builder collects a split in memory before writing it: with shuffling disabled every record
  lands in one bucket of its shuffler, read back whole, a split's bytes at once.) scratch_dir is
  unused (kept for callers)."""
  del scratch_dir
  folder = builder_dir(data_dir)
  os.makedirs(folder, exist_ok=True)
  features = spec.features()
  infos = [_write_split(folder, features, split, make()) for split, make in examples.items()]
  tfds.folder_dataset.write_metadata(
      data_dir=folder, features=features, split_infos=infos, version=VERSION, check_data=False,
      description="pso_jax prepared chest radiographs", disable_shuffling=True)
  return folder


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

"""The prepared dataset as a tensorflow_datasets builder writing ArrayRecord (no TensorFlow).

Records: `image` uint8 [H, W, C] (stored raw or as PNG: config.data.image_codec), `labels` float32
[8], `patient_id`, `path`, `split` (text), `index` int64 (position in the split), `feature` float32
[dim] and, for latent kinds other than identity, `latent` float32 [h, w, c]. Shuffling is disabled
so a record's position is its index and the order is the split filelist's. Readers open the folder
with `tfds.builder_from_directory` (`open_split`), so they need no builder class, only the files.
"""

import contextlib
import dataclasses
import io
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


class PreparedCxr(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Writes the splits given as record iterators; `prepare` builds it inside a staging folder."""
  name = NAME
  VERSION = tfds.core.Version(VERSION)

  # tfds looks for a checksums file beside the builder's code through `importlib_resources`,
  # which is not installed (it is not needed: nothing is downloaded)
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    return None

  def __init__(self, *, spec: RecordSpec, examples: dict[str, Callable[[], Iterator[dict]]],
               data_dir: str):
    self._spec = spec
    self._examples = examples
    super().__init__(data_dir=data_dir, file_format="array_record")

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description="pso_jax prepared chest radiographs",
        features=self._spec.features(), disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split) for split in self._examples}

  def _generate_examples(self, split):
    for record in self._examples[split]():
      yield int(record["index"]), record


def write(data_dir: str, spec: RecordSpec, examples: dict[str, Callable[[], Iterator[dict]]],
          scratch_dir: str) -> str:
  """Builds the ArrayRecord splits under data_dir (tfds scratch files in scratch_dir); returns
  the builder folder."""
  tfds.disable_progress_bar()  # prepare shows its own bar
  builder = PreparedCxr(spec=spec, examples=examples, data_dir=data_dir)
  with contextlib.redirect_stdout(io.StringIO()):  # tfds prints "Downloading and preparing..."
    builder.download_and_prepare(
        download_dir=scratch_dir, download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return str(builder.data_dir)


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

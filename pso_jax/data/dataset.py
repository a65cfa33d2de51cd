"""Reading the prepared dataset: random access per record, or a whole split in memory."""

import os

import numpy as np

from pso_jax import io_utils
from pso_jax.data import builder
from pso_jax.data.filelists import ALL_SPLITS
from pso_jax.errors import UserError

COMPLETE = io_utils.COMPLETE  # written last by prepare
SUBDIR = "data"
CARD_FILE = "card.json"  # the prepare stage's result: counts per split, finding, patients


def data_dir(workdir: str) -> str:
  """Where the prepare stage writes the dataset."""
  return os.path.join(workdir, SUBDIR)


def is_complete(workdir: str) -> bool:
  return os.path.exists(os.path.join(data_dir(workdir), COMPLETE))


def _check(workdir: str, split: str) -> str:
  if split not in ALL_SPLITS:
    raise UserError(f"unknown split {split!r}; use one of {', '.join(ALL_SPLITS)}")
  if not is_complete(workdir):
    raise UserError(f"{data_dir(workdir)} holds no complete dataset; run "
                    f"--mode=prepare with --workdir={workdir} first")
  return data_dir(workdir)


class SplitSource:
  """Random-access source over one split's ArrayRecord files: len, [i] -> dict of numpy.

  Text fields come back as str. Picklable (grain workers reopen the files).
  """

  def __init__(self, workdir: str, split: str):
    self.workdir, self.split = workdir, split
    self._source = builder.open_split(_check(workdir, split), split)

  def __len__(self) -> int:
    return len(self._source)

  @staticmethod
  def _decode(record: dict) -> dict:
    for key in builder.TEXT_KEYS:
      if isinstance(record.get(key), bytes):
        record[key] = record[key].decode("utf-8")
    return record

  def __getitem__(self, i: int) -> dict:
    return self._decode(self._source[int(i)])

  def __getitems__(self, indices) -> list[dict]:
    return [self._decode(r) for r in self._source.__getitems__([int(i) for i in indices])]

  def __getstate__(self):
    return {"workdir": self.workdir, "split": self.split}

  def __setstate__(self, state):
    self.__init__(state["workdir"], state["split"])

  def __repr__(self):
    return f"SplitSource({self.workdir!r}, {self.split!r}, n={len(self)})"


class InMemorySource:
  """The same records as SplitSource, served from arrays held in memory (small data: grain then
  spends its time batching, not decoding records)."""

  def __init__(self, workdir: str, split: str):
    keys = builder.record_keys(_check(workdir, split))
    self.workdir, self.split = workdir, split
    self.arrays = load_arrays(workdir, split, keys)

  def __len__(self) -> int:
    return len(self.arrays["index"])

  def __getitem__(self, i: int) -> dict:
    return {k: (str(v[i]) if k in builder.TEXT_KEYS else v[i]) for k, v in self.arrays.items()}

  def __repr__(self):
    return f"InMemorySource({self.workdir!r}, {self.split!r}, n={len(self)})"


def load_split(workdir: str, split: str, *, in_memory: bool = False):
  """Random-access source over a prepared split (len, [i] -> dict of numpy / str)."""
  return InMemorySource(workdir, split) if in_memory else SplitSource(workdir, split)


def load_arrays(workdir: str, split: str, keys=("image", "labels", "patient_id"),
                block: int = 1024) -> dict[str, np.ndarray]:
  """The whole split in memory as stacked arrays (text keys as numpy str arrays)."""
  source = load_split(workdir, split)
  cols = {k: [] for k in keys}
  for start in range(0, len(source), block):
    for record in source.__getitems__(range(start, min(start + block, len(source)))):
      for k in keys:
        if k not in record:
          raise UserError(f"records of {workdir} have no {k!r}; keys are {sorted(record)}")
        cols[k].append(record[k])
  out = {}
  for k, values in cols.items():
    if k in builder.TEXT_KEYS:
      out[k] = np.array(values, dtype=str)
    elif values:
      out[k] = np.stack(values)
    else:  # an empty split still has the record shapes
      shape, dtype = builder.record_shapes(data_dir(workdir))[k]
      out[k] = np.zeros((0, *shape), dtype)
  return out


def load_card(workdir: str) -> dict:
  return io_utils.read_json(os.path.join(_check(workdir, "train"), CARD_FILE))


def load_features(workdir: str, split: str) -> np.ndarray:
  """Unit-norm features [N, dim] of a split, in record order (no record decoding)."""
  return np.load(os.path.join(_check(workdir, split), f"features_{split}.npy"))

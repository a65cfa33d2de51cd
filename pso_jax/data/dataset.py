"""Reading the prepared dataset: random access per record, streamed columns, small resident tables.

Stages read a split with `load_columns`: the image-sized keys (`STREAMED_KEYS`) come back as
`RecordColumn`s, lazy arrays that decode only the rows a batch asks for, and the small keys
(labels, patient ids, paths, features) as a resident table read in one streamed pass through grain
(`load_table`). Memory then grows with the batch sizes, not with the split; docs/streaming.md lists
what stays resident. `load_arrays` (everything in memory) remains for tests and small tools.
"""

import os
import threading

import grain
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


STREAMED_KEYS = ("image", "latent")  # image-sized: decoded per batch, never held for a whole split


class RecordColumn:
  """One key of a split's records as a read-only lazy array [N, ...].

  len, shape, dtype and ndim come from the record spec without reading; `column[i]` decodes one
  record, `column[slice | int array | bool mask]` decodes just those rows (duplicates and order
  kept) and stacks them. `subset(rows)` is a view over some rows (nothing read). `np.asarray` of a
  whole column works but reads every row: streaming code asks for batches instead.
  `RecordColumn.largest_read` is the most rows any read decoded at once (tests and the memory
  bench check that stages read in batches).
  """
  largest_read = 0
  _lock = threading.Lock()

  def __init__(self, source, key: str, shape, dtype, rows=None):
    self._source, self.key = source, key
    self._row_shape, self.dtype = tuple(shape), np.dtype(dtype)
    self._rows = None if rows is None else np.asarray(rows, np.int64)

  def __len__(self) -> int:
    return len(self._source) if self._rows is None else len(self._rows)

  @property
  def shape(self) -> tuple:
    return (len(self), *self._row_shape)

  @property
  def ndim(self) -> int:
    return 1 + len(self._row_shape)

  def _positions(self, item) -> np.ndarray:
    n = len(self)
    if isinstance(item, slice):
      return np.arange(n)[item]
    idx = np.asarray(item)
    if idx.dtype == bool:
      if idx.shape != (n,):
        raise IndexError(f"a boolean mask of shape {idx.shape} for a column of {n} rows")
      return np.flatnonzero(idx)
    if idx.dtype.kind not in "iu":
      raise IndexError(f"column rows are chosen by int or bool arrays, got {idx.dtype}")
    idx = idx.astype(np.int64).reshape(-1)
    if idx.size and (idx.min() < -n or idx.max() >= n):
      raise IndexError(f"row index out of range for a column of {n} rows")
    return np.where(idx < 0, idx + n, idx)

  def _records(self, positions: np.ndarray) -> np.ndarray:
    keys = positions if self._rows is None else self._rows[positions]
    with RecordColumn._lock:
      RecordColumn.largest_read = max(RecordColumn.largest_read, int(len(keys)))
    if not len(keys):
      return np.zeros((0, *self._row_shape), self.dtype)
    records = self._source.__getitems__([int(k) for k in keys])
    return np.stack([np.asarray(r[self.key], self.dtype) for r in records])

  def __getitem__(self, item):
    if isinstance(item, (int, np.integer)):
      return self._records(self._positions([item]))[0]
    return self._records(self._positions(item))

  def subset(self, rows) -> "RecordColumn":
    """A view over `rows` of this column (int indices or a bool mask), in that order."""
    positions = self._positions(rows)
    base = positions if self._rows is None else self._rows[positions]
    return RecordColumn(self._source, self.key, self._row_shape, self.dtype, base)

  def __array__(self, dtype=None, copy=None):
    out = self._records(np.arange(len(self)))
    return out if dtype is None else out.astype(dtype)

  def __repr__(self):
    return f"RecordColumn({self.key!r}, shape={self.shape}, dtype={self.dtype}, {self._source!r})"


def take_rows(table: dict, rows) -> dict:
  """The rows `rows` (indices or a bool mask) of a table whose values are numpy arrays or
  RecordColumns (a column becomes a view: nothing is read)."""
  return {k: v.subset(rows) if isinstance(v, RecordColumn) else np.asarray(v)[rows]
          for k, v in table.items()}


def load_table(workdir: str, split: str, keys, *, read_threads: int = 8,
               buffer: int = 64) -> dict[str, np.ndarray]:
  """Small keys of every record of a split as resident arrays (text keys as numpy str arrays), read
  in one streamed pass through grain: each record is decoded, its other keys (the image) dropped
  at once, so memory holds the table plus a few records in flight."""
  source = load_split(workdir, split)
  keys = tuple(keys)
  names = builder.record_keys(data_dir(workdir))
  missing = [k for k in keys if k not in names]
  if missing:
    raise UserError(f"records of {workdir} have no {missing[0]!r}; keys are {sorted(names)}")
  cols = {k: [] for k in keys}
  if len(source):
    stream = grain.MapDataset.source(source).map(lambda r: {k: r[k] for k in keys})
    options = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=buffer)
    for record in stream.to_iter_dataset(options):
      for k in keys:
        cols[k].append(record[k])
  return _stack(workdir, cols)


def _stack(workdir: str, cols: dict) -> dict[str, np.ndarray]:
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


def load_columns(workdir: str, split: str, keys=("image", "labels", "patient_id")) -> dict:
  """A split as the stages read it: STREAMED_KEYS as RecordColumns (decoded per batch), the other
  keys as a resident table (`load_table`)."""
  names = builder.record_keys(_check(workdir, split))
  missing = [k for k in keys if k not in names]
  if missing:
    raise UserError(f"records of {workdir} have no {missing[0]!r}; keys are {sorted(names)}")
  small = [k for k in keys if k not in STREAMED_KEYS]
  out = load_table(workdir, split, small) if small else {}
  streamed = [k for k in keys if k in STREAMED_KEYS]
  if streamed:
    source = load_split(workdir, split)
    shapes = builder.record_shapes(data_dir(workdir))
    for k in streamed:
      out[k] = RecordColumn(source, k, *shapes[k])
  return {k: out[k] for k in keys}


def load_arrays(workdir: str, split: str, keys=("image", "labels", "patient_id"),
                block: int = 1024) -> dict[str, np.ndarray]:
  """The whole split in memory as stacked arrays (text keys as numpy str arrays): for tests and
  small tools; stages stream (`load_columns`)."""
  source = load_split(workdir, split)
  cols = {k: [] for k in keys}
  for start in range(0, len(source), block):
    for record in source.__getitems__(range(start, min(start + block, len(source)))):
      for k in keys:
        if k not in record:
          raise UserError(f"records of {workdir} have no {k!r}; keys are {sorted(record)}")
        cols[k].append(record[k])
  return _stack(workdir, cols)


def load_card(workdir: str) -> dict:
  return io_utils.read_json(os.path.join(_check(workdir, "train"), CARD_FILE))


def load_features(workdir: str, split: str) -> np.ndarray:
  """Unit-norm features [N, dim] of a split, in record order (no record decoding)."""
  return np.load(os.path.join(_check(workdir, split), f"features_{split}.npy"))

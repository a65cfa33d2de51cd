"""Reading the prepared dataset: random access per record, streamed columns, small resident tables.

Stages read a split with `load_columns`: the image-sized keys (`STREAMED_KEYS`) come back as
`RecordColumn`s, lazy arrays that decode only the rows a batch asks for, and the small keys
(labels, patient ids, paths, features) as a resident table read in one streamed pass through grain
(`load_table`). Memory then grows with the batch sizes, not with the split; docs/streaming.md lists
what stays resident. `load_arrays` (everything in memory) remains for tests and small tools.
"""

import copy
import os
import threading

import grain
import numpy as np

from pso_jax import io_utils
from pso_jax.data import builder, shard_check
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
    folder = _check(workdir, split)
    shard_check.check(folder, split)  # a deleted or cut record file: one UserError, not a traceback
    self._source = builder.open_split(folder, split)

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


class LazyColumn:
  """A read-only lazy array [N, ...] whose rows are decoded only when asked for.

  len, shape, dtype and ndim are known without reading; `column[i]` decodes one row,
  `column[slice | int array | bool mask]` decodes just those rows (duplicates and order kept) and
  stacks them. `subset(rows)` is a view over some rows (nothing read). `np.asarray` of a whole
  column works but reads every row: streaming code asks for batches instead.
  `LazyColumn.largest_read` is the most rows any read decoded at once (tests and the memory
  bench check that stages read in batches). Subclasses say how many rows there are (`_size`) and
  read rows by their own keys (`_read`).
  """
  largest_read = 0
  _lock = threading.Lock()

  def __init__(self, row_shape, dtype, rows=None):
    self._row_shape, self.dtype = tuple(row_shape), np.dtype(dtype)
    self._rows = None if rows is None else np.asarray(rows, np.int64)

  def _size(self) -> int:
    raise NotImplementedError

  def _read(self, keys: np.ndarray) -> np.ndarray:
    """Rows `keys` (non-empty, in the subclass's own numbering) stacked."""
    raise NotImplementedError

  def __len__(self) -> int:
    return self._size() if self._rows is None else len(self._rows)

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

  def _rows_at(self, positions: np.ndarray) -> np.ndarray:
    keys = positions if self._rows is None else self._rows[positions]
    with LazyColumn._lock:
      LazyColumn.largest_read = max(LazyColumn.largest_read, int(len(keys)))
    if not len(keys):
      return np.zeros((0, *self._row_shape), self.dtype)
    return self._read(keys)

  def __getitem__(self, item):
    if isinstance(item, (int, np.integer)):
      return self._rows_at(self._positions([item]))[0]
    return self._rows_at(self._positions(item))

  def subset(self, rows) -> "LazyColumn":
    """A view over `rows` of this column (int indices or a bool mask), in that order."""
    positions = self._positions(rows)
    view = copy.copy(self)
    view._rows = positions if self._rows is None else self._rows[positions]
    return view

  def __array__(self, dtype=None, copy=None):
    out = self._rows_at(np.arange(len(self)))
    return out if dtype is None else out.astype(dtype)


class RecordColumn(LazyColumn):
  """One key of a split's records (`SplitSource`) as a lazy column: a read decodes only the
  records of the rows asked for."""

  def __init__(self, source, key: str, shape, dtype, rows=None):
    super().__init__(shape, dtype, rows)
    self._source, self.key = source, key

  def _size(self) -> int:
    return len(self._source)

  def _read(self, keys):
    records = self._source.__getitems__([int(k) for k in keys])
    return np.stack([np.asarray(r[self.key], self.dtype) for r in records])

  def __repr__(self):
    return f"RecordColumn({self.key!r}, shape={self.shape}, dtype={self.dtype}, {self._source!r})"


class FileColumn(LazyColumn):
  """One image file per row (e.g. the released PNGs) as a lazy column: `read(path)` -> the row,
  called only for the rows asked for."""

  def __init__(self, paths, read, shape, dtype=np.uint8, rows=None):
    super().__init__(shape, dtype, rows)
    self.paths, self._read_one = list(paths), read

  def _size(self) -> int:
    return len(self.paths)

  def _read(self, keys):
    return np.stack([np.asarray(self._read_one(self.paths[int(k)]), self.dtype) for k in keys])

  def __repr__(self):
    return f"FileColumn(shape={self.shape}, dtype={self.dtype})"


class MergedColumn(LazyColumn):
  """Rows of `extra` (a small array) at the rows where `is_extra` is True, the rows of `base` (an
  array or a lazy column) in order elsewhere: e.g. canaries planted in a streamed release."""

  def __init__(self, base, extra, is_extra, rows=None):
    is_extra = np.asarray(is_extra, bool)
    super().__init__(tuple(base.shape[1:]), base.dtype, rows)
    if int(is_extra.sum()) != len(extra) or len(is_extra) != len(base) + len(extra):
      raise ValueError(f"{int(is_extra.sum())} extra rows marked for {len(extra)} given, "
                       f"{len(is_extra)} rows for {len(base)} + {len(extra)}")
    self._base, self._extra, self._is_extra = base, np.asarray(extra, self.dtype), is_extra
    self._index = np.where(is_extra, np.cumsum(is_extra) - 1, np.cumsum(~is_extra) - 1)

  def _size(self) -> int:
    return len(self._is_extra)

  def _read(self, keys):
    out = np.empty((len(keys), *self._row_shape), self.dtype)
    extra = self._is_extra[keys]
    out[extra] = self._extra[self._index[keys[extra]]]
    if (~extra).any():
      out[~extra] = np.asarray(self._base[self._index[keys[~extra]]])
    return out


def is_lazy(x) -> bool:
  return isinstance(x, LazyColumn)


def column_rows(column, rows):
  """The rows `rows` (indices or a bool mask) of a numpy array or a lazy column (a lazy column
  becomes a view: nothing is read)."""
  return column.subset(rows) if isinstance(column, LazyColumn) else np.asarray(column)[rows]


def take_rows(table: dict, rows) -> dict:
  """The rows `rows` of a table whose values are numpy arrays or lazy columns (`column_rows`)."""
  return {k: column_rows(v, rows) for k, v in table.items()}


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

"""Checks a prepared split's ArrayRecord files against tfds's metadata before anything reads them.

A record file deleted or cut short after prepare finished otherwise surfaces as an obscure
tfds/array_record traceback, or as a split that silently reads fewer records. `check` compares
every file the metadata names with the metadata's shard lengths (a missing file, a file the
ArrayRecord reader cannot open, a different record count) and raises one UserError listing the
damage and the fix. Opening a reader reads only the file's footer and index, and a split passes at
most once per state of its folder (names, sizes, mtimes), so opening a split stays cheap.
"""

import os

import tensorflow_datasets as tfds

from pso_jax.data import builder
from pso_jax.errors import UserError

SHOWN = 3  # damaged files named in the message; the rest are counted
_passed: set = set()  # (folder, split, folder state) already checked and intact


def _folder_state(folder: str) -> tuple:
  try:
    entries = list(os.scandir(folder))
  except OSError:
    return ()
  return tuple(sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in entries
                      if e.is_file()))


def count_records(path: str) -> tuple[int | None, str]:
  """(records in an ArrayRecord file, "") or (None, why the reader cannot open it)."""
  from array_record.python import array_record_module
  try:
    reader = array_record_module.ArrayRecordReader(path, "readahead_buffer_size:0")
  except Exception as e:  # noqa: BLE001 - any reader failure means the same: unreadable
    return None, str(e) or type(e).__name__
  ok, n = reader.ok(), reader.num_records()
  try:  # a reader that failed to open keeps its error until close
    reader.close()
  except Exception as e:  # noqa: BLE001
    return None, str(e) or "the ArrayRecord reader fails to open it"
  return (n, "") if ok else (None, "the ArrayRecord reader fails to open it")


def _problem(path: str, want: int) -> str | None:
  if not os.path.isfile(path):
    return "missing"
  have, why = count_records(path)
  if have is None:
    return f"unreadable ({why}; should hold {want} records: truncated or corrupted)"
  if have < want:
    return f"truncated: has {have} of {want} records"
  if have > want:
    return f"has {have} records where the metadata says {want}"
  return None


def _fix(data_dir: str) -> str:
  return (f"The dataset must be rebuilt: delete {data_dir} and rerun --mode=prepare with the same "
          f"config; the later stages resume from their own outputs.")


def _shards(data_dir: str, folder: str, split: str) -> list[tuple[str, int]]:
  """(path, record count) of each file of the split, as the metadata names them."""
  try:
    splits = tfds.builder_from_directory(folder).info.splits
  except Exception as e:  # noqa: BLE001 - metadata deleted or mangled
    raise UserError(f"the prepared dataset's metadata in {folder} cannot be read ({e}). "
                    + _fix(data_dir)) from e
  if split not in splits:  # never written (tfds refuses empty splits, e.g. no attacker asked for)
    return []
  info = splits[split]
  return [(os.fspath(p), int(n)) for p, n in zip(info.filepaths, info.shard_lengths)]


def check(data_dir: str, split: str) -> None:
  """Raises one UserError if a record file of `split` under data_dir is missing, unreadable or
  holds a different number of records than the metadata says; returns quietly otherwise."""
  folder = builder.builder_dir(data_dir)
  key = (os.path.abspath(folder), split, _folder_state(folder))
  if key in _passed:
    return
  shards = _shards(data_dir, folder, split)
  damaged = [(path, why) for path, want in shards if (why := _problem(path, want)) is not None]
  if damaged:
    listed = "; ".join(f"{os.path.basename(p)}: {why}" for p, why in damaged[:SHOWN])
    more = f"; and {len(damaged) - SHOWN} more" if len(damaged) > SHOWN else ""
    raise UserError(f"split {split!r} in {folder} has {len(damaged)} damaged record file(s) of "
                    f"{len(shards)}: {listed}{more}. " + _fix(data_dir))
  _passed.add(key)

"""Atomic file writes: a reader sees the old file or the complete new one, never a half file."""

import contextlib
import json
import os
import tempfile
from typing import Any, Iterator

import numpy as np


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
  """Yields a temporary path beside `path`; renames it over `path` only if the block succeeds."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
  os.close(fd)
  try:
    yield tmp
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; outputs should read like ordinary files
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_bytes(path: str, data: bytes) -> None:
  with atomic_path(path) as tmp:
    with open(tmp, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())


def write_text(path: str, text: str) -> None:
  write_bytes(path, text.encode("utf-8"))


def _json_default(o: Any):
  if isinstance(o, np.generic):
    return o.item()
  if isinstance(o, np.ndarray):
    return o.tolist()
  if isinstance(o, (tuple, set)):
    return list(o)
  raise TypeError(f"not JSON serialisable: {type(o)}")


def write_json(path: str, obj: Any) -> None:
  write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


COMPLETE = "COMPLETE"  # a finished stage's marker, written last


def finished_result(out_dir: str, result_file: str):
  """A stage's stored result when its COMPLETE marker exists, else None."""
  if os.path.exists(os.path.join(out_dir, COMPLETE)):
    return read_json(os.path.join(out_dir, result_file))
  return None


def finish_stage(out_dir: str, result_file: str, result: Any) -> None:
  """Process 0 writes the stage's result (unless None: the stage wrote it), then the COMPLETE
  marker last (what reruns look for); a result file named COMPLETE is the marker itself."""
  import jax
  if jax.process_index() == 0:
    if result is not None:
      write_json(os.path.join(out_dir, result_file), result)
    if result_file != COMPLETE:
      write_text(os.path.join(out_dir, COMPLETE), "ok\n")


def read_json(path: str) -> Any:
  with open(path, "r", encoding="utf-8") as f:
    return json.load(f)


def write_npy(path: str, array: np.ndarray) -> None:
  with atomic_path(path) as tmp:
    with open(tmp, "wb") as f:
      np.save(f, array)

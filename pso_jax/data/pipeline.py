"""grain loaders over a prepared split: one global sample stream, split by JAX process.

The stream is the same for every process layout: shuffled epochs of the split's records (grain's
index shuffle, reseeded per epoch), cut into consecutive global batches of global_batch_size.
Each process loads only its rows of every global batch (`rows`: the rows of the global array its
devices hold, `process_rows`), so the local batches together form one global batch
(`parallel.local_rows_to_global`) whatever the number of processes, devices or loader workers.
Batches have static shapes, so jitted steps never recompile. The loader's iterator has
get_state()/set_state() for exact resume on the same layout; on another layout a loader built with
start_batch=<batches consumed> continues the same stream (`resume_plan`, used by the training loop).
"""

import sys

import grain
import jax
import numpy as np

from pso_jax.errors import UserError


def per_process_batch(global_batch_size: int) -> int:
  count = jax.process_count()
  if global_batch_size % count:
    raise UserError(f"global batch size {global_batch_size} is not divisible by the "
                    f"{count} processes; choose a multiple of {count}")
  return global_batch_size // count


def process_rows(sharding, global_batch_size: int) -> dict[int, list[int]]:
  """{process index: the rows of a [global_batch_size, ...] array under `sharding` that its
  devices hold}, sorted: the order jax.make_array_from_process_local_data expects them in."""
  rows: dict[int, set] = {}
  for device, index in sharding.devices_indices_map((global_batch_size,)).items():
    start, stop, step = index[0].indices(global_batch_size)
    rows.setdefault(device.process_index, set()).update(range(start, stop, step))
  return {p: sorted(r) for p, r in sorted(rows.items())}


def row_ranges(rows) -> list[list[int]]:
  """Sorted rows as [start, stop) ranges (compact, JSON-able)."""
  out = []
  for r in sorted(int(r) for r in rows):
    if out and out[-1][1] == r:
      out[-1][1] = r + 1
    else:
      out.append([r, r + 1])
  return out


class GlobalStreamSampler:
  """grain sampler for one process's share of the global sample stream.

  Local record i (the loader's i-th record on this process) is row rows[r] of global batch
  start_batch + t, where (t, r) follow the loader's batching: with k > 0 workers grain gives
  worker w the local records w, w + k, ..., batches each worker's records in order and takes the
  batches round robin; with k = 0 batch t is simply records t * b .. t * b + b - 1.
  Global stream position g = batch * global_batch + row reads record shuffled[g]: for one process
  the same records as grain's IndexSampler(shuffle=True, seed=seed).
  """

  def __init__(self, num_records: int, *, global_batch_size: int, rows, seed: int | None,
               shuffle: bool = True, num_epochs: int | None = None, start_batch: int = 0,
               worker_count: int = 0):
    self._n, self._batch = int(num_records), int(global_batch_size)
    self._rows = [int(r) for r in rows]
    if not self._rows or sorted(set(self._rows)) != self._rows or self._rows[-1] >= self._batch:
      raise ValueError(f"rows must be distinct sorted rows of the global batch, got {rows}")
    self._seed, self._shuffle, self._epochs = seed, bool(shuffle), num_epochs
    self._start, self._workers = int(start_batch), int(worker_count or 0)
    if self._shuffle and seed is None:
      raise ValueError("shuffling needs a seed")
    keys = grain.MapDataset.range(self._n)
    self._keys = keys.shuffle(seed=int(seed)) if self._shuffle else keys

  def __len__(self) -> int:
    if self._epochs is None:
      return sys.maxsize
    batches = int(self._epochs) * self._n // self._batch - self._start
    return max(0, batches) * len(self._rows)

  def position(self, i: int) -> int:
    """The global stream position of local record i."""
    b, k = len(self._rows), self._workers
    if k > 0:
      q = i // k
      t, r = (q // b) * k + i % k, q % b
    else:
      t, r = divmod(i, b)
    return (self._start + t) * self._batch + self._rows[r]

  def __getitem__(self, index: int) -> grain.RecordMetadata:
    if index < 0 or index >= len(self):
      raise IndexError(f"record {index} is outside this loader's {len(self)} records")
    g = self.position(index)
    key = int(self._keys[g]) if self._shuffle else g % self._n
    rng = None if self._seed is None else np.random.Generator(np.random.Philox(key=self._seed + g))
    return grain.RecordMetadata(index=g, record_key=key, rng=rng)

  def __repr__(self) -> str:  # grain validates a restored iterator state against this
    return (f"GlobalStreamSampler(num_records={self._n}, global_batch={self._batch}, "
            f"rows={row_ranges(self._rows)}, shuffle={self._shuffle}, seed={self._seed}, "
            f"num_epochs={self._epochs}, start_batch={self._start}, workers={self._workers})")


def make_loader(source, *, global_batch_size: int, seed: int, shuffle: bool = True,
                num_epochs: int | None = None, operations=(), worker_count: int = 0,
                read_options: grain.ReadOptions | None = None, rows=None,
                start_batch: int = 0) -> grain.DataLoader:
  """A grain DataLoader yielding this process's rows of each global batch, as dicts of numpy.

  rows: the rows of every global batch this process loads (default: the process's contiguous
  block, global_batch_size // process_count rows); pass `process_rows(sharding, B)[process]` for
  the batch sharding the batches go to. start_batch: the global batch the loader starts at.
  `operations` run per record before batching (grain transforms, e.g. grain.transforms.Map).
  num_epochs=None repeats forever. read_options: grain's reader threads and prefetch buffer
  (grain's default: 16 threads; on a small CPU machine num_threads=0 can be faster).
  """
  if rows is None:
    local = per_process_batch(global_batch_size)
    rows = range(jax.process_index() * local, (jax.process_index() + 1) * local)
  rows = list(rows)
  if len(source) < global_batch_size:
    raise UserError(f"the split has {len(source)} records: too few for a global batch of "
                    f"{global_batch_size}; lower the batch size")
  sampler = GlobalStreamSampler(len(source), global_batch_size=global_batch_size, rows=rows,
                                seed=seed, shuffle=shuffle, num_epochs=num_epochs,
                                start_batch=start_batch, worker_count=worker_count)
  ops = list(operations) + [grain.transforms.Batch(batch_size=len(rows), drop_remainder=True)]
  return grain.DataLoader(data_source=source, sampler=sampler, operations=ops,
                          shard_options=grain.sharding.NoSharding(),
                          worker_count=worker_count, read_options=read_options)


# ------------------------------------------------------------------ resuming on another layout

def stream_layout(*, num_records: int, global_batch_size: int, seed: int, shuffle: bool,
                  rows_by_process: dict, worker_count: int) -> dict:
  """What decides which records each process's loader yields (JSON, saved with checkpoints)."""
  return dict(num_records=int(num_records), global_batch=int(global_batch_size), seed=int(seed),
              shuffle=bool(shuffle), worker_count=int(worker_count or 0),
              process_count=len(rows_by_process),
              rows=[row_ranges(rows_by_process[p]) for p in sorted(rows_by_process)])


def _divisors(n: int, most: int = 8) -> str:
  """The first divisors of n, for error messages: "1, 2, 4, 8"."""
  return ", ".join([str(d) for d in range(1, n + 1) if n % d == 0][:most])


def check_resume(saved: dict | None, *, step: int, global_batch_size: int, grad_accum: int,
                 process_count: int, device_count: int) -> None:
  """UserError, before any work, when the run saved at `step` cannot continue its sample stream
  exactly on this layout. saved: the checkpoint's stream_layout (None: nothing to check)."""
  if not saved:
    return
  batch = int(saved["global_batch"])
  was = f"the checkpoint of step {step} was trained on {saved['process_count']} process(es)"
  if batch != global_batch_size:
    raise UserError(
        f"{was} with global batch {batch}, this config has {global_batch_size}. The global batch "
        f"is fixed for a run (its data order and schedule depend on it): resume with "
        f"--config.train.batch_size={batch}, or train the new batch in a new --workdir")
  if batch % process_count:
    raise UserError(
        f"cannot resume on {process_count} processes: {was}, and its global batch {batch} does "
        f"not split into {process_count} equal per-process shares, so the saved sample stream "
        f"cannot continue exactly. Resume on a process count that divides {batch} "
        f"(e.g. {_divisors(batch)})")
  micro = batch // max(1, int(grad_accum))
  if micro % device_count:
    raise UserError(
        f"cannot resume on {device_count} devices: {was}, and its micro-batch {micro} (global "
        f"batch {batch}, grad_accum={grad_accum}) does not split evenly over {device_count} "
        f"devices. Resume on a device count that divides {micro} (e.g. "
        f"{_divisors(micro)}; one process may use fewer with "
        "--config.mesh.data)")


def resume_plan(saved: dict | None, layout: dict, step: int) -> tuple[int, bool]:
  """(start_batch of the loader, restore the saved grain state?) to continue after `step`.

  saved: the checkpoint's {"layout", "start_batch"} (None for checkpoints without it). On the
  same layout the saved iterator states continue exactly (start_batch as saved); on any other
  (process count, rows per process, loader workers, seed) a fresh loader starts at global batch
  `step`: every global batch before it was consumed, whatever the old split was.
  """
  if saved and saved.get("layout") == layout:
    return int(saved["start_batch"]), True
  return int(step), False


# ------------------------------------------------------------------ streamed passes over a split

BATCH_BYTES = 64 << 20  # in_batches' default batch: this many bytes of images (at least 64 rows)


def in_batches(fn, images, batch_size: int | None = None):
  """fn(numpy rows) over consecutive batches of `images` (an array or a lazy column,
  `dataset.RecordColumn`), the outputs concatenated: a row-wise fn then sees at most batch_size
  decoded images at a time. fn returns an array with the batch's leading axis. The default batch
  holds BATCH_BYTES of images: small images (the demo's whole split) go in one batch, so a float32
  matmul inside fn rounds as it did on the whole array."""
  n = len(images)
  if batch_size is None:
    row_bytes = max(1, int(np.prod(images.shape[1:])) * np.dtype(images.dtype).itemsize)
    batch_size = max(64, BATCH_BYTES // row_bytes)
  if n == 0:
    return fn(np.asarray(images[0:0]))
  return np.concatenate([fn(np.asarray(images[s:s + batch_size]))
                         for s in range(0, n, int(batch_size))])


def process_share(n: int, index: int | None = None, count: int | None = None) -> tuple[int, int]:
  """[start, stop) of a process's contiguous share of n rows: ceil(n / count) rows each, the last
  shares shorter or empty."""
  index = jax.process_index() if index is None else int(index)
  count = jax.process_count() if count is None else int(count)
  share = -(-int(n) // count)
  return min(index * share, n), min((index + 1) * share, n)


PASS_PIECE = 16384  # rows per piece of a pass that shows its progress (shorter passes run whole)


def _pieces(fn, images, desc: str):
  """fn over `images` in pieces of PASS_PIECE rows with a progress bar (desc), or whole when they
  are fewer (so small runs compute exactly as before)."""
  n = len(images)
  if not desc or n <= PASS_PIECE:
    return np.asarray(fn(images))
  from pso_jax import progress
  from pso_jax.data import dataset
  outs = []
  with progress.bar(total=n, desc=desc, unit="img") as bar:
    for start in range(0, n, PASS_PIECE):
      rows = np.arange(start, min(start + PASS_PIECE, n))
      outs.append(np.asarray(fn(dataset.column_rows(images, rows))))
      bar.update(len(rows))
  return np.concatenate(outs)


def split_pass(fn, images, desc: str = ""):
  """fn (row-wise: row i of the output depends on row i of the input only) over all of `images`
  (an array or a lazy column), the work split over the JAX processes: each process runs fn on its
  contiguous share (only those rows are decoded there) and the shares are gathered, so every
  process returns fn(images) [N, ...]. On one process this is fn(images) itself. With `desc`, a
  process's share of more than PASS_PIECE rows runs in pieces under a progress bar."""
  count, n = jax.process_count(), len(images)
  if count == 1 or n == 0:
    return _pieces(fn, images, desc)
  from jax.experimental import multihost_utils
  from pso_jax.data import dataset
  share = -(-n // count)
  lo, hi = process_share(n)
  rows = np.arange(lo, hi) if hi > lo else np.array([n - 1])  # an empty share runs one row
  part = _pieces(fn, dataset.column_rows(images, rows), desc)
  padded = np.concatenate([part[:hi - lo], np.repeat(part[-1:], share - (hi - lo), axis=0)])
  gathered = np.asarray(multihost_utils.process_allgather(padded, tiled=True))
  sizes = [np.subtract(*process_share(n, p, count)[::-1]) for p in range(count)]
  return np.concatenate([gathered[p * share:p * share + sizes[p]] for p in range(count)])

"""The `train` stage: the sharded, resumable EDM2 training loop, and `load_denoiser` for sampling.

diffusion/ holds the orbax checkpoints (with the grain iterator state), EMA snapshots, the
k-anonymous neighbours, metrics.jsonl, TensorBoard events, and COMPLETE once
config.train.total_images were seen; a rerun then returns at once, a rerun after a kill resumes
after the newest checkpoint and continues exactly as an uninterrupted run would, also on another
number of processes, devices or loader workers (the global batch is fixed for a run and must
divide over them): weights, optimizer state and EMA are read into the new mesh's shardings and the
loaders continue the same global sample stream at the checkpoint's batch (data/pipeline.py).
"""

import contextlib
import math
import os
import time

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from pso_jax import io_utils, progress
from pso_jax.data import pipeline
from pso_jax.diffusion import ema as ema_lib
from pso_jax.diffusion import regulariser
from pso_jax.errors import UserError, require
from pso_jax.models import presets
from pso_jax.training import checkpoint as ckpt_lib
from pso_jax import parallel
from pso_jax.training import metrics as metrics_lib
from pso_jax.diffusion import train_step as step_lib

STAGE_DIR = "diffusion"


def stage_dir(workdir: str) -> str:
  return os.path.join(workdir, STAGE_DIR)


def _keys(config):
  """(init key, train key): fixed by the seed, independent of devices and processes."""
  root = jax.random.fold_in(jax.random.key(int(config.seed)), 0x7EA1)
  return jax.random.fold_in(root, 0), jax.random.fold_in(root, 1)


def check_config(config) -> None:
  """Bad training settings stop here, before data or compilation."""
  t, r = config.train, config.regulariser
  presets.cond_dim(config)  # the condition mode
  require(t.total_images >= t.batch_size,
          f"config.train.total_images={t.total_images} is less than one batch "
          f"({t.batch_size}); raise total_images or lower batch_size")
  require(0 <= r.cond_dropout < 1, f"config.regulariser.cond_dropout={r.cond_dropout} must be in [0, 1)")
  require(r.jitter >= 0, f"config.regulariser.jitter={r.jitter} must be >= 0")
  require(0 <= r.kanon_prob <= 1, f"config.regulariser.kanon_prob={r.kanon_prob} must be in [0, 1]")
  require(r.kanon_k >= 0, f"config.regulariser.kanon_k={r.kanon_k} must be >= 0 (0 = off)")
  require(t.nan_patience >= 1, f"config.train.nan_patience={t.nan_patience} must be >= 1")
  require(len(t.ema_stds) >= 1, "config.train.ema_stds needs at least one EMA width, e.g. (0.05, 0.10)")
  for std in t.ema_stds:
    try:
      ema_lib.std_to_gamma(std)
    except ValueError as e:
      raise UserError(f"config.train.ema_stds: {e}") from None


# ------------------------------------------------------------------ data

def _kanon_table(config, workdir: str, out_dir: str):
  """[N_train, d] k-anonymous conditions (neighbours found once and kept in diffusion/)."""
  if config.model.cond == "uncond" or not regulariser.uses_kanon(config.regulariser):
    return None
  from pso_jax.data.dataset import load_arrays
  k = int(config.regulariser.kanon_k)
  cond_key = "feature" if config.model.cond == "pseudo" else "labels"
  arrays = load_arrays(workdir, "train", keys=tuple({"feature", cond_key, "patient_id"}))
  path = os.path.join(out_dir, f"kanon_neighbours_k{k}.npy")
  if os.path.exists(path):
    neighbours = np.load(path)
  else:
    neighbours = regulariser.kanon_neighbours(arrays["feature"], arrays["patient_id"], k)
    if jax.process_index() == 0:
      io_utils.write_npy(path, neighbours)
  require(len(neighbours) == len(arrays["feature"]),
          f"{path} was computed for another train split; delete it and rerun")
  return regulariser.kanon_conditions(arrays[cond_key], neighbours)


def model_batch(records: dict, config, kanon_table=None) -> dict:
  """Loader records (process-local numpy) -> what the train step reads: x, cond, kanon_cond."""
  from pso_jax.data.latents import to_model_space
  if config.data.latent.kind == "identity":
    x = to_model_space(records["image"], config)
  else:
    x = records["latent"]
  out = {"x": np.asarray(x, np.float32)}
  if config.model.cond == "pseudo":
    out["cond"] = np.asarray(records["feature"], np.float32)
  elif config.model.cond == "class":
    out["cond"] = np.asarray(records["labels"], np.float32)
  if kanon_table is not None:
    out["kanon_cond"] = kanon_table[np.asarray(records["index"])]
  return out


class RelocatableSource:
  """The train split under a repr without its path: grain compares repr(source) when restoring
  an iterator, and a workdir may be moved or mounted elsewhere between a kill and the resume."""

  def __init__(self, source):
    self._source = source

  def __len__(self):
    return len(self._source)

  def __getitem__(self, i):
    return self._source[i]

  def __getitems__(self, indices):
    if hasattr(self._source, "__getitems__"):
      return self._source.__getitems__(indices)
    return [self._source[i] for i in indices]

  def __repr__(self):
    return f"pso_jax train split ({len(self._source)} records)"


class BatchStream:
  """The loader iterator, one batch read ahead, whose checkpointed state counts only the batches
  handed to training (so a checkpoint taken while the next batch is prefetched resumes right)."""

  def __init__(self, iterator):
    self._it = iterator
    self._state = iterator.get_state()
    self._ahead = None

  def prefetch(self) -> None:
    if self._ahead is None:
      batch = next(self._it)
      self._ahead = (batch, self._it.get_state())

  def take(self):
    self.prefetch()
    (batch, self._state), self._ahead = self._ahead, None
    return batch

  # the grain checkpoint handler's protocol
  def get_state(self):
    return self._state

  def set_state(self, state) -> None:
    self._it.set_state(state)
    self._state, self._ahead = state, None

  def start_prefetch(self) -> None:
    pass


# ------------------------------------------------------------------ state

def _abstract_state(model, config, mesh):
  init_key, _ = _keys(config)
  abstract = jax.eval_shape(lambda k: step_lib.init_state(model, config, k), init_key)
  shardings = parallel.state_shardings(abstract, mesh, int(config.mesh.fsdp_min_size))
  return abstract, shardings


def _ema_by_std(state, config) -> dict:
  return dict(zip(tuple(config.train.ema_stds), state.ema))


def _every(images: int, batch: int) -> int:
  return max(1, int(images) // batch)


def _process_count() -> int:  # one place (tests stand in another count for the resume check)
  return jax.process_count()


def _setup(config, workdir: str, out_dir: str, mesh, source, ckpt):
  """Checks a resume's layout, builds the loader at the right stream position and the state
  (fresh, or restored into this mesh's shardings): everything before compilation.

  Returns (state, stream, kanon_table, start step, stream metadata to save, shardings, model).
  """
  batch_size = int(config.train.batch_size)
  start = ckpt.latest_step()
  saved_stream = None if start is None else ckpt.read_meta(start).get("data")
  # a resume on another process / device layout must be able to continue the saved sample stream
  pipeline.check_resume(None if saved_stream is None else saved_stream["layout"], step=start,
                        global_batch_size=batch_size, grad_accum=int(config.train.grad_accum),
                        process_count=_process_count(), device_count=mesh.size)
  parallel.micro_batch_size(batch_size, int(config.train.grad_accum), mesh)
  model = presets.build_model(config)
  os.makedirs(out_dir, exist_ok=True)
  kanon_table = _kanon_table(config, workdir, out_dir)
  worker_count = int(config.data.worker_count)
  rows = pipeline.process_rows(parallel.batch_sharding(mesh), batch_size)
  layout = pipeline.stream_layout(num_records=len(source), global_batch_size=batch_size,
                                  seed=int(config.seed), shuffle=True, rows_by_process=rows,
                                  worker_count=worker_count)
  start_batch, same_layout = pipeline.resume_plan(saved_stream, layout, start or 0)
  stream = BatchStream(iter(pipeline.make_loader(
      source, global_batch_size=batch_size, seed=int(config.seed), shuffle=True, num_epochs=None,
      worker_count=worker_count, rows=rows[jax.process_index()], start_batch=start_batch)))

  abstract, shardings = _abstract_state(model, config, mesh)
  if start is None:
    init_key, _ = _keys(config)
    with jax.set_mesh(mesh):
      state = jax.jit(lambda k: step_lib.init_state(model, config, k), out_shardings=shardings)(init_key)
    start = 0
  else:
    # model, optimizer and EMA arrays are read straight into this mesh's shardings; the loader
    # continues from its saved state on the same layout, from global batch `start` on another
    state, _ = ckpt.restore(start, parallel.with_shardings(abstract, shardings),
                            stream if same_layout else None)
    if jax.process_index() == 0 and saved_stream is None:
      logging.warning("train: the checkpoint of step %d has no data stream layout (written before "
                      "layouts were saved); the loaders restart the global stream at batch %d, "
                      "which continues exactly only a 1-process run", start, start)
    if jax.process_index() == 0:
      logging.info("train: resuming after step %d (%d images)%s", start, start * batch_size,
                   "" if same_layout else
                   f"; the sample stream continues at global batch {start} on a new layout "
                   f"({jax.process_count()} process(es), {worker_count} loader worker(s))")
  return state, stream, kanon_table, start, dict(layout=layout, start_batch=start_batch), \
      shardings, model


def run(config, workdir: str, *, stop_after_steps: int | None = None, **options) -> dict:
  """Trains until config.train.total_images; `stop_after_steps` ends this call early (after that
  many steps, without a final checkpoint: what a kill or a job time limit does)."""
  out_dir = stage_dir(workdir)
  done = os.path.join(out_dir, "COMPLETE")
  if os.path.exists(done):
    return io_utils.read_json(done)
  check_config(config)
  from pso_jax.data.dataset import load_split

  batch_size = int(config.train.batch_size)
  mesh = parallel.make_mesh(config.mesh)
  batch_sharding = parallel.batch_sharding(mesh)  # the loaders' rows are this sharding's
  source = RelocatableSource(load_split(workdir, "train"))
  ckpt = ckpt_lib.Checkpointer(os.path.join(out_dir, "checkpoints"),
                               keep=int(config.train.keep_checkpoints),
                               async_save=bool(config.train.async_checkpoint))
  # closed in reverse order on any exit, a failed setup or compile included
  with contextlib.ExitStack() as cleanup:
    cleanup.callback(ckpt.close)
    state, stream, kanon_table, start, stream_meta, shardings, model = _setup(
        config, workdir, out_dir, mesh, source, ckpt)
    _, train_key = _keys(config)

    total_steps = math.ceil(int(config.train.total_images) / batch_size)
    ckpt_every = _every(config.train.checkpoint_images, batch_size)
    snap_every = _every(config.train.snapshot_images, batch_size)
    log_every = max(1, int(config.train.log_every_steps))
    snap_dir = os.path.join(out_dir, "ema_snapshots")
    writer = metrics_lib.MetricsWriter(out_dir, resume_step=start)
    cleanup.callback(writer.close)

    def next_batch():  # this process's rows of the next global batch, as global arrays
      return parallel.local_rows_to_global(model_batch(stream.take(), config, kanon_table), batch_sharding)

    values, batch = None, next_batch()
    with jax.set_mesh(mesh):
      compiled = step_lib.jit_train_step(step_lib.make_train_step(model, config), shardings, mesh) \
          .lower(state, batch, train_key).compile()
    step_flops = metrics_lib.compiled_flops(compiled, mesh.size)
    peak, peak_source = (metrics_lib.machine_peak_flops(list(mesh.devices.flat), config.model.dtype)
                         if jax.process_index() == 0 else (0.0, ""))
    if jax.process_index() == 0:
      logging.info("train: %s; %.3g GFLOP per step; peak %.3g TFLOP/s (%s)", parallel.describe(mesh),
                   step_flops / 1e9, peak / 1e12, peak_source)

    bar = progress.bar(total=total_steps, desc="train", unit="step", initial=start)
    cleanup.callback(bar.close)
    nan_streak, last_saved, step = 0, start, start
    window_start, window_steps = time.perf_counter(), 0
    stop_at = total_steps if stop_after_steps is None else min(total_steps, start + stop_after_steps)
    while step < stop_at:
      state, values = compiled(state, batch, train_key)
      step += 1
      if step < stop_at:  # host reads the next batch while the devices run this step
        stream.prefetch()
      values = jax.device_get(values)
      window_steps += 1
      bar.update(1)
      nan_streak = 0 if np.isfinite(values["loss"]) else nan_streak + 1
      if nan_streak >= int(config.train.nan_patience):
        raise UserError(
            f"the training loss was not finite for {nan_streak} consecutive steps (steps "
            f"{step - nan_streak + 1}..{step}); training stopped. The last good checkpoint (step "
            f"{last_saved}) is kept in {ckpt.directory}. Lower config.train.lr_ref or check the "
            "data, then rerun with --allow_config_change to resume from it")
      if step % log_every == 0 or step == stop_at:
        elapsed = time.perf_counter() - window_start
        rates = dict(images_per_s=window_steps * batch_size / elapsed,
                     tflops=window_steps * step_flops / elapsed / 1e12)
        rates["mfu"] = rates["tflops"] * 1e12 / peak if peak else 0.0
        writer.write(step, dict(values, **rates, nimg=step * batch_size))
        bar.set_postfix(loss=f"{values['loss']:.4g}", img_s=f"{rates['images_per_s']:.3g}")
        window_start, window_steps = time.perf_counter(), 0
      if nan_streak == 0 and (step % snap_every == 0 or step == total_steps):
        ckpt_lib.save_ema_snapshots(snap_dir, _ema_by_std(state, config), step * batch_size)
      if nan_streak == 0 and (step % ckpt_every == 0 or step == total_steps):
        ckpt.save(step, state, stream, dict(step=step, nimg=step * batch_size,
                                            config=config.to_dict(), data=stream_meta))
        last_saved = step
      if step < stop_at:  # taken after the save: the checkpoint counts `step` batches
        batch = next_batch()
    ckpt.wait()
  summary = dict(steps=step, images=step * batch_size, total_steps=total_steps,
                 final_loss=None if values is None else float(values["loss"]),
                 checkpoint_step=last_saved,
                 gflop_per_step=step_flops / 1e9, ema_stds=list(config.train.ema_stds))
  if step >= total_steps:
    multihost_utils.sync_global_devices("pso_jax_train_complete")
    if jax.process_index() == 0:
      io_utils.write_json(done, summary)
  return summary


# ------------------------------------------------------------------ for sampling

def load_denoiser(config, workdir: str, *, ema_std: float | None = None, step: int | None = None):
  """(model, variables) of a trained run for `model.apply(variables, x, sigma, cond, train=False)`.

  ema_std None uses config.sample.ema_std; 0 gives the raw training weights; a tracked width its
  EMA; any other width is reconstructed post hoc from the EMA snapshots saved up to that step.
  step None takes the newest checkpoint.
  """
  ema_std = float(config.sample.ema_std if ema_std is None else ema_std)
  directory = os.path.join(stage_dir(workdir), "checkpoints")
  ckpt = ckpt_lib.Checkpointer(directory, keep=int(config.train.keep_checkpoints), async_save=False)
  steps = ckpt.all_steps()
  require(steps, f"no diffusion checkpoint in {directory}; run --mode=train with --workdir={workdir} first")
  step = max(steps) if step is None else int(step)
  require(step in steps, f"no diffusion checkpoint of step {step} in {directory}; saved steps: {steps}")
  model = presets.build_model(config)
  mesh = parallel.make_mesh(config.mesh)
  abstract, shardings = _abstract_state(model, config, mesh)
  state, _ = ckpt.restore(step, parallel.with_shardings(abstract, shardings))
  ckpt.close()
  tracked = [i for i, s in enumerate(config.train.ema_stds) if math.isclose(s, ema_std, rel_tol=1e-6)]
  if ema_std == 0:
    params = state.params
  elif tracked:
    params = state.ema[tracked[0]]
  else:
    params = _posthoc_params(config, workdir, state.params, ema_std, step)
  return model, {"params": params, **state.constants}


def _posthoc_params(config, workdir, like, ema_std: float, step: int):
  nimg = step * int(config.train.batch_size)
  found = [s for s in ckpt_lib.list_ema_snapshots(os.path.join(stage_dir(workdir), "ema_snapshots"))
           if s[0] <= nimg]
  require(found, f"EMA width {ema_std} is not tracked (config.train.ema_stds="
          f"{tuple(config.train.ema_stds)}) and no EMA snapshots up to step {step} exist to "
          "reconstruct it; sample with a tracked width or 0 (raw weights)")
  host_like = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), like)
  snapshots = [(n, s, ckpt_lib.load_ema_snapshot(p, host_like)) for n, s, p in found]
  params = ema_lib.reconstruct_posthoc(snapshots, ema_std, target_nimg=nimg)
  return jax.tree.map(lambda p, a: jax.device_put(p, a.sharding), params, like)

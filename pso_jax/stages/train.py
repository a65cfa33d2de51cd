"""The `train` stage: the sharded, resumable EDM2 training loop (`diffusion.denoiser` loads its
weights back for sampling).

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

from pso_jax import parallel, progress, stages
from pso_jax.data import pipeline
from pso_jax.diffusion import denoiser, sampling, train_setup
from pso_jax.diffusion import train_step as step_lib
from pso_jax.errors import UserError
from pso_jax.models import presets
from pso_jax.training import checkpoint as ckpt_lib
from pso_jax.training import metrics as metrics_lib


def _process_count() -> int:  # one place (tests stand in another count for the resume check)
  return jax.process_count()


def _closing(close):
  """An ExitStack exit that calls `close`; when another error is already on its way out, a
  failure of `close` is logged instead of raised, so the first error is the one shown."""
  def exit_(exc_type, exc, tb):
    try:
      close()
    except Exception as e:  # noqa: BLE001
      if exc is None:
        raise
      logging.warning("train: after %s, closing also failed: %s", type(exc).__name__, e)
    return False
  return exit_


def _setup(config, workdir: str, out_dir: str, mesh, source, ckpt):
  """Checks a resume's layout, builds the loader at the right stream position and the state
  (fresh, or restored into this mesh's shardings from the newest checkpoint that restores):
  everything before compilation.

  Returns (state, stream, kanon_table, start step, stream metadata to save, shardings, model).
  """
  batch_size = int(config.train.batch_size)
  parallel.micro_batch_size(batch_size, int(config.train.grad_accum), mesh)
  model = presets.build_model(config)
  os.makedirs(out_dir, exist_ok=True)
  kanon_table = train_setup.kanon_table(config, workdir, out_dir)
  worker_count = int(config.data.worker_count)
  rows = pipeline.process_rows(parallel.batch_sharding(mesh), batch_size)
  layout = pipeline.stream_layout(num_records=len(source), global_batch_size=batch_size,
                                  seed=int(config.seed), shuffle=True, rows_by_process=rows,
                                  worker_count=worker_count)
  abstract, shardings = train_setup.abstract_state(model, config, mesh)

  def loader(start_batch: int):
    return train_setup.BatchStream(iter(pipeline.make_loader(
        source, global_batch_size=batch_size, seed=int(config.seed), shuffle=True,
        num_epochs=None, worker_count=worker_count, rows=rows[jax.process_index()],
        start_batch=start_batch)))

  def resume(step: int):
    saved_stream = ckpt.read_meta(step).get("data")
    # a resume on another process / device layout must be able to continue the saved sample stream
    pipeline.check_resume(None if saved_stream is None else saved_stream["layout"], step=step,
                          global_batch_size=batch_size, grad_accum=int(config.train.grad_accum),
                          process_count=_process_count(), device_count=mesh.size)
    start_batch, same_layout = pipeline.resume_plan(saved_stream, layout, step)
    stream = loader(start_batch)
    # model, optimizer and EMA arrays are read straight into this mesh's shardings; the loader
    # continues from its saved state on the same layout, from global batch `step` on another
    state, _ = ckpt.restore(step, parallel.with_shardings(abstract, shardings),
                            stream if same_layout else None)
    return state, stream, saved_stream, start_batch, same_layout

  start, resumed, corrupt = ckpt.restore_newest(resume)
  if corrupt:
    aside = ckpt.set_aside([step for step, _ in corrupt])
    if jax.process_index() == 0:
      for step, why in corrupt:
        logging.warning("train: checkpoint %d in %s does not restore (%s); it is moved to %s and "
                        "training resumes from step %d", step, ckpt.directory, why, aside, start)
  if start is None:
    stream, saved_stream, start_batch = loader(0), None, 0
    init_key, _ = train_setup.keys(config)
    with jax.set_mesh(mesh):
      state = jax.jit(lambda k: step_lib.init_state(model, config, k), out_shardings=shardings)(init_key)
    start = 0
  else:
    state, stream, saved_stream, start_batch, same_layout = resumed
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
  finished = stages.done(workdir, "train")  # COMPLETE holds the summary
  if finished is not None:
    return finished
  out_dir = stages.output_dir(workdir, "train")
  train_setup.check_config(config)
  from pso_jax.data.dataset import load_split
  from pso_jax.data.latents import resolve_stats
  config = resolve_stats(config, workdir)  # latent.stats=dataset: the card's mean/std

  batch_size = int(config.train.batch_size)
  mesh = parallel.make_mesh(config.mesh)
  batch_sharding = parallel.batch_sharding(mesh)  # the loaders' rows are this sharding's
  source = train_setup.RelocatableSource(load_split(workdir, "train"))
  ckpt = ckpt_lib.Checkpointer(denoiser.checkpoint_dir(workdir),
                               keep=int(config.train.keep_checkpoints),
                               keep_steps=sampling.kept_checkpoint_steps(config),  # the guide's
                               async_save=bool(config.train.async_checkpoint))
  # closed in reverse order on any exit, a failed setup or compile included; a close that fails
  # while an error is on its way out (a full disk flushing the metrics) does not replace it
  with contextlib.ExitStack() as cleanup:
    cleanup.push(_closing(ckpt.close))
    state, stream, kanon_table, start, stream_meta, shardings, model = _setup(
        config, workdir, out_dir, mesh, source, ckpt)
    _, train_key = train_setup.keys(config)

    total_steps = math.ceil(int(config.train.total_images) / batch_size)
    ckpt_every = train_setup.every(config.train.checkpoint_images, batch_size)
    snap_every = train_setup.every(config.train.snapshot_images, batch_size)
    log_every = max(1, int(config.train.log_every_steps))
    snap_dir = denoiser.snapshot_dir(workdir)
    writer = metrics_lib.MetricsWriter(out_dir, resume_step=start)
    cleanup.push(_closing(writer.close))

    def next_batch():  # this process's rows of the next global batch, as global arrays
      return parallel.local_rows_to_global(
          train_setup.model_batch(stream.take(), config, kanon_table), batch_sharding)

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
    cleanup.push(_closing(bar.close))
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
        ckpt_lib.save_ema_snapshots(snap_dir, train_setup.ema_by_std(state, config), step * batch_size)
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
    stages.finish(workdir, "train", summary)
  return summary

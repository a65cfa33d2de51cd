"""Stage `sample`: a preview grid of real training images and candidates conditioned on them.

Reads the prepared train split and the trained model (`diffusion.sampling.load_sampler`, shared
with the `select` stage); writes `samples/grid.png`, `samples/summary.json`, then `samples/COMPLETE`.
"""

import os
import time

import jax
import numpy as np

from pso_jax import stages
from pso_jax.diffusion import sampler as sampler_lib
from pso_jax.diffusion import sampling


def run(config, workdir: str, **options) -> dict:
  from pso_jax.data.release import write_png
  from pso_jax.data.dataset import load_columns
  finished = stages.done(workdir, "sample")
  if finished is not None:
    return finished
  sampling.check_sample_config(config)
  # images stream (the grid decodes its few rows); labels and features stay resident
  train = load_columns(workdir, "train", keys=("image", "labels", "feature"))
  conditions = sampling.conditions_for(config, train)
  side = max(int(config.sample.grid), 1)
  count = min(max(side // 2, 1) * side, len(conditions))
  pick = np.linspace(0, len(conditions) - 1, count).round().astype(np.int64)
  guidance = float(config.sample.guidance)
  loaded = sampling.load_sampler(config, workdir, stream=sampling.PREVIEW_STREAM,
                                 guided=guidance != 1.0)
  start = time.perf_counter()
  generated = loaded.generate(np.arange(count), conditions[pick], guidance)
  seconds = time.perf_counter() - start
  summary = dict(images=count, train_indices=pick.tolist(), guidance=guidance,
                 guide=config.sample.guide, steps=int(config.sample.steps),
                 ema_std=float(config.sample.ema_std), fingerprint=loaded.fingerprint,
                 seconds=seconds, candidates_per_s=count / seconds,
                 evaluations_per_candidate=sampler_lib.evaluations_per_candidate(
                     int(config.sample.steps), loaded.sampler.ref is not None and guidance != 1.0))
  if jax.process_index() == 0:
    write_png(os.path.join(stages.output_dir(workdir, "sample"), "grid.png"),
              sampling.preview_grid(train["image"][pick], generated, side))
  stages.finish(workdir, "sample", summary)
  return summary

"""Stage `select`: candidates for every real training image -> re-id rejection against all training
patients -> consistency ranking -> the synthetic dataset.

The set goes to `<workdir>/release/` (images under opaque names, filelist.txt, card.md/json: what
may be handed over); the records that name patients and source scans stay in the stage's internal
folder `<workdir>/synthetic/` (`data/release.py` describes both).

Resumable: real images are processed in chunks of config.select.chunk_images; a finished chunk has
its PNGs, its `chunks/<k>.jsonl` records and its marker. A rerun redoes only unmarked chunks and
produces the same files (seeds are functions of image index, round and candidate; names of the
index under the workdir's secret key). `run.json` stores which model made the selection; a
different model is refused.
"""

import jax
import numpy as np

from pso_jax import progress, stages
from pso_jax.data import release
from pso_jax.diffusion import sampling
from pso_jax.errors import require
from pso_jax.privacy import selection, selection_workdir


def run(config, workdir: str, *, stop_after_chunks=None, **options) -> dict:
  from pso_jax.data.dataset import load_columns
  finished = stages.done(workdir, "select")
  if finished is not None:
    return finished
  out_dir = stages.output_dir(workdir, "select")
  rule = selection.SelectionRule.from_config(config)
  chunk_images = int(config.select.chunk_images)
  require(chunk_images >= 1, f"config.select.chunk_images={chunk_images} must be >= 1")
  sampling.check_sample_config(config)
  # images stream through the embedding passes; labels, ids, paths and features stay resident
  train = load_columns(workdir, "train", keys=("image", "labels", "patient_id", "path", "feature"))
  sampling.conditions_for(config, train)  # features present and of the model's size
  guided = any(g != 1.0 for g in rule.guidances())
  loaded = sampling.load_sampler(config, workdir, stream=sampling.SELECT_STREAM, guided=guided)
  selection_workdir.check_same_model(out_dir, loaded.fingerprint, chunk_images)
  writer = release.ReleaseWriter(workdir) if jax.process_index() == 0 else None
  inputs = selection_workdir.build_inputs(config, workdir, train, loaded.generate)
  real = selection.real_indices(len(inputs.paths), int(config.select.max_real), int(config.seed))
  with progress.bar(total=len(real), desc="select", unit="img") as bar:
    stats = selection.run_chunks(inputs, rule, out_dir, chunk_images,
                                 save=writer.save if writer else None,
                                 stop_after=stop_after_chunks, progress=bar, real=real)
  n_chunks = -(-len(real) // chunk_images)
  if len(stats) < n_chunks:  # stopped early on request (tests of resumption)
    return dict(chunks_done=len(stats), chunks=n_chunks)
  extra = dict(fingerprint=loaded.fingerprint, image_shape=list(train["image"].shape[1:]),
               steps=int(config.sample.steps), guide=config.sample.guide,
               ema_std=float(config.sample.ema_std),
               evaluations_per_candidate=selection_workdir.selection_evaluations(config, guided))
  summary = selection.summarise(stats, rule, inputs) | extra | dict(real_images=len(real))
  if writer:
    selection_workdir.write_lists(out_dir, inputs, len(stats), writer)
    writer.write_card(release.selection_card(config, summary))
  stages.finish(workdir, "select", summary)  # summary.json, then COMPLETE
  return summary

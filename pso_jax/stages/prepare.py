"""The `prepare` stage: phantom or real filelist -> patient-disjoint ArrayRecord splits + features.

  workdir/data/pso_cxr/1.0.0/   TFDS ArrayRecord splits train/val/test (pso_jax.data.builder)
  workdir/data/{split}.txt      the split's filelist, reference format, in record order
  workdir/data/features_{split}.npy   unit-norm pseudo-conditioning features, record order
  workdir/data/card.json, card.md     counts per split, per finding, patients; pixel scaling
  workdir/data/COMPLETE               written last

The plan (every check that can fail, a header check of every image included, runs before any file
is written) and the chunked build, resumable from content-keyed chunks, that renames a finished
dataset into workdir/data in one step are `data.prepare_plan`'s.
"""

from pso_jax import stages
from pso_jax.data import prepare_plan
from pso_jax.errors import UserError


def run(config, workdir: str, **options) -> dict:
  """The `prepare` stage. Every process validates the input, then draws or decodes (and encodes)
  its share of the chunks, computes its share of the raw features and writes its own record
  files (`prepare_plan.build`, with barriers between the steps); process 0 writes the metadata and
  card and renames the dataset into place; the others then read the card."""
  del options
  import jax
  finished = stages.done(workdir, "prepare")
  if finished is not None:
    return finished
  plan = prepare_plan.make_plan(config)
  index, count = jax.process_index(), jax.process_count()
  sync = prepare_plan.no_sync
  if count > 1:
    from jax.experimental import multihost_utils
    sync = multihost_utils.sync_global_devices
  card = prepare_plan.build(config, plan, workdir, index, count, sync)
  sync("pso_jax.stages.prepare")
  if card is None:
    card = stages.done(workdir, "prepare")
    if card is None:
      raise UserError(f"{stages.output_dir(workdir, 'prepare')} is not visible from process "
                      f"{index}: the workdir must be on a filesystem shared by all processes")
  return card

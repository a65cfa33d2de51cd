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
  """The `prepare` stage. Every process validates the input and draws or decodes (and encodes)
  its share of the chunks (`prepare_plan.compute_share`); process 0 then assembles the dataset
  from the cached chunks and writes it; the others wait for the result."""
  del options
  import jax
  finished = stages.done(workdir, "prepare")
  if finished is not None:
    return finished
  plan = prepare_plan.make_plan(config)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    prepare_plan.compute_share(config, plan, workdir, jax.process_index(), jax.process_count())
    multihost_utils.sync_global_devices("pso_jax.stages.prepare.chunks")
  card = prepare_plan.build(config, plan, workdir) if jax.process_index() == 0 else None
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("pso_jax.stages.prepare")
  if card is None:
    card = stages.done(workdir, "prepare")
    if card is None:
      raise UserError(f"{stages.output_dir(workdir, 'prepare')} is not visible from process "
                      f"{jax.process_index()}: the workdir must be on a filesystem shared by all "
                      "processes")
  return card

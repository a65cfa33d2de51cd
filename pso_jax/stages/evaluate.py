"""Stage `evaluate`: how useful and how diverse the released synthetic set is
(`evaluate.synthetic_utility`: utility as AUROC of classifiers trained on real vs synthetic images,
diversity in the pseudo-conditioning feature space).

Reads the released set (`release/`, in source order through `synthetic/`'s index: the images the
audit reads), the real splits and the real-data classifier (`classifier/`, trained here if that
stage has not run). Writes `evaluate/classifier_synthetic/` (weights), `evaluate/evaluate.json`,
then `evaluate/COMPLETE`.
"""

from pso_jax import stages
from pso_jax.data import release
from pso_jax.evaluate import classifier_training, synthetic_utility, utility


def run(config, workdir: str, **_) -> dict:
  finished = stages.done(workdir, "evaluate")
  if finished is not None:
    return finished
  # fails first when select has not run; PNGs read per batch
  released = release.load_released(workdir, lazy=True)
  splits = classifier_training.load_labelled_splits(workdir)
  result = utility.as_json(synthetic_utility.evaluate(config, workdir, splits, released))
  stages.finish(workdir, "evaluate", result)
  return result

"""Stage `train_classifier`: the finding classifier on the real training split.

Validated on real val (best-val-loss weights kept), mean AUROC over the 8 findings on the real
multi-label test split with bootstrap CIs. Writes `classifier/checkpoint_{best,final}` (orbax),
`classifier/training.json`, `classifier/metrics.jsonl`, `classifier/classifier.json`, then
`classifier/COMPLETE`. The selection stage uses this model for label consistency and the evaluate
stage reuses it as the real-data baseline.
"""

from pso_jax import stages
from pso_jax.evaluate import classifier_training


def run(config, workdir: str, **_) -> dict:
  finished = stages.done(workdir, "train_classifier")
  if finished is not None:
    return finished
  splits = classifier_training.load_labelled_splits(workdir)
  return classifier_training.train_and_write(config, splits,
                                             stages.output_dir(workdir, "train_classifier"))

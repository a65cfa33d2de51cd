"""Stage `train_classifier`: the finding classifier on the real training split.

Validated on real val (best-val-loss weights kept), mean AUROC over the 8 findings on the real
multi-label test split with bootstrap CIs. Writes `classifier/checkpoint_{best,final}` (orbax),
`classifier/training.json`, `classifier/metrics.jsonl`, `classifier/classifier.json`, then
`classifier/COMPLETE`. The selection stage uses this model for label consistency and the evaluate
stage reuses it as the real-data baseline.
"""

import os

import jax

from pso_jax import io_utils
from pso_jax.evaluate import classifier as classifier_lib, utility


def load_labelled_splits(workdir: str) -> dict:
  from pso_jax.data import dataset
  return {name: dataset.load_arrays(workdir, name, ("image", "labels"))
          for name in ("train", "val", "test")}


def train_and_test(config, splits: dict, out_dir: str, *, steps: int = None, key=None) -> dict:
  """Trains on splits["train"], validates on splits["val"], tests on splits["test"]."""
  findings = tuple(config.data.findings)
  key = jax.random.key(config.seed) if key is None else key
  train, val, test = splits["train"], splits["val"], splits["test"]
  info = classifier_lib.train_classifier(config, train["image"], train["labels"], val["image"],
                                         val["labels"], jax.random.fold_in(key, 0xc1a5), out_dir,
                                         steps=steps)
  model = classifier_lib.load_classifier(os.path.dirname(out_dir), os.path.basename(out_dir))
  result = classifier_lib.auroc_on_test(model, test["image"], test["labels"], findings,
                                        resamples=int(config.evaluate.bootstrap),
                                        seed=int(config.seed))
  return {**result, "training": info}


def run(config, workdir: str, **_) -> dict:
  out_dir = os.path.join(workdir, classifier_lib.SUBDIR)
  finished = io_utils.finished_result(out_dir, classifier_lib.RESULT_FILE)
  if finished is not None:
    return finished
  return train_and_write(config, load_labelled_splits(workdir), out_dir)


def train_and_write(config, splits: dict, out_dir: str, *, steps: int = None) -> dict:
  result = utility.as_json(train_and_test(config, splits, out_dir, steps=steps))
  io_utils.finish_stage(out_dir, classifier_lib.RESULT_FILE, result)
  return result

"""The finding classifier on the real splits: trained on train, validated on val (best-val-loss
weights kept), mean AUROC over the findings on the multi-label test split with bootstrap CIs.

What the `train_classifier` stage writes (`classifier/checkpoint_{best,final}`, `training.json`,
`metrics.jsonl`, `classifier.json`, then `COMPLETE`), and the real-data baseline the `evaluate`
stage trains itself when that stage has not run.
"""

import os

import jax

from pso_jax import io_utils
from pso_jax.evaluate import classifier as classifier_lib, utility


def load_labelled_splits(workdir: str) -> dict:
  """train, val and test with lazy image columns (decoded per batch) and resident labels."""
  from pso_jax.data import dataset
  return {name: dataset.load_columns(workdir, name, ("image", "labels"))
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


def train_and_write(config, splits: dict, out_dir: str, *, steps: int = None) -> dict:
  """train_and_test, then its result (classifier.json) and the COMPLETE marker in out_dir."""
  result = utility.as_json(train_and_test(config, splits, out_dir, steps=steps))
  io_utils.finish_stage(out_dir, classifier_lib.RESULT_FILE, result)
  return result

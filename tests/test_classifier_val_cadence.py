"""How often the classifier is validated: once per epoch by default, but never reading more
validation images than the training images it follows (a release much smaller than the val split,
e.g. `select.max_real`, would otherwise be validated at every step)."""

import json
import os

import jax
import numpy as np
import pytest

from conftest import load_config
from pso_jax.evaluate import classifier


def _val_steps(tmp_path, n_train: int, n_val: int, steps: int = 12) -> list:
  config = load_config("tiny")
  config.classifier.batch_size = 8  # the suite's 8 devices
  config.classifier.eval_every = 0
  size, ch = config.data.image_size, config.data.channels
  rng = np.random.default_rng(0)
  images = lambda n: rng.integers(0, 256, (n, size, size, ch), dtype=np.uint8)
  labels = lambda n: np.eye(8, dtype=np.float32)[rng.integers(0, 8, n)]
  out = str(tmp_path / f"cls_{n_train}_{n_val}")
  classifier.train_classifier(config, images(n_train), labels(n_train), images(n_val),
                              labels(n_val), jax.random.key(0), out, steps=steps)
  with open(os.path.join(out, "metrics.jsonl")) as f:
    return [r["step"] for r in map(json.loads, f) if "val" in r]


@pytest.mark.parametrize("n_train, n_val, expected", [
    (16, 16, [2, 4, 6, 8, 10, 12]),  # 2 steps per epoch, val no larger: every epoch
    (16, 32, [4, 8, 12]),            # val twice the train set: every 2 epochs
    (8, 160, [12]),                  # 1 step per epoch, val 20x larger: every 20 steps (the end)
])
def test_validation_reads_no_more_than_the_training_it_follows(tmp_path, n_train, n_val, expected):
  assert _val_steps(tmp_path, n_train, n_val) == expected

"""Finding classifier: 8 sigmoid outputs trained with binary cross-entropy (CheXNet recipe).

Training keeps the weights with the lowest validation loss (the reference keeps its best-val
checkpoint). Validation runs without augmentation (the reference validates with its random train
transform, which only adds noise to the model choice). Test-time: ten-crop averaging of the
sigmoid outputs when configured (reference: Resize(256) then TenCrop(224)), else a plain resize.
"""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pso_jax import io_utils, parallel
from pso_jax.errors import UserError
from pso_jax.models import cnn
from pso_jax.models.batched_apply import FrozenNetwork, check_images
from pso_jax.training import augment, supervised

SUBDIR = "classifier"
RESULT_FILE = "classifier.json"
TRAINING_FILE = "training.json"  # written last by train_classifier: the model is complete


def bce_loss(logits, batch):
  loss = jnp.mean(optax.sigmoid_binary_cross_entropy(logits, batch["labels"]))
  return loss, {}


def make_inputs_fn(section, spec: cnn.CnnSpec):
  def inputs_fn(images, key):
    x = cnn.to_unit_float(images)
    if section.augment:
      k_crop, k_flip = jax.random.split(key)
      x = augment.random_resized_crop(x, k_crop, spec.image_size, (section.crop_min_scale, 1.0))
      x = augment.random_flip(x, k_flip)
    return cnn.normalise(cnn.resize(x, spec.image_size), spec)
  return inputs_fn


def num_steps(section, n_train: int) -> int:
  """config.classifier.steps, or epochs over the training set (drop-remainder batches)."""
  if section.steps > 0:
    return int(section.steps)
  return int(section.epochs) * max(1, n_train // section.batch_size)


def make_sampler(n: int, labels, batch_size: int, seed: int):
  """step -> batch of record indices ("index": the trainer decodes only their images) and their
  labels; a fresh permutation of the n training images per epoch (with replacement if the set is
  tiny)."""
  per_epoch = max(1, n // batch_size)

  def sampler(step: int) -> dict:
    epoch, pos = divmod(step, per_epoch)
    rng = np.random.default_rng([seed, epoch])
    idx = (rng.permutation(n)[pos * batch_size:(pos + 1) * batch_size] if n >= batch_size
           else rng.choice(n, batch_size, replace=True))
    return {"index": idx.astype(np.int64), "labels": labels[idx].astype(np.float32)}

  return sampler


def check_labels(labels, n_images: int, findings, what: str) -> np.ndarray:
  labels = np.asarray(labels)
  if labels.ndim != 2 or labels.shape != (n_images, len(findings)):
    raise UserError(f"{what}: labels have shape {labels.shape}, expected [{n_images}, "
                    f"{len(findings)}] (one 0/1 column per finding: {', '.join(findings)})")
  if not np.isin(labels, (0, 1)).all():
    raise UserError(f"{what}: labels must be 0 or 1 per finding (found values "
                    f"{np.unique(labels)[:5].tolist()}...)")
  return labels.astype(np.float32)


def make_val_fn(model, spec: cnn.CnnSpec, images, labels, batch_size: int):
  """variables -> mean validation BCE (eval mode, no augmentation); `images` an array or a lazy
  column, read one batch at a time."""
  labels = np.asarray(labels, np.float32)

  @jax.jit
  def batch_loss_sum(variables, x, y, mask):
    logits = model.apply(variables, cnn.preprocess(x, spec), train=False)
    per_image = jnp.mean(optax.sigmoid_binary_cross_entropy(logits, y), axis=1)
    return jnp.sum(per_image * mask)

  batch_size = min(batch_size, len(images))

  def val_fn(variables) -> float:
    total = 0.0
    for start in range(0, len(images), batch_size):
      x, y = np.asarray(images[start:start + batch_size]), labels[start:start + batch_size]
      mask = np.ones(batch_size, np.float32)
      mask[len(x):] = 0
      if len(x) < batch_size:  # pad to the fixed shape; padded rows are masked out
        pad = batch_size - len(x)
        x, y = np.concatenate([x, np.asarray(images[:pad])]), np.concatenate([y, labels[:pad]])
      total += float(batch_loss_sum(variables, x, y, mask))
    return total / len(images)

  return val_fn


@dataclasses.dataclass
class Classifier:
  """A trained finding classifier: `.predict(images_uint8 NHWC) -> probabilities [N, 8]`."""
  spec: cnn.CnnSpec
  variables: dict
  ten_crop: bool = False
  batch_size: int = 128

  def __post_init__(self):
    model, spec = cnn.build_cnn(self.spec), self.spec

    def probs(variables, x):
      x = cnn.to_unit_float(x)
      if not self.ten_crop:
        return jax.nn.sigmoid(model.apply(variables, cnn.normalise(cnn.resize(x, spec.image_size),
                                                                    spec), train=False))
      # reference: Resize(256) then TenCrop(224), i.e. crops of size/256*224
      x = cnn.resize(x, int(round(spec.image_size * 256 / 224)))
      crops = augment.ten_crop(x, spec.image_size)
      flat = crops.reshape((-1,) + crops.shape[2:])
      p = jax.nn.sigmoid(model.apply(variables, cnn.normalise(flat, spec), train=False))
      return jnp.mean(p.reshape(10, -1, p.shape[-1]), axis=0)

    self._probs = FrozenNetwork(probs, self.variables, batch_size=self.batch_size)

  def predict(self, images) -> np.ndarray:
    return self._probs(check_images(images, self.spec.channels, "classifier")).astype(np.float32)


def _as_images(images):
  """A lazy column as it is (it has shape and row indexing), anything else as a numpy array."""
  return images if hasattr(images, "shape") and hasattr(images, "__getitem__") else np.asarray(images)


def checkpoint_dir(out_dir: str, which: str = "best") -> str:
  return os.path.join(out_dir, "checkpoint_" + which)


def train_classifier(config, train_images, train_labels, val_images, val_labels, key, out_dir,
                     *, steps: int = None) -> dict:
  """Trains the configured classifier, keeps the best-val-loss and final weights (orbax) and
  writes `training.json`; returns its content. `steps` overrides the config's duration. Images:
  arrays or lazy columns (`data.dataset.RecordColumn`: decoded one batch at a time)."""
  section, findings = config.classifier, tuple(config.data.findings)
  train_images, val_images = _as_images(train_images), _as_images(val_images)
  train_labels = check_labels(train_labels, len(train_images), findings, "training set")
  val_labels = check_labels(val_labels, len(val_images), findings, "validation set")
  if len(train_images) == 0 or len(val_images) == 0:
    raise UserError("the classifier needs a non-empty training and validation set")
  if train_images.shape[1:] != val_images.shape[1:]:
    raise UserError(f"training images {train_images.shape[1:]} and validation images "
                    f"{val_images.shape[1:]} differ in shape")
  spec = cnn.spec_from_config(section, head="logits", out_dim=len(findings),
                              channels=train_images.shape[-1])
  model = cnn.build_cnn(spec)
  steps = num_steps(section, len(train_images)) if steps is None else int(steps)
  per_epoch = max(1, len(train_images) // section.batch_size)
  # validation (once per epoch by default) never reads more images than the training it follows:
  # a release much smaller than the val split would otherwise be validated at every step
  per_eval = per_epoch * -(-len(val_images) // len(train_images))
  k_init, k_train = jax.random.split(key)
  fitted = supervised.fit(
      model=model, variables=cnn.init_cnn(spec, k_init, section.weights),
      optimizer=supervised.make_supervised_optimizer(section.lr, section.weight_decay),
      inputs_fn=make_inputs_fn(section, spec), loss_fn=bce_loss,
      sampler=make_sampler(len(train_images), train_labels, section.batch_size, config.seed),
      images=train_images, steps=steps, key=k_train, mesh=parallel.make_mesh(config.mesh), desc="classifier",
      val_fn=make_val_fn(model, spec, val_images, val_labels, 4 * section.batch_size),
      eval_every=section.eval_every or per_eval, log_every=max(1, min(50, steps // 10)),
      plateau=(supervised.Plateau(int(section.plateau_patience), float(section.plateau_factor))
               if section.plateau_patience >= 0 else None))
  supervised.save_variables(checkpoint_dir(out_dir, "best"), fitted.best_variables)
  supervised.save_variables(checkpoint_dir(out_dir, "final"), fitted.variables)
  supervised.write_history(os.path.join(out_dir, "metrics.jsonl"), fitted.history)
  info = {"model": spec.to_dict(), "ten_crop_test": bool(section.ten_crop_test), "steps": steps,
          "best_step": fitted.best_step, "best_val_loss": fitted.best_val,
          "final_train_loss": next(h["loss"] for h in reversed(fitted.history) if "loss" in h),
          "n_train": len(train_images), "n_val": len(val_images),
          "train_seconds": fitted.seconds}
  if jax.process_index() == 0:
    io_utils.write_json(os.path.join(out_dir, TRAINING_FILE), info)
  return info


def load_classifier(workdir: str, subdir: str = SUBDIR, which: str = "best") -> Classifier:
  out_dir = os.path.join(workdir, subdir)
  path = os.path.join(out_dir, TRAINING_FILE)
  if not os.path.exists(path):
    raise UserError(f"no trained finding classifier in {out_dir!r}; run --mode=train_classifier "
                    "first")
  info = io_utils.read_json(path)
  spec = cnn.CnnSpec.from_dict(info["model"])
  abstract = jax.eval_shape(lambda: cnn.init_cnn(spec, jax.random.key(0)))
  variables = supervised.restore_variables(checkpoint_dir(out_dir, which), abstract)
  return Classifier(spec=spec, variables=variables, ten_crop=bool(info["ten_crop_test"]))


def auroc_on_test(classifier: Classifier, test_images, test_labels, findings, *, resamples: int,
               seed: int) -> dict:
  """Mean and per-finding AUROC with bootstrap CIs of one classifier on the test split."""
  from pso_jax.data import pipeline
  from pso_jax.evaluate import utility
  labels = check_labels(test_labels, len(test_images), findings, "test set")
  # every test image once, the work split over the processes
  probs = pipeline.split_pass(classifier.predict, test_images, desc="classifier: test")
  report = utility.utility_report({"model": probs}, labels, findings, resamples=resamples,
                                  seed=seed)
  model = report.pop("models")["model"]
  return {**model, **report}

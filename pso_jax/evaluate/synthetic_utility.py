"""How useful and how diverse a released synthetic set is (what the `evaluate` stage computes).

Utility: the same classifier recipe trained (a) on the real training split (the
`train_classifier` stage's model, trained here if that stage has not run) and (b) on the released
synthetic images with the labels of their source images, for the same number of steps; both
validated on real val and tested on the real multi-label test split. Reported: mean and per-finding
AUROC with bootstrap 95% CIs and the paired difference synthetic - real (the paper's claim: within
one AUROC point).
Diversity: image retrieval score and Fréchet distance in a feature space that exists for synthetic
images too: the pseudo-conditioning features (computed with the extractor `prepare` used), or, when
those come from an external extractor (`config.data.features.kind=file`, which pso_jax cannot run
on synthetic images), the real-data classifier's penultimate embedding (its pooled features, what
its logits head reads), centred on the training images. The result names the space it used.
"""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pso_jax import io_utils
from pso_jax.errors import UserError
from pso_jax.evaluate import classifier as classifier_lib
from pso_jax.evaluate import classifier_training, utility
from pso_jax.models import cnn
from pso_jax.models.batched_apply import FrozenNetwork, check_images

SUBDIR = "evaluate"
RESULT_FILE = "evaluate.json"
SYNTHETIC_CLASSIFIER = os.path.join(SUBDIR, "classifier_synthetic")
ONE_POINT = 0.01


def check_synthetic(released: dict, train: dict, findings) -> np.ndarray:
  """The synthetic labels as float32 [N, 8], after checking they are the real label space and
  equal the labels of each image's source training image."""
  images, labels = released.get("images"), released.get("labels")
  if images is None or len(images) == 0:
    raise UserError("the released synthetic set is empty; nothing to evaluate (rerun --mode=select)")
  if labels is None or np.size(labels) == 0:
    raise UserError("the synthetic set has no labels (release/filelist.txt needs "
                    f"`<path> l0 ... l{len(findings) - 1}` lines); rerun --mode=select")
  labels = classifier_lib.check_labels(labels, len(images), findings, "synthetic set")
  if tuple(images.shape[1:]) != tuple(train["image"].shape[1:]):
    raise UserError(f"synthetic images are {images.shape[1:]} but real images "
                    f"{train['image'].shape[1:]}; the synthetic set was made for another dataset")
  source = released.get("source_index")
  if source is not None:
    source = np.asarray(source)
    if source.min() < 0 or source.max() >= len(train["labels"]):
      raise UserError("synthetic source indices point outside the real training split; the "
                      "synthetic set belongs to another dataset")
    mismatch = np.flatnonzero((labels != train["labels"][source]).any(axis=1))
    if mismatch.size:
      i = int(mismatch[0])
      raise UserError(f"{mismatch.size} synthetic images carry labels that differ from their source "
                      f"image's (e.g. {released['paths'][i]}: {labels[i].astype(int).tolist()} vs "
                      f"{train['labels'][source[i]].astype(int).tolist()}); the synthetic filelist "
                      "does not match the real label space; rerun --mode=select")
  return labels


def synthetic_features(config, workdir: str, synthetic_images, train_images):
  """(synthetic, train, test) features in the pseudo-conditioning space, or a note why not."""
  from pso_jax.data import dataset, features
  kind = features.check_kind(config)
  if kind == "file":
    return None, ("diversity skipped: features come from an external extractor "
                  "(config.data.features.kind=file) that pso_jax cannot run on synthetic images")
  train_feats, test_feats = dataset.load_features(workdir, "train"), dataset.load_features(workdir, "test")
  from pso_jax.data import pipeline  # images (arrays or lazy columns) stream: features per batch
  raw_syn = pipeline.in_batches(lambda x: features.raw_features(config, x), synthetic_images)
  if kind == "random_projection":  # whitened on train statistics, as prepare does
    raw = {"train": pipeline.in_batches(lambda x: features.raw_features(config, x), train_images),
           "synthetic": raw_syn}
    syn = features.finalise(config, raw)["synthetic"]
  else:
    syn = features.unit_normalise(raw_syn)
  return (syn, train_feats, test_feats), None


# the diversity metrics' feature spaces: evaluate.json's feature_space is features:<kind> or
# classifier_penultimate, and feature_space_description says it in words
SPACES = {
    "features": "pseudo-conditioning features (config.data.features.kind={kind})",
    "classifier": "the real-data classifier's penultimate embedding ({arch}, {dim}-d), centred "
                  "on the training images",
}


def classifier_embedding(classifier: classifier_lib.Classifier, images) -> np.ndarray:
  """[N, d] penultimate features of a trained classifier: the pooled features its logits head
  reads, at its plain eval-time input (resize, no crops)."""
  spec = classifier.spec
  model = cnn.build_cnn(spec)

  def head_input(next_fun, args, kwargs, context):  # the head's input is the model's output
    if isinstance(context.module, cnn.Head) and context.method_name == "__call__":
      return args[0].astype(jnp.float32)
    return next_fun(*args, **kwargs)

  def embed(variables, x):
    with nn.intercept_methods(head_input):
      return model.apply(variables, cnn.preprocess(x, spec), train=False)

  net = FrozenNetwork(embed, classifier.variables, batch_size=classifier.batch_size)
  return net(check_images(images, spec.channels, "classifier")).astype(np.float32)


def diversity_embeddings(config, workdir: str, synthetic_images, splits: dict, real_model):
  """((synthetic, train, test) embeddings, space name, its description) for the diversity
  metrics: the pseudo-conditioning features where pso_jax computes them, else the real-data
  classifier's penultimate embedding (centred on train: retrieval is by cosine similarity, and
  ReLU features all lie in one orthant; the Fréchet distance does not change under a shift)."""
  spaces, _ = synthetic_features(config, workdir, synthetic_images, splits["train"]["image"])
  if spaces is not None:
    kind = config.data.features.kind
    return spaces, f"features:{kind}", SPACES["features"].format(kind=kind)
  embed = lambda images: classifier_embedding(real_model, images)
  train = embed(splits["train"]["image"])
  centre = train.mean(axis=0, keepdims=True)
  spaces = tuple(x - centre for x in (embed(synthetic_images), train, embed(splits["test"]["image"])))
  words = SPACES["classifier"].format(arch=real_model.spec.arch, dim=train.shape[1])
  return spaces, "classifier_penultimate", words


def real_classifier(config, workdir: str, splits: dict):
  """(model, stage result) of the real-data classifier, training it when missing."""
  if not os.path.exists(os.path.join(workdir, classifier_lib.SUBDIR, io_utils.COMPLETE)):
    classifier_training.train_and_write(config, splits,
                                        os.path.join(workdir, classifier_lib.SUBDIR))
  result = io_utils.read_json(os.path.join(workdir, classifier_lib.SUBDIR,
                                           classifier_lib.RESULT_FILE))
  return classifier_lib.load_classifier(workdir), result


def evaluate(config, workdir: str, splits: dict, released: dict) -> dict:
  findings = tuple(config.data.findings)
  syn_labels = check_synthetic(released, splits["train"], findings)
  real_model, real_result = real_classifier(config, workdir, splits)
  steps = int(real_result["training"]["steps"])
  syn_dir = os.path.join(workdir, SYNTHETIC_CLASSIFIER)
  if not os.path.exists(os.path.join(syn_dir, classifier_lib.TRAINING_FILE)):
    key = jax.random.fold_in(jax.random.key(config.seed), 0x5d17)
    classifier_lib.train_classifier(config, released["images"], syn_labels, splits["val"]["image"],
                                    splits["val"]["labels"], key, syn_dir, steps=steps)
  syn_info = io_utils.read_json(os.path.join(syn_dir, classifier_lib.TRAINING_FILE))
  syn_model = classifier_lib.load_classifier(workdir, SYNTHETIC_CLASSIFIER)
  test = splits["test"]
  test_labels = classifier_lib.check_labels(test["labels"], len(test["image"]), findings, "test set")
  report = utility.utility_report(
      {"real": real_model.predict(test["image"]), "synthetic": syn_model.predict(test["image"])},
      test_labels, findings, resamples=int(config.evaluate.bootstrap), seed=int(config.seed))
  diff = report.get("difference", {}).get("value")
  report["within_one_point"] = None if diff is None else bool(diff >= -ONE_POINT)

  from pso_jax.evaluate import diversity as diversity_lib
  (syn, train, real_test), space, words = diversity_embeddings(
      config, workdir, released["images"], splits, real_model)
  diversity = diversity_lib.diversity_report(
      syn, train, real_test, seed=int(config.seed), query_block=int(config.audit.query_block),
      ref_block=int(config.audit.ref_block))
  diversity.update(feature_space=space, feature_space_description=words)
  return {"utility": report, "diversity": diversity, "n_synthetic": int(len(released["images"])),
          "n_real_train": int(len(splits["train"]["image"])), "steps": steps,
          "real_classifier": real_result["training"], "synthetic_classifier": syn_info}

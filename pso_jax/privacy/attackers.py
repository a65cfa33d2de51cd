"""The audit's attackers: embedding spaces, each with its own threshold, that selection never used.

- `reid`: a re-identification model trained like selection's (config.reid) but with another seed
  (config.audit.attacker_seed) on the attacker split: patients that prepare set aside
  (config.data.attacker_patients), whom neither selection's model nor the audit's holdout saw. The
  audit trains it into audit/attacker_reid/, or reads one from config.audit.attacker_model.
- `features`: the pseudo-conditioning feature space (`data.features`): what the generator saw.
- `pixels`: images average-pooled to config.audit.pixel_size, mean-free, unit-norm: the naive one.
- `self_check`: selection's own re-id model, audited beside them but outside the verdict: every
  image it links to a training patient was rejected by selection, so it passes by construction.

An attacker's tau is calibrated on val pairs of different patients at config.reid.target_fpr (the
rule of selection's model) and never on the audited set; the audit then raises it to
config.audit.chance_match_rate among training patients (`privacy.audit.reference`).
"""

import dataclasses
import os
from typing import Any

import numpy as np

from pso_jax import io_utils
from pso_jax.data import features, filelists, pipeline
from pso_jax.errors import UserError
from pso_jax.privacy import reid

INDEPENDENT = ("reid", "features", "pixels")
SELF_CHECK = "self_check"
MODEL_SUBDIR = "attacker_reid"   # under the audit's folder: the reid attacker trained there
WHAT = {"reid": "re-id model trained on the attacker split (another seed)",
        "features": "pseudo-conditioning feature space",
        "pixels": "downsampled, normalised pixels",
        SELF_CHECK: "selection's own re-id model (self-check, outside the verdict)"}


@dataclasses.dataclass
class Attacker:
  name: str
  embedder: Any       # .embed(uint8 [N, H, W, C]) -> [N, d] unit-norm
  tau: float          # before the audit's 1-vs-N calibration
  tau_source: str
  provenance: dict

  @property
  def independent(self) -> bool:
    return self.name != SELF_CHECK


# ----------------------------------------------------------------------------- embedders

class PixelEmbedder:
  """Images average-pooled to size x size (x channels), mean-free, unit-norm; computed row by row,
  so images (an array or a lazy column) are read a batch at a time."""

  def __init__(self, size: int):
    self.size = int(size)

  def embed(self, images) -> np.ndarray:
    done = [0]  # rows before the current batch, for the error's row number

    def batch(x):
      out = self._embed(x, done[0])
      done[0] += len(x)
      return out
    return pipeline.in_batches(batch, images)

  def _embed(self, x, offset: int) -> np.ndarray:
    n, h, w, c = x.shape
    if h % self.size or w % self.size:
      raise UserError(f"config.audit.pixel_size={self.size} must divide the image size {h}x{w}")
    x = x.astype(np.float64).reshape(n, self.size, h // self.size, self.size, w // self.size, c)
    x = x.mean(axis=(2, 4)).reshape(n, -1)
    x -= x.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    flat = norm[:, 0] == 0
    if flat.any():
      raise UserError(f"the pixels attacker cannot compare {int(flat.sum())} images without any "
                      f"contrast (first: row {offset + int(np.argmax(flat))}): their normalised pixels "
                      "are undefined; drop them from the set")
    return (x / norm).astype(np.float32)


class FeatureEmbedder:
  """The pseudo-conditioning features of any image, as prepare computed them for the real ones
  (raw features whitened with the training split's statistics for random projections). Raw
  features are per image: images (arrays or lazy columns) are read a batch at a time; the raw
  training features [N, raw dim] stay resident."""

  def __init__(self, config, train_images):
    self.config = config
    self.raw_train = pipeline.split_pass(self._raw, train_images, desc="features: train")

  def _raw(self, images) -> np.ndarray:
    return pipeline.in_batches(lambda x: features.raw_features(self.config, x), images)

  def embed(self, images) -> np.ndarray:
    raw = {"train": self.raw_train, "query": self._raw(images)}
    return features.finalise(self.config, raw)["query"]


# ----------------------------------------------------------------------------- checks

def check_config(config) -> None:
  """The attackers' settings, before anything is read."""
  a = config.audit
  names = tuple(a.attackers)
  unknown = [n for n in names if n not in INDEPENDENT]
  if not names or unknown or len(set(names)) != len(names):
    raise UserError(f"config.audit.attackers={names} must name each of its attackers once, from "
                    f"{INDEPENDENT}; the verdict needs at least one")
  if "features" in names and config.data.features.kind == "file":
    raise UserError("config.audit.attackers names 'features', but config.data.features.kind='file' "
                    "comes from an external extractor pso_jax cannot run on released images: drop "
                    "'features' or use kind=random_projection or resnet50")
  if "pixels" in names and (a.pixel_size < 1 or config.data.image_size % a.pixel_size):
    raise UserError(f"config.audit.pixel_size={a.pixel_size} must be a positive divisor of "
                    f"config.data.image_size={config.data.image_size}")
  if not 0 < a.test_size < 1:
    raise UserError(f"config.audit.test_size={a.test_size} is the verdict's false-alarm rate: a "
                    "probability in (0, 1), e.g. 0.05")
  if a.holdout_split not in filelists.SPLITS or a.holdout_split == "train":
    raise UserError(f"config.audit.holdout_split={a.holdout_split!r} must be val or test: the "
                    "holdout must be patient-disjoint from training and from the attacker split")


def check_independent(what: str, patients, **others) -> None:
  """An attacker's training patients may be in none of the `others` sets (name=patient ids)."""
  patients = np.unique(np.asarray(patients).astype(str))
  for other, ids in others.items():
    shared = np.intersect1d(patients, np.asarray(ids).astype(str))
    if len(shared):
      listed = ", ".join(repr(str(p)) for p in shared[:5]) + (", ..." if len(shared) > 5 else "")
      raise UserError(f"{what} shares {len(shared)} patients with the {other} set ({listed}); an "
                      "independent attacker must be trained on other patients: re-run "
                      "--mode=prepare with config.data.attacker_patients in a new workdir, or "
                      "point config.audit.attacker_model at a model trained on other patients")


def check_unit_norm(name: str, embeddings, tolerance: float = 1e-3) -> np.ndarray:
  """float32 embeddings whose rows have norm 1; NaN rows and other norms are named."""
  x = np.asarray(embeddings, np.float32)
  norms = np.linalg.norm(x.astype(np.float64), axis=1)
  bad = ~(np.abs(norms - 1) <= tolerance)  # NaN norms are bad too
  if bad.any():
    i = int(np.argmax(bad))
    raise UserError(f"the {name} attacker's embeddings are not unit-norm: {int(bad.sum())} of "
                    f"{len(x)} rows (first: row {i}, norm {norms[i]:.4g}); similarities would not "
                    "be cosines (NaN for NaN rows). Normalise its embedder's output")
  return x


# ----------------------------------------------------------------------------- building them

def calibrate(config, embedder, val: dict) -> tuple[float, str]:
  """tau at config.reid.target_fpr over different-patient val pairs of this embedding."""
  r = config.reid
  emb = check_unit_norm("calibration", pipeline.split_pass(embedder.embed, val["image"],
                                                           desc="calibration: val"))
  # make_pairs' pairs a block at a time: 5 bytes per pair held, not their two int64 indices
  sims, same = reid.pair_table(emb, val["patient_id"], int(r.max_pairs), int(config.seed))
  tau = reid.tau_at_fpr(sims[~same], float(r.target_fpr))
  return tau, (f"FPR {float(r.target_fpr):g} over {int((~same).sum())} different-patient val "
               "pairs")


def _external_model(config, path: str, shape, train, holdout) -> tuple[reid.ReidModel, dict]:
  """A re-id model from config.audit.attacker_model, checked before it is used."""
  info_path = os.path.join(path, reid.RESULT_FILE)
  if not os.path.exists(info_path):
    raise UserError(f"config.audit.attacker_model={path!r} holds no {reid.RESULT_FILE}; point "
                    "it at a trained re-id model's folder (e.g. another workdir's "
                    "audit/attacker_reid)")
  info = io_utils.read_json(info_path)
  trained_on = info.get("data_image_shape")
  if trained_on is None or list(trained_on) != list(shape):
    raise UserError(f"the attacker model in {path!r} was trained on images of shape {trained_on}, "
                    f"this dataset's are {list(shape)}: it would see resized or different images. "
                    "Train one here (config.audit.attacker_model='')")
  patients_path = os.path.join(path, reid.PATIENTS_FILE)
  if not os.path.exists(patients_path):
    raise UserError(f"the attacker model in {path!r} does not list its training patients "
                    f"({reid.PATIENTS_FILE}), so its independence cannot be checked")
  with open(patients_path, encoding="utf-8") as f:
    patients = [line.strip() for line in f if line.strip()]
  check_independent(f"the attacker model in {path!r}", patients, training=train["patient_id"],
                    holdout=holdout["patient_id"])
  return reid.load_reid(path, ""), {"model": path, "trained_on": info.get("tau_provenance")}


def attacker_split(workdir: str) -> dict:
  from pso_jax.data import dataset
  card = dataset.load_card(workdir)
  if card["splits"].get(filelists.ATTACKER, {}).get("records", 0) == 0:
    raise UserError("config.audit.attackers names 'reid', but the prepared data has no attacker "
                    "split: prepare a new workdir with --config.data.attacker_patients=N (patients "
                    "set aside for the attacker), or drop 'reid' from config.audit.attackers")
  return dataset.load_columns(workdir, filelists.ATTACKER, keys=("image", "patient_id"))


def _reid_attacker(config, workdir: str, out_dir: str, train, val, holdout):
  """The reid attacker's model: config.audit.attacker_model, the one trained in out_dir, or one
  trained now on the attacker split (every check first)."""
  if config.audit.attacker_model:
    return _external_model(config, str(config.audit.attacker_model), train["image"].shape[1:],
                           train, holdout)
  split = attacker_split(workdir)
  # val calibrates the attacker's tau: it may not have trained on those patients either
  check_independent("the attacker split", split["patient_id"], training=train["patient_id"],
                    holdout=holdout["patient_id"], validation=val["patient_id"])
  model_dir = os.path.join(out_dir, MODEL_SUBDIR)
  if not os.path.exists(os.path.join(model_dir, io_utils.COMPLETE)):
    from pso_jax.privacy import reid_training
    reid_training.train_and_write(config, {"train": split, "val": val}, model_dir,
                                  seed=int(config.audit.attacker_seed))
  info = io_utils.read_json(os.path.join(model_dir, reid.RESULT_FILE))
  return reid.load_reid(model_dir, ""), {
      "model": model_dir, "seed": info.get("seed"), "val_auc": info.get("auc"),
      "trained_on": f"{len(split['image'])} images of {len(np.unique(split['patient_id']))} "
                    "attacker-split patients"}


def build(config, workdir: str, out_dir: str, train: dict, val: dict, holdout: dict) -> list:
  """The configured independent attackers (in config order), then the self-check."""
  out = []
  for name in config.audit.attackers:
    provenance = {"what": WHAT[name]}
    if name == "reid":
      embedder, more = _reid_attacker(config, workdir, out_dir, train, val, holdout)
      provenance.update(more)
    elif name == "features":
      embedder = FeatureEmbedder(config, train["image"])
      provenance["kind"] = str(config.data.features.kind)
    else:
      embedder = PixelEmbedder(int(config.audit.pixel_size))
      provenance["size"] = int(config.audit.pixel_size)
    tau, source = calibrate(config, embedder, val)
    out.append(Attacker(name, embedder, tau, source, provenance))
  own = reid.load_reid(workdir)
  given = config.audit.tau >= 0
  out.append(Attacker(SELF_CHECK, own, float(config.audit.tau) if given else float(own.tau),
                      "config.audit.tau" if given else "selection's re-id calibration",
                      {"what": WHAT[SELF_CHECK], "model": os.path.join(workdir, reid.SUBDIR),
                       "reid": io_utils.read_json(os.path.join(workdir, reid.SUBDIR,
                                                               reid.RESULT_FILE))}))
  return out

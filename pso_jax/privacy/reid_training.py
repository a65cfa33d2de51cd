"""Training the re-identification embedder: supervised contrastive loss on batches of P patients x K
scans from the train split; tau calibrated on every pair of val images (patients unseen in
training); AUC, TPR and FPR at tau on val and on test pairs (held-out patients, untouched by the
calibration). What the `train_reid` stage writes: `reid/checkpoint` (orbax), `reid/reid.json`,
`reid/metrics.jsonl`, then `reid/COMPLETE`.
"""

import os
import time

import jax
import numpy as np

from pso_jax import io_utils, parallel
from pso_jax.data import pipeline
from pso_jax.privacy import reid
from pso_jax.errors import UserError
from pso_jax.evaluate import utility
from pso_jax.models import cnn
from pso_jax.training import augment, supervised


def patient_groups(patient_ids) -> list:
  """Indices of each patient's images, one array per patient."""
  _, inverse = np.unique(np.asarray(patient_ids), return_inverse=True)
  order = np.argsort(inverse, kind="stable")
  bounds = np.flatnonzero(np.r_[True, inverse[order][1:] != inverse[order][:-1], True])
  return [order[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:])]


def make_sampler(patient_ids, batch_size: int, scans_per_patient: int, seed: int):
  """step -> batch of P = batch_size / K patients x K scans as record indices ("index"; the
  trainer decodes only their images) and patient labels (scans drawn with replacement only when a
  patient has fewer than K; the augmentation still makes the copies differ). Needs only the
  patient ids: the P x K batches come from the records, not from images held in memory."""
  k = scans_per_patient
  if k < 2 or batch_size % k:
    raise UserError(f"config.reid.batch_size ({batch_size}) must be a multiple of "
                    f"config.reid.scans_per_patient ({k}), which must be at least 2")
  groups = patient_groups(patient_ids)
  n_patients = batch_size // k

  def sampler(step: int) -> dict:
    rng = np.random.default_rng([seed, step])
    chosen = rng.choice(len(groups), n_patients, replace=len(groups) < n_patients)
    idx = np.concatenate([rng.choice(groups[g], k, replace=len(groups[g]) < k) for g in chosen])
    return {"index": idx.astype(np.int64), "label": np.repeat(chosen, k).astype(np.int32)}

  return sampler


def make_inputs_fn(section, spec: cnn.CnnSpec):
  """Training augmentation: a whole-pixel shift at the data's resolution, mild random resized crop
  and exposure jitter, no flip (left-right anatomy is part of what identifies a patient)."""
  def inputs_fn(images, key):
    k_shift, k_crop, k_int = jax.random.split(key, 3)
    x = cnn.to_unit_float(images)
    # before the resize: a copy shifted by 1 px at 32 px is a half-pixel shift at the net's 16 px
    x = augment.random_translate(x, k_shift, int(section.shift), str(section.shift_mode))
    x = augment.random_resized_crop(x, k_crop, spec.image_size, (section.crop_min_scale, 1.0),
                                    (0.9, 1 / 0.9))
    x = augment.random_intensity(x, k_int, section.intensity)
    return cnn.normalise(x, spec)
  return inputs_fn


def verification_metrics(model: reid.ReidModel, images, patient_ids, *, max_pairs: int,
                         resamples: int, seed: int, tau=None, mode: str = "fpr",
                         target_fpr: float = 1e-3) -> dict:
  """Pair AUC with bootstrap CI, and TPR/FPR at tau (calibrated here when tau is None)."""
  # every image embedded once, the work split over the processes (images: array or lazy column);
  # the pairs' similarities then a block at a time: their indices are never held for all pairs
  sims, same = reid.pair_table(pipeline.split_pass(model.embed, images, desc="re-id: pairs"),
                               patient_ids, max_pairs, seed)
  if tau is None:
    tau = reid.calibrate_tau(sims, same, mode, target_fpr)
  return {"tau": tau, **utility.auc_with_ci(sims, same, resamples, seed),
          **reid.rates_at(sims, same, tau), "n_same": int(same.sum()),
          "n_different": int((~same).sum()), "n_images": int(len(images)),
          "n_patients": int(len(set(patient_ids)))}


def check_splits(splits: dict, section) -> None:
  """Patient-disjoint train/val(/test), each able to form same- and different-patient pairs."""
  for name in ("train", "val"):
    if name not in splits:
      raise UserError(f"re-id training needs the {name} split")
  seen = {}
  for name in [n for n in ("train", "val", "test") if n in splits]:
    for other, patients in seen.items():
      shared = set(patients) & set(np.asarray(splits[name]["patient_id"]).tolist())
      if shared:
        raise UserError(f"splits {other} and {name} share {len(shared)} patients (e.g. "
                        f"{sorted(shared)[0]!r}); re-id calibration needs patient-disjoint splits: "
                        "rerun --mode=prepare")
    seen[name] = np.asarray(splits[name]["patient_id"]).tolist()
    counts = np.unique(seen[name], return_counts=True)[1]
    if len(counts) < 2 or counts.max() < 2:
      raise UserError(f"the {name} split has {len(counts)} patients with at most "
                      f"{counts.max() if len(counts) else 0} images each: re-id needs at least two "
                      "patients and one patient with two or more scans per split (use more patients "
                      "or scans per patient)")
  if (int(section.shift) < 0 or int(section.embed_shifts) < 0
      or section.shift_mode not in augment.TRANSLATE_MODES):
    raise UserError(f"config.reid.shift and embed_shifts must be >= 0 (0: off) and "
                    f"config.reid.shift_mode one of {augment.TRANSLATE_MODES}, got "
                    f"{section.shift}, {section.embed_shifts} and {section.shift_mode!r}")
  if section.tau_mode not in reid.TAU_MODES:
    raise UserError(f"config.reid.tau_mode must be one of {reid.TAU_MODES}, "
                    f"got {section.tau_mode!r}")


def train_reid(config, splits: dict, out_dir: str, key=None, seed=None) -> dict:
  """Trains, checkpoints and calibrates the embedder; `splits[name]` = {"image", "patient_id"}
  for train, val and (optionally: AUC on val otherwise) test. seed: of the initialisation and the
  batches (default config.seed). Returns the result written to reid.json; the training patients
  are listed in PATIENTS_FILE beside it."""
  section = config.reid
  check_splits(splits, section)
  train = splits["train"]
  images = train["image"]  # an array or a lazy column: the trainer decodes its batches' rows
  spec = cnn.spec_from_config(section, head="embed", out_dim=section.embed_dim,
                              channels=images.shape[-1])
  seed = int(config.seed if seed is None else seed)
  key = jax.random.key(seed) if key is None else key
  k_init, k_train = jax.random.split(jax.random.fold_in(key, 0x5e1d))
  sampler = make_sampler(train["patient_id"], section.batch_size, section.scans_per_patient, seed)
  steps = int(section.steps)
  fitted = supervised.fit(
      model=cnn.build_cnn(spec), variables=cnn.init_cnn(spec, k_init, section.weights),
      optimizer=supervised.make_supervised_optimizer(section.lr, section.weight_decay, steps, "cosine"),
      inputs_fn=make_inputs_fn(section, spec),
      loss_fn=lambda z, batch: reid.supcon_loss(z, batch["label"], section.temperature),
      sampler=sampler, images=images, steps=steps, key=k_train,
      mesh=parallel.make_mesh(config.mesh), desc="train_reid", log_every=max(1, min(50, steps // 10)))
  supervised.save_variables(reid.checkpoint_dir(out_dir), fitted.variables)
  io_utils.write_text(os.path.join(out_dir, reid.PATIENTS_FILE),
                      "".join(f"{p}\n" for p in np.unique(np.asarray(train["patient_id"]))))
  supervised.write_history(os.path.join(out_dir, "metrics.jsonl"), fitted.history)

  model = reid.ReidModel(spec=spec, variables=fitted.variables, tau=float("nan"),
                         embed_shifts=int(section.embed_shifts))
  common = dict(max_pairs=int(section.max_pairs), resamples=int(section.bootstrap), seed=seed)
  start = time.time()
  val = verification_metrics(model, splits["val"]["image"], splits["val"]["patient_id"],
                             mode=section.tau_mode, target_fpr=section.target_fpr, **common)
  test = None if "test" not in splits else verification_metrics(
      model, splits["test"]["image"], splits["test"]["patient_id"], tau=val["tau"], **common)
  shown = test or val  # AUC and rates on held-out pairs where there are some
  return {
      "tau": val["tau"], "tau_mode": section.tau_mode, "target_fpr": float(section.target_fpr),
      "tau_provenance": f"calibrated on {val['n_different']} different-patient and "
                        f"{val['n_same']} same-patient VAL pairs ({section.tau_mode})",
      "auc": shown["auc"], "auc_ci": shown["auc_ci"], "tpr": shown["tpr"], "fpr": shown["fpr"],
      "auc_on": "test" if "test" in splits else "val",
      "val": val, "test": test, "model": spec.to_dict(), "seed": seed,
      "data_image_shape": list(images.shape[1:]),
      "embed_shifts": int(section.embed_shifts), "steps": steps,
      "final_loss": fitted.history[-1]["loss"], "train_seconds": fitted.seconds,
      "eval_seconds": time.time() - start, "checkpoint": reid.checkpoint_dir(out_dir)}


def load_splits(workdir: str, keys=("image", "patient_id")) -> dict:
  """train, val and test with lazy image columns (decoded per batch) and resident patient ids."""
  from pso_jax.data import dataset
  return {name: dataset.load_columns(workdir, name, keys) for name in ("train", "val", "test")}


def train_and_write(config, splits: dict, out_dir: str, seed=None) -> dict:
  """train_reid, then its result (reid.json) and the COMPLETE marker in out_dir."""
  result = utility.as_json(train_reid(config, splits, out_dir, seed=seed))
  io_utils.finish_stage(out_dir, reid.RESULT_FILE, result)
  return result

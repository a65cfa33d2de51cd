"""The selection's workdir side: its inputs built from a trained workdir (re-id embeddings, classifier
outputs, the patient search), the guard that a resumed selection uses the same model, and the
list files of the selection (internal) and of the release.
"""

import json
import os

import jax
import numpy as np

from pso_jax import io_utils
from pso_jax.data import pipeline, release
from pso_jax.diffusion import sampling
from pso_jax.errors import UserError
from pso_jax.privacy import selection


def check_same_model(out_dir: str, fingerprint: dict, chunk_images: int) -> None:
  path = os.path.join(out_dir, "run.json")
  current = dict(fingerprint=fingerprint, chunk_images=chunk_images)
  if os.path.exists(path):
    stored = io_utils.read_json(path)
    if stored != current:
      raise UserError(
          f"{out_dir!r} holds a selection made by another model or selection config "
          f"({stored} here, now {current}); delete {out_dir} and "
          f"{os.path.join(os.path.dirname(out_dir), release.RELEASE_DIR)} to select again with "
          "this model, or use a new --workdir")
  elif jax.process_index() == 0:
    io_utils.write_json(path, current)


def build_inputs(config, workdir: str, train: dict, generate) -> selection.SelectionInputs:
  """Real images' embeddings and classifier outputs, patient ids, and the search over them."""
  from pso_jax.search.pairwise import patient_search
  from pso_jax.privacy.reid import load_reid
  from pso_jax.evaluate.classifier import load_classifier
  reid, classifier = load_reid(workdir), load_classifier(workdir)
  tau = float(config.audit.tau) if config.audit.tau >= 0 else float(reid.tau)
  images = train["image"]  # an array or a lazy column: the networks read it batch by batch
  # every training image once, the work split over the processes
  real_embeddings = np.asarray(pipeline.split_pass(reid.embed, images, desc="re-id: train"), np.float32)
  names, patients = np.unique(np.asarray(train["patient_id"]).astype(str), return_inverse=True)
  patients = patients.astype(np.int32)
  a = config.audit
  k = max(1, min(int(a.top_k), len(images)))

  def search(queries):
    found = patient_search(queries, real_embeddings, patients, tau, k, query_block=int(a.query_block),
                           ref_block=int(a.ref_block), dtype=a.dtype)
    return found.n_patients_matched, found.best_patient, found.best_sim

  return selection.SelectionInputs(
      paths=[str(p) for p in train["path"]], labels=np.asarray(train["labels"], np.float32),
      conditions=release_conditions(config, train, patients), real_embeddings=real_embeddings,
      real_probs=np.asarray(pipeline.split_pass(classifier.predict, images, desc="classifier: train"),
                            np.float64),
      patients=patients,
      patient_names=names, tau=tau, generate=generate, embed=reid.embed,
      predict=classifier.predict, search=search)


def release_conditions(config, train: dict, patients) -> np.ndarray:
  """What the candidates are conditioned on: each real image's own features, or with
  config.select.cond_k = k > 0 the k-anonymous mean of k other patients' (selection.py)."""
  conditions = sampling.conditions_for(config, train)
  k = int(config.select.cond_k)
  if k <= 0:
    return conditions
  return selection.anonymous_conditions(conditions, np.asarray(train["labels"]), patients, k)


def write_lists(out_dir: str, inputs: selection.SelectionInputs, n_chunks: int,
                writer: release.ReleaseWriter) -> None:
  """selection.jsonl (the chunks' records in order), the released names' index and the release's
  filelist.txt."""
  texts = []
  for k in range(n_chunks):
    with open(selection.chunk_records(out_dir, k), encoding="utf-8") as f:
      texts.append(f.read())
  io_utils.write_text(os.path.join(out_dir, "selection.jsonl"), "".join(texts))
  records = [json.loads(line) for text in texts for line in text.splitlines()]
  writer.write_lists(selection.released_images(records), inputs.paths, inputs.labels)


def selection_evaluations(config, guided: bool) -> int:
  from pso_jax.diffusion.sampler import evaluations_per_candidate
  return evaluations_per_candidate(int(config.sample.steps), guided)

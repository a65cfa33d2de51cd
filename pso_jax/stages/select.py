"""Stage `select`: candidates for every real training image -> re-id rejection against all training
patients -> consistency ranking -> the released synthetic dataset under `<workdir>/synthetic/`.

Resumable: real images are processed in chunks of config.select.chunk_images; a finished chunk has
its PNGs, its `chunks/<k>.jsonl` records and its marker. A rerun redoes only unmarked chunks and
produces the same files (seeds are functions of image index, round and candidate). `run.json`
stores which model made the selection; a different model is refused.
"""

import json
import os

import jax
import numpy as np

from pso_jax import io_utils, progress
from pso_jax.privacy import selection
from pso_jax.data.release import SUBDIR, write_png
from pso_jax.stages import sample as sample_stage
from pso_jax.errors import UserError, require


def _check_same_model(out_dir: str, fingerprint: dict, chunk_images: int) -> None:
  path = os.path.join(out_dir, "run.json")
  current = dict(fingerprint=fingerprint, chunk_images=chunk_images)
  if os.path.exists(path):
    stored = io_utils.read_json(path)
    if stored != current:
      raise UserError(
          f"{out_dir!r} holds a selection made by another model or selection config "
          f"({stored} here, now {current}); delete {out_dir} to select again with this model, or "
          "use a new --workdir")
  elif jax.process_index() == 0:
    io_utils.write_json(path, current)


def build_inputs(config, workdir: str, train: dict, generate) -> selection.SelectionInputs:
  """Real images' embeddings and classifier outputs, patient ids, and the search over them."""
  from pso_jax.search.pairwise import patient_search
  from pso_jax.privacy.reid import load_reid
  from pso_jax.evaluate.classifier import load_classifier
  reid, classifier = load_reid(workdir), load_classifier(workdir)
  tau = float(config.audit.tau) if config.audit.tau >= 0 else float(reid.tau)
  images = np.asarray(train["image"])
  real_embeddings = np.asarray(reid.embed(images), np.float32)
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
      conditions=sample_stage.conditions_for(config, train), real_embeddings=real_embeddings,
      real_probs=np.asarray(classifier.predict(images), np.float64), patients=patients,
      patient_names=names, tau=tau, generate=generate, embed=reid.embed,
      predict=classifier.predict, search=search)


def finish(out_dir: str, inputs: selection.SelectionInputs, rule, stats: list, extra: dict) -> dict:
  """selection.jsonl (chunks in order), filelist.txt, summary.json, then COMPLETE."""
  n_chunks = len(stats)
  texts = []
  for k in range(n_chunks):
    with open(selection.chunk_records(out_dir, k), encoding="utf-8") as f:
      texts.append(f.read())
  io_utils.write_text(os.path.join(out_dir, "selection.jsonl"), "".join(texts))
  records = [json.loads(line) for text in texts for line in text.splitlines()]
  io_utils.write_text(os.path.join(out_dir, "filelist.txt"),
                      "".join(selection.filelist_lines(records, inputs.labels)))
  summary = selection.summarise(stats, rule, inputs)
  summary.update(extra)
  io_utils.write_json(os.path.join(out_dir, "summary.json"), summary)
  io_utils.write_text(os.path.join(out_dir, "COMPLETE"), "ok\n")
  return summary


def run(config, workdir: str, *, stop_after_chunks=None, **options) -> dict:
  from pso_jax.data.dataset import load_arrays
  out_dir = os.path.join(workdir, SUBDIR)
  if os.path.exists(os.path.join(out_dir, "COMPLETE")):
    return io_utils.read_json(os.path.join(out_dir, "summary.json"))
  rule = selection.SelectionRule.from_config(config)
  chunk_images = int(config.select.chunk_images)
  require(chunk_images >= 1, f"config.select.chunk_images={chunk_images} must be >= 1")
  sample_stage.check_sample_config(config)
  train = load_arrays(workdir, "train", keys=("image", "labels", "patient_id", "path", "feature"))
  sample_stage.conditions_for(config, train)  # features present and of the model's size
  guided = any(g != 1.0 for g in rule.guidances())
  loaded = sample_stage.load_sampler(config, workdir, stream=sample_stage.SELECT_STREAM,
                                     guided=guided)
  _check_same_model(out_dir, loaded.fingerprint, chunk_images)
  inputs = build_inputs(config, workdir, train, loaded.generate)
  write = jax.process_index() == 0
  with progress.bar(total=len(inputs.paths), desc="select", unit="img") as bar:
    stats = selection.run_chunks(inputs, rule, out_dir, chunk_images, write=write,
                                 stop_after=stop_after_chunks, progress=bar, save_png=write_png)
  n_chunks = -(-len(inputs.paths) // chunk_images)
  if len(stats) < n_chunks:  # stopped early on request (tests of resumption)
    return dict(chunks_done=len(stats), chunks=n_chunks)
  extra = dict(fingerprint=loaded.fingerprint, image_shape=list(np.asarray(train["image"]).shape[1:]),
               steps=int(config.sample.steps), guide=config.sample.guide,
               ema_std=float(config.sample.ema_std),
               evaluations_per_candidate=selection_evaluations(config, guided))
  if not write:
    return selection.summarise(stats, rule, inputs) | extra
  return finish(out_dir, inputs, rule, stats, extra)


def selection_evaluations(config, guided: bool) -> int:
  from pso_jax.diffusion.sampler import evaluations_per_candidate
  return evaluations_per_candidate(int(config.sample.steps), guided)

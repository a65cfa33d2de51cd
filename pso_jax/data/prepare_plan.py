"""Preparing the dataset (what the `prepare` stage writes): phantom or real filelist ->
patient-disjoint ArrayRecord splits + features.

  workdir/data/pso_cxr/1.0.0/   TFDS ArrayRecord splits train/val/test (pso_jax.data.builder)
  workdir/data/{split}.txt      the split's filelist, reference format, in record order
  workdir/data/features_{split}.npy   unit-norm pseudo-conditioning features, record order
  workdir/data/card.json, card.md     counts per split, per finding, patients
  workdir/data/COMPLETE               written last

Every check that can fail (config, filelist lines, missing files, features file) runs before any
file is written. The expensive part (decoding, encoding) runs in chunks of
config.data.prepare_chunk records cached under workdir/.data.partial/, so an interrupted prepare
resumes where it stopped (cached chunks are keyed by config.data and the split filelists, not by
file contents: delete workdir/.data.partial after replacing images); the dataset is assembled in a staging folder there and renamed to
workdir/data in one step, so a later stage never sees half a dataset.
"""

import dataclasses
import hashlib
import json
import os
import shutil
import time
from typing import Callable

import numpy as np
from absl import logging

from pso_jax import io_utils, progress
from pso_jax.data import builder, features, filelists, images, latents, phantom
from pso_jax.data.dataset import CARD_FILE, COMPLETE, data_dir
from pso_jax.errors import UserError

SOURCES = ("phantom", "filelist", "csv")


@dataclasses.dataclass
class Plan:
  """What prepare will write, known before any pixel is read."""
  table: filelists.Table              # every input row, in input order
  rows: dict[str, np.ndarray]         # split -> positions in `table`, in order
  dropped: dict[str, int]             # split -> rows dropped by the label rules
  load_images: Callable[[np.ndarray], np.ndarray]  # positions -> uint8 [n, S, S, C]
  file_features: dict[str, np.ndarray] | None = None


def _check_config(config) -> None:
  d = config.data
  if d.source not in SOURCES:
    raise UserError(f"config.data.source={d.source!r} is unknown; use one of {', '.join(SOURCES)}")
  if d.channels not in (1, 3):
    raise UserError(f"config.data.channels={d.channels} must be 1 (grey) or 3 (RGB)")
  if d.image_size < 1 or d.prepare_chunk < 1:
    raise UserError("config.data.image_size and config.data.prepare_chunk must be positive")
  if len(d.findings) != filelists.NUM_LABELS:
    raise UserError(f"config.data.findings must name {filelists.NUM_LABELS} findings")
  features.check_kind(config)
  latents.check_kind(config)


def make_plan(config) -> Plan:
  """Reads and validates the input; raises UserError before anything is written."""
  _check_config(config)
  d = config.data
  if d.source == "phantom":
    idx = phantom.index(d.phantom)
    table = filelists.Table(idx.paths, idx.labels, idx.patient_ids, "phantom")
    load = lambda rows: phantom.render(d.phantom, idx, d.image_size, d.channels, rows)
  else:
    if d.source == "csv":
      table = filelists.read_csv(d.csv)
    else:
      if not d.filelist:
        raise UserError("config.data.source='filelist' needs --config.data.filelist=<file of "
                        "`<relative path> l0 ... l7` lines> and --config.data.image_root=<folder>")
      table = filelists.read_filelist(d.filelist, d.path_style)
    images.check_files_exist(d.image_root, table.paths, table.source)
    load = lambda rows: images.load_images(d.image_root, table.paths[rows], d.image_size, d.channels)
  rows, dropped = filelists.split_rows(table, d)
  if len(rows["train"]) == 0:
    raise UserError(f"{table.source}: no train rows are left after the split and the "
                    "single-label rule; the dataset needs single-label rows")
  plan = Plan(table, rows, dropped, load)
  if d.features.kind == "file":
    plan.file_features = features.load_file(config, table.paths, rows)
  if d.latent.kind != "identity":
    latents.model_shape(config)  # a missing VAE folder or a bad image size fails now
  return plan


# ---------------------------------------------------------------- chunked, resumable work


def _fingerprint(config, plan: Plan) -> str:
  what = {k: v for k, v in config.data.to_dict().items() if k != "worker_count"}
  h = hashlib.sha256(json.dumps(what, sort_keys=True, default=list).encode())
  for split in filelists.SPLITS:
    h.update(split.encode())
    h.update("\n".join(plan.table.paths[plan.rows[split]]).encode())
  return h.hexdigest()


def _chunks(n: int, size: int):
  return [np.arange(i, min(i + size, n)) for i in range(0, n, size)]


def _chunk_path(partial: str, split: str, k: int) -> str:
  return os.path.join(partial, "chunks", f"{split}-{k:05d}.npz")


def _compute_chunks(config, plan: Plan, partial: str) -> None:
  """Decodes (or draws) images, latents and raw features chunk by chunk; skips finished chunks."""
  chunk = int(config.data.prepare_chunk)
  todo = [(s, k, part) for s in filelists.SPLITS
          for k, part in enumerate(_chunks(len(plan.rows[s]), chunk))]
  # position of each split's first record in train+val+test order: one noise stream per record
  offset = dict(zip(filelists.SPLITS, np.cumsum([0] + [len(plan.rows[s]) for s in filelists.SPLITS])))
  total = sum(len(part) for *_, part in todo)
  with progress.bar(total=total, desc="prepare", unit="img") as pbar:
    for split, k, part in todo:
      path = _chunk_path(partial, split, k)
      if not os.path.exists(path):
        imgs = plan.load_images(plan.rows[split][part])
        arrays = {"image": imgs}
        raw = features.raw_features(config, imgs)
        if raw is not None:
          arrays["raw_feature"] = raw
        if config.data.latent.kind != "identity":
          arrays["latent"] = latents.to_model_space(imgs, config,
                                                    start_index=int(offset[split] + part[0]))
        with io_utils.atomic_path(path) as tmp:
          with open(tmp, "wb") as f:
            np.savez(f, **arrays)
      pbar.update(len(part))


def _split_chunks(config, plan: Plan, partial: str, split: str):
  n = len(_chunks(len(plan.rows[split]), int(config.data.prepare_chunk)))
  for k in range(n):
    with np.load(_chunk_path(partial, split, k)) as z:
      yield {key: z[key] for key in z.files}


def _features(config, plan: Plan, partial: str) -> dict[str, np.ndarray]:
  if plan.file_features is not None:
    return plan.file_features
  raw = {}
  for split in filelists.SPLITS:
    parts = [c["raw_feature"] for c in _split_chunks(config, plan, partial, split)]
    raw[split] = np.concatenate(parts) if parts else np.zeros((0, config.data.features.dim), np.float32)
  return features.finalise(config, raw)


def _record_spec(config, feats: dict[str, np.ndarray]) -> builder.RecordSpec:
  d = config.data
  latent = None if d.latent.kind == "identity" else tuple(latents.model_shape(config))
  return builder.RecordSpec((d.image_size, d.image_size, d.channels),
                            feats["train"].shape[1], latent)


def _examples(config, plan: Plan, partial: str, split: str, feats: np.ndarray):
  """Record dicts of one split, in filelist order, streamed chunk by chunk."""
  table = plan.table.take(plan.rows[split])
  i = 0
  for chunk in _split_chunks(config, plan, partial, split):
    for j in range(len(chunk["image"])):
      record = {"image": chunk["image"][j], "labels": table.labels[i], "feature": feats[i],
                "index": i, "patient_id": str(table.patient_ids[i]), "path": str(table.paths[i]),
                "split": split}
      if "latent" in chunk:
        record["latent"] = chunk["latent"][j]
      yield record
      i += 1


# ---------------------------------------------------------------- card


def make_card(config, plan: Plan, feats: dict[str, np.ndarray], seconds: float) -> dict:
  d = config.data
  splits = {}
  for split in filelists.SPLITS:
    t = plan.table.take(plan.rows[split])
    splits[split] = {
        "records": len(t), "patients": int(len(np.unique(t.patient_ids))),
        "multi_label": int((t.labels.sum(1) > 1).sum()), "dropped_rows": plan.dropped[split],
        "positives": {name: int(c) for name, c in zip(d.findings, t.labels.sum(0))},
        # rows without a feature (file aligned with train only): the null condition
        "null_features": int((np.abs(feats[split]).sum(1) == 0).sum()),
    }
  return {
      "name": d.name, "source": d.source, "input": plan.table.source,
      "input_rows": len(plan.table), "image_shape": [d.image_size, d.image_size, d.channels],
      "latent": d.latent.kind, "features": {"kind": d.features.kind, "dim": int(d.features.dim)},
      "findings": list(d.findings), "split_seed": d.split_seed,
      "split_fractions": list(d.split_fractions), "splits": splits,
      "prepare_seconds": round(seconds, 3),
  }


def card_markdown(card: dict) -> str:
  findings = card["findings"]
  lines = [f"# Dataset card: {card['name']}", "",
           f"Source: {card['source']} ({card['input']}), {card['input_rows']} input rows; images "
           f"{'x'.join(map(str, card['image_shape']))}; latent {card['latent']}; features "
           f"{card['features']['kind']} ({card['features']['dim']}-d).",
           f"Patient-disjoint split {card['split_fractions']} (seed {card['split_seed']}); train "
           "and val keep single-label rows, test keeps multi-label rows.", "",
           "| split | records | patients | multi-label | dropped | " + " | ".join(findings) + " |",
           "|---" * (5 + len(findings)) + "|"]
  for split, s in card["splits"].items():
    lines.append(f"| {split} | {s['records']} | {s['patients']} | {s['multi_label']} | "
                 f"{s['dropped_rows']} | " + " | ".join(str(s["positives"][f]) for f in findings) + " |")
  return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- stage


def build(config, plan: Plan, workdir: str) -> dict:
  """Writes the dataset into workdir/data (process 0 only), resuming from cached chunks; returns
  the card."""
  start = time.time()
  partial = os.path.join(workdir, ".data.partial")
  fingerprint = _fingerprint(config, plan)
  stamp = os.path.join(partial, "fingerprint.txt")
  if os.path.isdir(partial) and (not os.path.exists(stamp) or open(stamp).read() != fingerprint):
    shutil.rmtree(partial)  # cached chunks of another config or input
  os.makedirs(partial, exist_ok=True)
  io_utils.write_text(stamp, fingerprint)

  _compute_chunks(config, plan, partial)
  feats = _features(config, plan, partial)
  stage = os.path.join(partial, "stage")
  if os.path.exists(stage):
    shutil.rmtree(stage)  # an interrupted assembly: rebuilt from the cached chunks (fast)
  builder.write(stage, _record_spec(config, feats),
                {s: (lambda s=s: _examples(config, plan, partial, s, feats[s]))
                 for s in filelists.SPLITS},
                scratch_dir=os.path.join(partial, "tfds_scratch"))
  for split in filelists.SPLITS:
    io_utils.write_npy(os.path.join(stage, f"features_{split}.npy"), feats[split])
    filelists.write_filelist(os.path.join(stage, f"{split}.txt"), plan.table.take(plan.rows[split]))
  card = make_card(config, plan, feats, time.time() - start)
  io_utils.write_json(os.path.join(stage, CARD_FILE), card)
  io_utils.write_text(os.path.join(stage, "card.md"), card_markdown(card))
  io_utils.write_text(os.path.join(stage, COMPLETE), "ok\n")  # last, as every stage's marker

  target = data_dir(workdir)
  if os.path.exists(target):
    shutil.rmtree(target)  # not COMPLETE (checked by the stage), so never a finished dataset
  os.replace(stage, target)
  shutil.rmtree(partial)
  counts = ", ".join(f"{k} {v['records']} ({v['patients']} patients)" for k, v in card["splits"].items())
  logging.info("prepared %s (%s) in %.1f s: %s -> %s", config.data.name, config.data.source,
               card["prepare_seconds"], counts, target)
  return card

"""Preparing the dataset (what the `prepare` stage writes): phantom or real filelist ->
patient-disjoint ArrayRecord splits + features.

  workdir/data/pso_cxr/1.0.0/   TFDS ArrayRecord splits train/val/test (pso_jax.data.builder)
  workdir/data/{split}.txt      the split's filelist, reference format, in record order
  workdir/data/features_{split}.npy   unit-norm pseudo-conditioning features, record order
  workdir/data/card.json, card.md     counts per split, per finding, patients; pixel scaling
  workdir/data/COMPLETE               written last

Every check that can fail (config, filelist lines, missing or unreadable files, features file) runs
before any file is written. The expensive part (decoding, encoding) runs in chunks cached under
workdir/.data.partial/chunks/, each named by a hash of what made it (the config fields that shape a
record, each record's path, file size, mtime and inode, and for latents its position) and cut where
the records say, not at fixed positions: an interrupted prepare resumes where it stopped, and a
rerun after lines were removed or files replaced decodes only the chunks they touched. The dataset
is assembled in a staging folder there and renamed to workdir/data in one step, so a later stage
never sees half a dataset.
"""

import collections
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
from pso_jax.data import builder, features, filelists, images, latents, phantom, record_codec
from pso_jax.data.dataset import CARD_FILE, COMPLETE, data_dir
from pso_jax.errors import UserError

SOURCES = ("phantom", "filelist", "csv")


@dataclasses.dataclass
class Plan:
  """What prepare will write, known before any pixel is read."""
  table: filelists.Table              # every input row, in input order
  rows: dict[str, np.ndarray]         # split -> positions in `table`, in order
  dropped: dict[str, int]             # split -> rows dropped by the label rules
  # positions -> (uint8 [n, S, S, C], the images.SCALING rule of each)
  load_images: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
  record_keys: np.ndarray | None = None  # str [N]: what each row's record is made from (cache key)
  file_features: dict[str, np.ndarray] | None = None


def check_config(config) -> None:
  """The data section's own checks (also run by `main` before any stage starts)."""
  d = config.data
  if d.source not in SOURCES:
    raise UserError(f"config.data.source={d.source!r} is unknown; use one of {', '.join(SOURCES)}")
  if d.channels not in (1, 3):
    raise UserError(f"config.data.channels={d.channels} must be 1 (grey) or 3 (RGB)")
  if d.image_size < 1 or d.prepare_chunk < 1:
    raise UserError("config.data.image_size and config.data.prepare_chunk must be positive")
  if len(d.findings) != filelists.NUM_LABELS:
    raise UserError(f"config.data.findings must name {filelists.NUM_LABELS} findings")
  filelists.check_split_config(d)
  features.check_kind(config)
  latents.check_kind(config)
  latents.check_stats(config)
  record_codec.check_codec(d.image_codec)


def make_plan(config) -> Plan:
  """Reads and validates the input; raises UserError before anything is written."""
  check_config(config)
  d = config.data
  fixed = None  # the rows of each split when config.data.split_files gives them
  if d.source == "phantom":
    idx = phantom.index(d.phantom)
    table = filelists.Table(idx.paths, idx.labels, idx.patient_ids, "phantom")
    load = lambda rows: (phantom.render(d.phantom, idx, d.image_size, d.channels, rows),
                         np.full(len(rows), "8-bit"))
  else:
    if d.source == "csv":
      table = filelists.read_csv(d.csv)
    elif d.split_files:
      table, fixed = filelists.read_split_files(d.split_files, d.path_style)
    else:
      if not d.filelist:
        raise UserError("config.data.source='filelist' needs --config.data.filelist=<file of "
                        "`<relative path> l0 ... l7` lines> and --config.data.image_root=<folder>")
      table = filelists.read_filelist(d.filelist, d.path_style)
    load = lambda rows: images.load_images(d.image_root, table.paths[rows], d.image_size,
                                           d.channels, [table.where(i) for i in rows])
  rows, dropped = filelists.split_rows(table, d, fixed)
  if len(rows["train"]) == 0:
    raise UserError(f"{table.source}: no train rows are left after the split and the "
                    "single-label rule; the dataset needs single-label rows")
  plan = Plan(table, rows, dropped, load)
  if d.features.kind == "file":
    plan.file_features = features.load_file(config, table.paths, rows)
  if d.latent.kind != "identity":
    latents.model_shape(config)  # a missing VAE folder or a bad image size fails now
  if d.source == "phantom":
    plan.record_keys = table.paths  # the pixels follow from config.data.phantom, in every key
  else:
    images.check_images(d.image_root, table)  # reads every file: after the cheap checks
    plan.record_keys = np.array([images.file_key(d.image_root, p) for p in table.paths], dtype=str)
  return plan


# ---------------------------------------------------------------- chunked, resumable work


# config.data fields that never change a cached record (its image, scaling rule and latent): they
# choose, label or split rows, or shape the features (computed from the cached images)
_NOT_IN_RECORDS = ("worker_count", "batch_size", "filelist", "csv", "path_style", "split_fractions",
                   "split_seed", "single_label_train_val", "prepare_chunk", "findings", "features",
                   "split_files", "filter_order", "image_codec")


# what a cached chunk holds, in its key: raw latents (the per-channel statistics may come from the
# dataset) and the statistics of its train records (merged in chunk order: any process computes any
# chunk, and the merged statistics do not depend on which)
_CHUNK_FORMAT = "raw latents, train stats"
RAW_LATENT = "raw_latent"  # chunk key: VAE posterior samples before the per-channel normalisation


@dataclasses.dataclass(frozen=True)
class Chunk:
  """Records cached in one file: table rows (ascending), the ALL_SPLITS number of each, each one's
  position in train+val+test order (the latents' noise stream), and the file's content key."""
  rows: np.ndarray
  split: np.ndarray
  index: np.ndarray
  key: str


def _hash(text: str) -> str:
  return hashlib.sha256(text.encode()).hexdigest()


def _chunk_ends(paths, size: int) -> list[int]:
  """Content-defined cuts: a chunk ends after a record whose path hashes to 0 modulo `size` (or at
  4 * size records), so a removed or added line moves no cut but its own chunk's."""
  ends, start = [], 0
  for i, path in enumerate(paths):
    if int(_hash(str(path))[:8], 16) % size == 0 or i + 1 - start == 4 * size:
      ends.append(start := i + 1)
  return ends if start == len(paths) else ends + [len(paths)]


def plan_chunks(config, plan: Plan) -> list[Chunk]:
  """The records to prepare, in table order, cut into content-keyed chunks."""
  rows = np.concatenate([plan.rows[s] for s in filelists.ALL_SPLITS])
  split = np.repeat(np.arange(len(filelists.ALL_SPLITS)),
                    [len(plan.rows[s]) for s in filelists.ALL_SPLITS])
  order = np.argsort(rows, kind="stable")
  rows, split, index = rows[order], split[order], order  # order[i]: position of row i's record
  what = {k: v for k, v in config.data.to_dict().items() if k not in _NOT_IN_RECORDS}
  shape = json.dumps([what, config.seed, _CHUNK_FORMAT], sort_keys=True, default=list)
  keys = plan.record_keys[rows]
  with_index = config.data.latent.kind != "identity"  # the VAE's noise is drawn per position
  chunks, start = [], 0
  for end in _chunk_ends(plan.table.paths[rows], int(config.data.prepare_chunk)):
    part = slice(start, end)
    records = [f"{k} {i}" if with_index else k for k, i in zip(keys[part], index[part])]
    chunks.append(Chunk(rows[part], split[part], index[part], _hash("\n".join([shape, *records]))))
    start = end
  return chunks


def _chunk_path(partial: str, chunk: Chunk) -> str:
  return os.path.join(partial, "chunks", f"{chunk.key[:40]}.npz")


def _compute_chunks(config, plan: Plan, chunks: list[Chunk], partial: str) -> None:
  """Decodes (or draws) images and encodes latents chunk by chunk; skips cached chunks."""
  train = filelists.ALL_SPLITS.index("train")
  with progress.bar(total=sum(len(c.rows) for c in chunks), desc="prepare", unit="img") as pbar:
    for chunk in chunks:
      path = _chunk_path(partial, chunk)
      if not os.path.exists(path):
        imgs, scaling = plan.load_images(chunk.rows)
        arrays = {"image": imgs, "scaling": scaling}
        if config.data.latent.kind != "identity":
          arrays[RAW_LATENT] = _latents(config, imgs, chunk)
        raw = arrays.get(RAW_LATENT, imgs)[chunk.split == train]
        arrays.update(_train_stats(raw, config.data.latent.kind == "identity"))
        with io_utils.atomic_path(path) as tmp:
          with open(tmp, "wb") as f:
            np.savez(f, **arrays)
      pbar.update(len(chunk.rows))


def _train_stats(values: np.ndarray, identity: bool) -> dict[str, np.ndarray]:
  """Count, mean and squared deviations per channel of a chunk's train records (unit pixels for
  identity, raw latents otherwise), float64 copies of 16 records at a time."""
  running = latents.RunningStats()
  for i in range(0, len(values), 16):
    part = values[i:i + 16]
    running.update(latents.pixels_to_unit(part) if identity else part)
  channels = values.shape[-1]
  return {"stats_n": np.int64(running.n),
          "stats_mean": running.mean if running.n else np.zeros(channels),
          "stats_m2": running.m2 if running.n else np.zeros(channels)}


def _latents(config, imgs: np.ndarray, chunk: Chunk) -> np.ndarray:
  """A chunk's records of one split hold consecutive positions (splits keep table order): one
  encoder call per split."""
  out = None
  for k in np.unique(chunk.split):
    mine = chunk.split == k
    z = latents.to_raw_space(imgs[mine], config, start_index=int(chunk.index[mine][0]))
    out = np.empty((len(imgs), *z.shape[1:]), z.dtype) if out is None else out
    out[mine] = z
  return out


def _split_chunks(chunks: list[Chunk], partial: str, split: str, keys=None, start: int = 0,
                  stop: int | None = None):
  """The cached arrays (all, or `keys`) of one split's records [start, stop) in record order, chunk
  by chunk (chunks outside the range are not opened)."""
  k = filelists.ALL_SPLITS.index(split)
  pos = 0
  for chunk in chunks:
    mine = np.flatnonzero(chunk.split == k)
    lo, hi = max(start - pos, 0), len(mine) if stop is None else min(stop - pos, len(mine))
    pos += len(mine)
    if lo < hi:
      with np.load(_chunk_path(partial, chunk)) as z:
        keys = keys or [name for name in z.files if not name.startswith("stats_")]  # per record
        yield {key: z[key][mine[lo:hi]] for key in keys}


def _feature_batches(config, plan: Plan) -> list[tuple[str, int, int]]:
  """(split, start, stop): the raw features are computed in batches of prepare_chunk records in
  split order (a float32 matmul rounds differently for other batch shapes, and the features must
  not depend on how the cache was cut or on how many processes computed them)."""
  size = int(config.data.prepare_chunk)
  return [(split, a, min(a + size, len(plan.rows[split])))
          for split in filelists.ALL_SPLITS for a in range(0, len(plan.rows[split]), size)]


def _raw_feature_path(work: str, split: str, start: int) -> str:
  return os.path.join(work, "raw_features", f"{split}-{start:012d}.npy")


def compute_feature_share(config, plan: Plan, chunks: list[Chunk], partial: str, work: str,
                          index: int, count: int) -> None:
  """Process `index` of `count`'s batches of raw features (every count-th), each cached in `work`."""
  if plan.file_features is not None:
    return
  for split, start, stop in _feature_batches(config, plan)[index::count]:
    path = _raw_feature_path(work, split, start)
    if not os.path.exists(path):
      images = np.concatenate([c["image"] for c in _split_chunks(chunks, partial, split, ["image"],
                                                                  start, stop)])
      io_utils.write_npy(path, features.raw_features(config, images))


def _features(config, plan: Plan, work: str) -> dict[str, np.ndarray]:
  if plan.file_features is not None:
    return plan.file_features
  raw = {split: [] for split in filelists.ALL_SPLITS}
  for split, start, _ in _feature_batches(config, plan):
    raw[split].append(np.load(_raw_feature_path(work, split, start)))
  dim = config.data.features.dim
  return features.finalise(config, {s: np.concatenate(v) if v else np.zeros((0, dim), np.float32)
                                    for s, v in raw.items()})


def _latent_stats(config, chunks: list[Chunk], partial: str) -> dict:
  """Per-channel mean and std of the train split's raw values (unit pixels for identity, VAE
  posterior samples for sd_vae), merged from the chunks' own; and the ones in force."""
  l = config.data.latent
  identity = l.kind == "identity"
  running = latents.RunningStats()
  for chunk in chunks:
    with np.load(_chunk_path(partial, chunk)) as z:
      running.merge(int(z["stats_n"]), z["stats_mean"], z["stats_m2"])
  mean, std = running.result()
  used = latents.check_stats(config)
  if used == "dataset" and np.any(std <= 0):
    raise UserError(f"config.data.latent.stats='dataset': channel(s) {np.flatnonzero(std <= 0).tolist()} "
                    "of the train split are constant (std 0), which cannot be normalised; use "
                    "--config.data.latent.stats=config")
  out = {"used": used, "space": "unit pixels [-1, 1]" if identity else "VAE posterior samples",
         "train_mean": [float(x) for x in mean], "train_std": [float(x) for x in std],
         "train_values": int(running.n), "final_std": float(l.final_std)}
  if used == "dataset":
    out["mean"], out["std"] = out["train_mean"], out["train_std"]
  elif not identity:
    out["mean"], out["std"] = [float(x) for x in l.mean], [float(x) for x in l.std]
  else:  # identity with config statistics: pixels stay in [-1, 1]
    out["mean"] = out["std"] = None
  return out


def _model_config(config, stats: dict):
  """The config that maps raw values to the records' model space (the dataset's statistics in
  force when they are used)."""
  return latents.with_stats(config, stats["mean"], stats["std"]) if stats["used"] == "dataset" \
      else config


def _record_spec(config, feats: dict[str, np.ndarray]) -> builder.RecordSpec:
  d = config.data
  latent = None if d.latent.kind == "identity" else tuple(latents.model_shape(config))
  return builder.RecordSpec((d.image_size, d.image_size, d.channels),
                            feats["train"].shape[1], latent, d.image_codec)


def _examples(plan: Plan, chunks: list[Chunk], partial: str, split: str, feats: np.ndarray,
              model_config, start: int, stop: int):
  """Record dicts of one split's records [start, stop), in filelist order, streamed chunk by chunk;
  latents normalised with the statistics in force (`model_config`: latents.with_stats when they
  are the dataset's)."""
  table = plan.table.take(plan.rows[split])
  i = start
  for chunk in _split_chunks(chunks, partial, split, None, start, stop):
    if RAW_LATENT in chunk:
      chunk["latent"] = latents.normalise(chunk.pop(RAW_LATENT), model_config)
    for j in range(len(chunk["image"])):
      record = {"image": chunk["image"][j], "labels": table.labels[i], "feature": feats[i],
                "index": i, "patient_id": str(table.patient_ids[i]), "path": str(table.paths[i]),
                "split": split}
      if "latent" in chunk:
        record["latent"] = chunk["latent"][j]
      yield record
      i += 1


# ---------------------------------------------------------------- card


def _pixel_scaling(chunks: list[Chunk], partial: str) -> dict[str, int]:
  """Records per images.SCALING rule."""
  counts = collections.Counter()
  for chunk in chunks:
    with np.load(_chunk_path(partial, chunk)) as z:
      counts.update(z["scaling"].tolist())
  return {rule: counts[rule] for rule in images.SCALING if counts[rule]}


def make_card(config, plan: Plan, feats: dict[str, np.ndarray], pixel_scaling: dict[str, int],
              seconds: float) -> dict:
  d = config.data
  splits = {}
  for split in filelists.ALL_SPLITS:
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
      "input_rows": len(plan.table),
      "dropped_before_split": plan.dropped.get(filelists.BEFORE_SPLIT, 0), "image_shape": [d.image_size, d.image_size, d.channels],
      "latent": d.latent.kind, "features": {"kind": d.features.kind, "dim": int(d.features.dim)},
      "findings": list(d.findings), "split_seed": d.split_seed,
      "split_fractions": list(d.split_fractions), "filter_order": d.filter_order,
      "split_files": list(filelists.split_files_of(d.split_files)) if d.split_files else [],
      "splits": splits,
      "pixel_scaling": pixel_scaling, "prepare_seconds": round(seconds, 3),
  }


def card_markdown(card: dict) -> str:
  findings = card["findings"]
  lines = [f"# Dataset card: {card['name']}", "",
           f"Source: {card['source']} ({card['input']}), {card['input_rows']} input rows"
           f"{_before_split(card)}; images "
           f"{'x'.join(map(str, card['image_shape']))}; latent {card['latent']}; features "
           f"{card['features']['kind']} ({card['features']['dim']}-d).",
           _split_line(card),
           _scaling_line(card["pixel_scaling"]), *_stats_line(card.get(latents.CARD_KEY)),
           *_records_line(card.get("records")), "",
           "| split | records | patients | multi-label | dropped | " + " | ".join(findings) + " |",
           "|---" * (5 + len(findings)) + "|"]
  for split, s in card["splits"].items():
    lines.append(f"| {split} | {s['records']} | {s['patients']} | {s['multi_label']} | "
                 f"{s['dropped_rows']} | " + " | ".join(str(s["positives"][f]) for f in findings) + " |")
  return "\n".join(lines) + "\n"


def _before_split(card: dict) -> str:
  n = card.get("dropped_before_split", 0)
  return f" ({n} without a positive label dropped before the split)" if n else ""


def _split_line(card: dict) -> str:
  rules = ("train and val keep single-label rows, test keeps multi-label rows; the attacker split "
           "keeps single-label rows")
  if card.get("split_files"):
    return (f"Fixed splits from {', '.join(card['split_files'])} (train, val, test"
            f"{', attacker' if len(card['split_files']) > 3 else ''}; checked patient-disjoint); "
            f"{rules}.")
  order = {"split_then_filter": "rows without a positive label dropped after the patient split",
           "filter_then_split": "rows without a positive label dropped before the patient split, "
                                "as the reference"}[card.get("filter_order", "split_then_filter")]
  return (f"Patient-disjoint split {card['split_fractions']} (seed {card['split_seed']}), {order}; "
          f"{rules} (the attacker split: the last patients of the input, set aside for the "
          "audit's independent attacker).")


def _record_bytes(config, stage: str, card: dict, sample: int = 512) -> dict:
  """The image codec and, per written split, the mean serialized record (what a reader fetches
  and decodes; measured on up to `sample` records evenly spaced over the split, wherever the files
  are cut) and the record files' bytes per record (ArrayRecord pads small files to its 128 KiB
  blocks)."""
  from array_record.python import array_record_module
  folder = builder.builder_dir(stage)
  per_record, per_file = {}, {}
  for split, s in card["splits"].items():
    files = sorted(f for f in os.listdir(folder) if f.startswith(f"{builder.NAME}-{split}.array_record"))
    if not s["records"] or not files:
      continue
    picks = np.unique(np.linspace(0, s["records"] - 1, min(s["records"], sample)).astype(np.int64))
    lengths, first = [], 0
    for name in files:
      reader = array_record_module.ArrayRecordReader(os.path.join(folder, name))
      try:
        n = reader.num_records()
        mine = (picks[(picks >= first) & (picks < first + n)] - first).tolist()
        lengths += [len(r) for r in reader.read(mine)] if mine else []
        first += n
      finally:
        reader.close()
    per_record[split] = round(float(np.mean(lengths)))
    per_file[split] = round(sum(os.path.getsize(os.path.join(folder, f)) for f in files) / s["records"])
  return {"image_codec": config.data.image_codec, "bytes_per_record": per_record,
          "file_bytes_per_record": per_file}


def _records_line(records: dict | None) -> list[str]:
  if not records:
    return []
  sizes = ", ".join(f"{split} {n:,}" for split, n in records["bytes_per_record"].items())
  how = "lossless PNG, decoded by the loader" if records["image_codec"] == "png" else "raw arrays"
  files = ", ".join(f"{split} {n:,}" for split, n in records["file_bytes_per_record"].items())
  return [f"Records: images stored as {how}; bytes per record (serialized): {sizes}; record files "
          f"per record: {files}."]


def _stats_line(stats: dict | None) -> list[str]:
  if not stats:
    return []
  fmt = lambda v: "[" + ", ".join(f"{x:.4g}" for x in v) + "]"
  train = (f"Train split per channel ({stats['space']}, {stats['train_values']} values): mean "
           f"{fmt(stats['train_mean'])}, std {fmt(stats['train_std'])}")
  if stats["mean"] is None:
    return [f"{train}; model space: the pixels in [-1, 1] (latent.stats=config)."]
  which = "these, the dataset's" if stats["used"] == "dataset" else \
      f"the config's mean {fmt(stats['mean'])}, std {fmt(stats['std'])}"
  return [f"{train}; model space: z = (x - mean) * {stats['final_std']:g} / std with {which} "
          f"(latent.stats={stats['used']})."]


def _scaling_line(pixel_scaling: dict[str, int]) -> str:
  rules = ", ".join(f"{rule} ({images.SCALING[rule]}): {n}" for rule, n in pixel_scaling.items())
  mixed = ("; mixed rules: the images are not all stored alike, check that the rarer rule's "
           "files are what you meant") if len(pixel_scaling) > 1 else ""
  return f"Pixel values scaled to 0..255 per image: {rules}{mixed}."


# ---------------------------------------------------------------- stage


def _work_key(config, chunks: list[Chunk]) -> str:
  """What the assembled dataset follows from: the chunks' contents and the whole data config (the
  split, the features and the codec shape the records too)."""
  what = json.dumps([config.data.to_dict(), config.seed, _CHUNK_FORMAT], sort_keys=True, default=list)
  return _hash("\n".join([what, *(c.key for c in chunks)]))[:16]


def _drop_stale(partial: str, chunks: list[Chunk], key: str) -> None:
  """Cached chunks this input no longer needs (and temporary files of an interrupted write), and
  the assembly of another input."""
  folder = os.path.join(partial, "chunks")
  keep = {os.path.basename(_chunk_path(partial, c)) for c in chunks}
  for name in os.listdir(folder) if os.path.isdir(folder) else []:
    if name not in keep:
      os.remove(os.path.join(folder, name))
  for name in os.listdir(partial) if os.path.isdir(partial) else []:
    if name != "chunks" and not name.endswith(key):
      shutil.rmtree(os.path.join(partial, name))


def compute_share(config, plan: Plan, workdir: str, index: int, count: int) -> int:
  """Process `index` of `count`'s share of prepare's expensive work (drawing or decoding and
  resizing images, VAE encoding): chunks index, index + count, ... of the plan, cached under
  workdir/.data.partial/chunks/ (a filesystem all processes share), where `build` then finds them.
  Each chunk is written atomically and skipped when cached, so a killed run resumes per chunk.
  Returns how many chunks this process computed."""
  partial = os.path.join(workdir, ".data.partial")
  mine = plan_chunks(config, plan)[index::count]
  todo = [c for c in mine if not os.path.exists(_chunk_path(partial, c))]
  _compute_chunks(config, plan, mine, partial)
  return len(todo)


def _record_range(n: int, index: int, count: int) -> tuple[int, int]:
  """The records [start, stop) of a split of n that process `index` of `count` writes."""
  return n * index // count, n * (index + 1) // count


def _written_splits(plan: Plan) -> list[str]:
  # tfds refuses an empty split: no attacker split is written when none was asked for
  return [s for s in filelists.ALL_SPLITS if s != filelists.ATTACKER or len(plan.rows[s])]


def write_share(config, plan: Plan, chunks: list[Chunk], partial: str, stage: str,
                feats: dict[str, np.ndarray], stats: dict, index: int, count: int) -> list[dict]:
  """Process `index` of `count` writes its own record files: a contiguous range of each split
  (`builder.write_part`: resumable per part). Returns the parts' manifests."""
  folder = builder.builder_dir(stage)
  os.makedirs(folder, exist_ok=True)
  spec, model_config = _record_spec(config, feats), _model_config(config, stats)
  ranges = {s: _record_range(len(plan.rows[s]), index, count) for s in _written_splits(plan)}
  manifests = []
  with progress.bar(total=sum(b - a for a, b in ranges.values()), desc="records", unit="rec") as bar:
    for split, (start, stop) in ranges.items():
      if stop > start:
        examples = _examples(plan, chunks, partial, split, feats[split], model_config, start, stop)
        manifests.append(builder.write_part(folder, spec, split, start, stop,
                                            (bar.update(1) or r for r in examples)))
  return manifests


def no_sync(name: str) -> None:
  del name


def build(config, plan: Plan, workdir: str, index: int = 0, count: int = 1,
          sync: Callable[[str], None] = no_sync) -> dict | None:
  """Writes the dataset into workdir/data, resuming from what an interrupted run left under
  workdir/.data.partial/; returns the card (process 0; None on the others).

  Called by every one of `count` processes (`sync(name)`: a barrier across them), each does its
  share of each step: the chunks (images, latents), the raw feature batches, and its range of
  each split's record files. Process 0 alone finalises the features (whitening over the train
  split) and the latent statistics in between, and at the end names the record files, writes the
  metadata, filelists and card and renames the dataset into place."""
  start = time.time()
  partial = os.path.join(workdir, ".data.partial")
  chunks = plan_chunks(config, plan)
  key = _work_key(config, chunks)
  work, stage = os.path.join(partial, f"work-{key}"), os.path.join(partial, f"stage-{key}")
  if index == 0:
    _drop_stale(partial, chunks, key)
  sync("pso_jax.prepare.stale")
  compute_share(config, plan, workdir, index, count)
  sync("pso_jax.prepare.chunks")
  compute_feature_share(config, plan, chunks, partial, work, index, count)
  sync("pso_jax.prepare.raw_features")
  stats_path = os.path.join(work, "latent_stats.json")
  if index == 0 and not os.path.exists(stats_path):
    feats = _features(config, plan, work)
    for split in filelists.ALL_SPLITS:
      io_utils.write_npy(os.path.join(stage, f"features_{split}.npy"), feats[split])
    io_utils.write_json(stats_path, _latent_stats(config, chunks, partial))  # last: the marker
  sync("pso_jax.prepare.features")
  feats = {s: np.load(os.path.join(stage, f"features_{s}.npy")) for s in filelists.ALL_SPLITS}
  with open(stats_path) as f:
    stats = json.load(f)
  write_share(config, plan, chunks, partial, stage, feats, stats, index, count)
  sync("pso_jax.prepare.records")
  if index != 0:
    return None

  parts = {split: [m for i in range(count) if (m := _share_manifest(stage, plan, split, i, count))]
           for split in _written_splits(plan)}
  builder.finish(builder.builder_dir(stage), _record_spec(config, feats), parts)
  for split in filelists.ALL_SPLITS:
    filelists.write_filelist(os.path.join(stage, f"{split}.txt"), plan.table.take(plan.rows[split]))
  pixel_scaling = _pixel_scaling(chunks, partial)
  if len(pixel_scaling) > 1:
    logging.warning("%s: images scaled by different rules: %s (see data/card.md)",
                    plan.table.source, pixel_scaling)
  card = make_card(config, plan, feats, pixel_scaling, time.time() - start)
  card[latents.CARD_KEY] = stats
  card["records"] = _record_bytes(config, stage, card)
  io_utils.write_json(os.path.join(stage, CARD_FILE), card)
  io_utils.write_text(os.path.join(stage, "card.md"), card_markdown(card))
  io_utils.write_text(os.path.join(stage, COMPLETE), "ok\n")  # last, as every stage's marker

  target = data_dir(workdir)
  if os.path.exists(target):
    shutil.rmtree(target)  # not COMPLETE (checked by the stage), so never a finished dataset
  os.replace(stage, target)
  shutil.rmtree(partial)
  counts = ", ".join(f"{k} {v['records']} ({v['patients']} patients)" for k, v in card["splits"].items())
  logging.info("prepared %s (%s) in %.1f s over %d process(es): %s -> %s", config.data.name,
               config.data.source, card["prepare_seconds"], count, counts, target)
  return card


def _share_manifest(stage: str, plan: Plan, split: str, index: int, count: int) -> dict | None:
  """The manifest process `index` of `count` wrote for its range of a split (None: an empty
  range), read by process 0."""
  start, stop = _record_range(len(plan.rows[split]), index, count)
  if start == stop:
    return None
  folder = builder.builder_dir(stage)
  manifest = builder.read_manifest(folder, split, start, stop)
  if manifest is None:
    raise UserError(f"{os.path.join(folder, builder.part_name(split, start, stop))}.json is "
                    f"missing: process {index} of {count} did not finish its records of the "
                    f"{split} split; the workdir must be on a filesystem all processes share")
  return manifest

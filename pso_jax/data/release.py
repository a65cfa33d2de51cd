"""The synthetic set's files, in two folders kept apart.

`<workdir>/release/` (RELEASE_DIR) is the only folder meant to leave the hospital:
  images/<name>.png   8-bit PNGs without metadata, named by an opaque token
  filelist.txt        `images/<name>.png l0 .. l7` (the labels of the source image), in name order
  card.json, card.md  how the set was made, counts, and the audit's verdict once it has run
Nothing in it names a patient or a source scan, and its order says nothing about theirs.

`<workdir>/synthetic/` (SUBDIR, the select stage's folder) is internal: `selection.jsonl` (every
candidate with its source path, patient and nearest patient), `summary.json`, `release_index.jsonl`
(released name -> source image), `run.json`, `chunks/` and `release.key`. A released name is an
HMAC-SHA256 of (source index, primary or second) under that random key: without the key it reveals
neither the source image nor its position; with it a resumed selection writes the same names.
"""

import hashlib
import hmac
import io
import json
import os
import secrets

import numpy as np
from PIL import Image

from pso_jax import io_utils
from pso_jax.errors import UserError

SUBDIR = "synthetic"        # internal records (the select stage's folder)
RELEASE_DIR = "release"     # what is handed over
KEY_FILE = "release.key"
INDEX_FILE = "release_index.jsonl"
KEPT, SECOND = "kept", "second"  # the selection outcomes that are released


def write_png(path: str, image: np.ndarray) -> None:
  """uint8 [H, W, 1|3] -> PNG (grey or RGB, no text chunks), written atomically."""
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3):
    raise ValueError(f"expected uint8 [H, W, 1|3], got {image.dtype} {image.shape}")
  buffer = io.BytesIO()
  Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="PNG")
  io_utils.write_bytes(path, buffer.getvalue())


def read_png(path: str, channels: int) -> np.ndarray:
  with Image.open(path) as im:
    array = np.asarray(im.convert("L" if channels == 1 else "RGB"))
  return array[..., None] if channels == 1 else array


def read_filelist(path: str) -> tuple[list, np.ndarray]:
  paths, labels = [], []
  with open(path, encoding="utf-8") as f:
    for line in f:
      parts = line.split()
      if parts:
        paths.append(parts[0])
        labels.append([float(v) for v in parts[1:]])
  if not paths:  # an empty release (every image skipped): reshape(0, -1) would fail
    return paths, np.zeros((0, 0), np.float32)
  return paths, np.asarray(labels, np.float32)


def _inside(folder: str, path: str) -> bool:
  folder = os.path.realpath(folder)
  return os.path.commonpath([folder, os.path.realpath(path)]) == folder


class ReleaseWriter:
  """Writes `<workdir>/release/` (process 0 only: it creates the secret key on first use)."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.root = os.path.join(workdir, RELEASE_DIR)
    internal = os.path.join(workdir, SUBDIR)
    if _inside(self.root, internal):
      raise UserError(f"{internal!r} resolves inside the release folder {self.root!r}; the "
                      "internal records must never be handed over: remove the link")
    self.key = self._key(os.path.join(internal, KEY_FILE))

  def _key(self, path: str) -> bytes:
    if os.path.exists(path):
      with open(path, encoding="utf-8") as f:
        return bytes.fromhex(f.read().strip())
    images = os.path.join(self.root, "images")
    if os.path.isdir(images) and os.listdir(images):
      raise UserError(f"{images!r} holds images of another selection (its key {path!r} is gone); "
                      f"delete {self.root} to select again")
    key = secrets.token_bytes(32)
    io_utils.write_text(path, key.hex() + "\n")
    os.chmod(path, 0o600)
    return key

  def _path(self, *parts: str) -> str:
    """A path in the release folder, refused when it resolves outside the workdir (a link)."""
    path = os.path.join(self.root, *parts)
    if not _inside(self.workdir, path):
      raise UserError(f"{path!r} resolves to {os.path.realpath(path)!r}, outside the workdir "
                      f"{self.workdir!r}; select writes only inside it: remove the link")
    return path

  def name(self, index: int, rank) -> str:
    """The release-relative file name of source image `index`'s primary (rank 0 or False), second
    (rank 1 or True) or further (config.select.per_real) image."""
    rank = int(rank)
    message = f"{int(index)}:{KEPT if rank == 0 else SECOND if rank == 1 else f'{SECOND}{rank}'}"
    message = message.encode()
    return "images/" + hmac.new(self.key, message, hashlib.sha256).hexdigest()[:32] + ".png"

  def save(self, index: int, rank, image: np.ndarray) -> None:
    write_png(self._path(self.name(index, rank)), image)

  def write_lists(self, released: list, paths, labels) -> None:
    """released: (index, rank) pairs in source order; paths, labels: indexed by source index.
    Writes the internal name -> source index and the release's filelist in name order."""
    names = [self.name(i, rank) for i, rank in released]
    index_lines = [json.dumps(dict(name=n, index=int(i), second=bool(rank), rank=int(rank),
                                   path=str(paths[i])), sort_keys=True) + "\n"
                   for n, (i, rank) in zip(names, released)]
    io_utils.write_text(os.path.join(self.workdir, SUBDIR, INDEX_FILE), "".join(index_lines))
    lines = sorted(n + " " + " ".join(str(int(v)) for v in labels[i]) + "\n"
                   for n, (i, _) in zip(names, released))
    io_utils.write_text(self._path("filelist.txt"), "".join(lines))
    self._check_images(names)

  def _check_images(self, names: list) -> None:
    """The images folder holds the listed images only: leftovers of killed atomic writes are
    removed, anything else is refused (it would be handed over with the release)."""
    folder = self._path("images")
    listed = {os.path.basename(n) for n in names}
    for entry in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
      if entry.startswith(".") and entry.endswith(".tmp"):
        os.remove(os.path.join(folder, entry))
      elif entry not in listed:
        raise UserError(f"{os.path.join(folder, entry)!r} is not part of this selection; remove it "
                        "before handing the release over, then rerun --mode=select")

  def write_card(self, card: dict) -> None:
    io_utils.write_json(self._path("card.json"), card)
    io_utils.write_text(self._path("card.md"), card_markdown(card))


# ------------------------------------------------------------------ the release card

METHOD = (
    "Every image was sampled from an EDM2 diffusion model trained on real images, conditioned on "
    "image features of one real training image. Of the candidates drawn for each real image, every "
    "one that a re-identification model linked to any training patient was rejected; among the "
    "rest the one whose predicted findings agree best with the real image's was kept and carries "
    "that image's findings as labels. File names are random tokens and the list is in name order: "
    "neither says which real image or patient an image came from.")
AUDIT_FIGURES = ("verdict", "verdict_rule", "decided_by", "headline_attacker", "attackers", "dcr",
                 "risk_bound", "weight_bound", "confidence", "attack", "control", "residual_risk",
                 "baseline_at_weight_bound", "reidentified", "memorisation_1to1")


def selection_card(config, summary: dict) -> dict:
  """The card of a finished selection: method, settings (no paths), counts; no audit yet."""
  d, s = config.data, config.select
  return {
      "title": f"Synthetic {d.name} images",
      "method": METHOD,
      "images": dict(count=summary["released"], primary=summary["released_primary"],
                     second=summary["released_second"], shape=list(summary["image_shape"]),
                     format="8-bit PNG without metadata", findings=list(d.findings)),
      "made_with": {
          "data": dict(name=d.name, image_size=d.image_size, channels=d.channels,
                       latent=d.latent.kind, features=d.features.kind, feature_dim=d.features.dim),
          "model": dict(preset=config.model.preset, conditioning=config.model.cond,
                        diversity_regulariser=bool(config.regulariser.enabled)),
          "sample": dict(steps=config.sample.steps, guidance=config.sample.guidance,
                         guide=config.sample.guide, ema_std=config.sample.ema_std),
          "select": dict(n_candidates=s.n_candidates, guidance_step=s.guidance_step,
                         guidance_floor=s.guidance_floor, max_rounds=s.max_rounds,
                         second=bool(s.second), per_real=int(s.per_real),
                         cond_k=int(s.cond_k)),
      },
      "selection": dict(real_training_images=summary["train_images"],
                        candidates=summary["candidates"], tau=summary["tau"],
                        first_round_rejection_rate=summary["first_round_rejection_rate"],
                        rejection_rate=summary["rejection_rate"],
                        skipped_images=summary["skipped_images"]),
      "audit": None,
  }


def add_audit(workdir: str, audit_summary: dict, canaries: int) -> None:
  """Rewrites the release card with the audit's verdict and figures (aggregates only)."""
  path = os.path.join(workdir, RELEASE_DIR, "card.json")
  if not os.path.exists(path):
    raise UserError(f"no release card {path!r}; rerun --mode=select (delete {SUBDIR}/ and "
                    f"{RELEASE_DIR}/ first) to write the release")
  card = io_utils.read_json(path)
  card["audit"] = {k: audit_summary[k] for k in AUDIT_FIGURES if k in audit_summary}
  card["audit"]["planted_canaries"] = int(canaries)
  ReleaseWriter(workdir).write_card(card)


def _value(v) -> str:
  if isinstance(v, dict) and {"successes", "n", "low", "high"} <= set(v):
    return f"{v['successes']}/{v['n']} = {v['value']:.1%} (CI {v['low']:.1%} to {v['high']:.1%})"
  if isinstance(v, dict):
    return ", ".join(f"{k} {_value(x)}" for k, x in v.items())
  if isinstance(v, float):
    return f"{v:.4g}"
  return str(v)


def card_markdown(card: dict) -> str:
  out = [f"# {card['title']}", "", card["method"], ""]
  for section in ("images", "made_with", "selection"):
    out += [f"## {section.replace('_', ' ')}", ""]
    out += [f"- {k}: {_value(v)}" for k, v in sorted(card[section].items())] + [""]
  out += ["## audit", ""]
  audit = card.get("audit")
  if audit is None:
    out += ["Not audited yet (run --mode=audit)."]
  else:
    out += [f"verdict: **{audit['verdict']}** ({audit['verdict_rule']})", ""]
    out += [f"- {k}: {_value(v)}" for k, v in audit.items() if k not in ("verdict", "verdict_rule")]
    if audit.get("planted_canaries"):
      out += ["", f"The audited set held {audit['planted_canaries']} planted copies of training "
              "images besides the release (a check that the audit finds them)."]
  return "\n".join(out) + "\n"


# ------------------------------------------------------------------ reading it back

def load_released(workdir: str, lazy: bool = False) -> dict:
  """The released set in source order: images uint8 [N, H, W, C], labels float32 [N, 8] (the
  release filelist's), paths (release-relative names), source_index int [N] (position of the
  conditioning real image in the train split, from the internal index). lazy: images as a lazy
  column (`data.dataset.FileColumn`) that reads only the PNGs of the rows asked for."""
  internal, root = os.path.join(workdir, SUBDIR), os.path.join(workdir, RELEASE_DIR)
  if not os.path.exists(os.path.join(internal, io_utils.COMPLETE)):
    raise UserError(f"no synthetic dataset in {internal!r}; run --mode=select first")
  names, labels = read_filelist(os.path.join(root, "filelist.txt"))
  with open(os.path.join(internal, INDEX_FILE), encoding="utf-8") as f:
    index = [json.loads(line) for line in f if line.strip()]
  row = {n: k for k, n in enumerate(names)}
  if sorted(row) != sorted(r["name"] for r in index):
    raise UserError(f"{root}/filelist.txt and {internal}/{INDEX_FILE} list different images; "
                    f"delete {root} and {internal} and rerun --mode=select")
  summary = io_utils.read_json(os.path.join(internal, "summary.json"))
  shape = tuple(summary["image_shape"])
  files = [os.path.join(root, r["name"]) for r in index]
  if lazy:
    from pso_jax.data import dataset
    images = dataset.FileColumn(files, lambda path: read_png(path, shape[-1]), shape)
  else:
    images = [read_png(path, shape[-1]) for path in files]
    images = np.stack(images) if images else np.zeros((0,) + shape, np.uint8)
  return dict(images=images,
              labels=labels[np.asarray([row[r["name"]] for r in index], np.int64)],
              paths=[r["name"] for r in index],
              source_index=np.asarray([r["index"] for r in index], np.int64))

"""The prepare stage on the phantom and on small real-format datasets written by the tests."""

import csv
import glob
import os
import zlib

import numpy as np
import pytest
from PIL import Image
from sklearn.model_selection import train_test_split

import tolerances as T
from conftest import load_config, save_tiny_sd_vae
from pso_jax.data import builder, dataset, features, filelists, images, latents, phantom, prepare_plan
from pso_jax.models import sd_vae
from pso_jax.stages import prepare
from pso_jax.errors import UserError

SIZE = 16
STYLES = {
    "cxr8": lambda p, s: f"images/{p + 1:08d}_{s:03d}.png",
    "chexpert": lambda p, s: f"CheXpert-v1.0/train/patient{p + 1:05d}/study{s + 1}/view1_frontal.jpg",
    "mimic": lambda p, s: f"files/p1{p % 10}/p1{p % 10}{p + 1:06d}/s5{s:07d}/{p:04d}-{s:02d}.jpg",
}


def _make_dataset(root, style, n_patients=12, scans=2, seed=0):
  """Random small images (mixed sizes, grey and RGB) at the style's paths; returns rows."""
  rng = np.random.default_rng(seed)
  rows = []
  for p in range(n_patients):
    for s in range(scans):
      rel = STYLES[style](p, s)
      h, w = rng.integers(12, 40, 2)
      pixels = rng.integers(0, 256, (h, w, 3) if (p + s) % 2 else (h, w), dtype=np.uint8)
      os.makedirs(os.path.join(root, os.path.dirname(rel)), exist_ok=True)
      Image.fromarray(pixels).save(os.path.join(root, rel), quality=95)
      labels = np.zeros(8, int)
      labels[rng.integers(0, 8)] = 1
      if rng.random() < 0.25:
        labels[(np.argmax(labels) + 3) % 8] = 1
      rows.append((rel, f"p{p}", labels))
  return rows


def _write_filelist(path, rows):
  with open(path, "w") as f:
    for rel, _, labels in rows:
      f.write(f"{rel} " + " ".join(map(str, labels)) + "\n")


def _config(root, filelist="", csv_path=""):
  c = load_config("tiny")
  d = c.data
  d.source = "csv" if csv_path else "filelist"
  d.filelist, d.csv, d.image_root = str(filelist), str(csv_path), str(root)
  d.image_size, d.channels, d.prepare_chunk = SIZE, 1, 8
  d.latent.kind = "identity"
  d.features.kind = "random_projection"
  return c


def _expected_splits(patients_in_order, labels):
  """Independent reference: scikit-learn split of unique patients + the single-label rule."""
  ids = list(dict.fromkeys(patients_in_order))
  train, rest = train_test_split(np.array(ids), test_size=0.2, random_state=42)
  val, test = train_test_split(rest, test_size=0.5, random_state=42)
  positives = np.asarray(labels).sum(1)
  out = {}
  for name, members in (("train", train), ("val", val), ("test", test)):
    mine = np.isin(patients_in_order, members)
    keep = mine & ((positives == 1) if name != "test" else (positives >= 1))
    out[name] = np.flatnonzero(keep)
  return out


@pytest.mark.parametrize("style", ["cxr8", "chexpert", "mimic", "csv"])
def test_prepare_real_format_dataset(tmp_path, style):
  root = tmp_path / "images"
  rows = _make_dataset(str(root), "cxr8" if style == "csv" else style)
  if style == "csv":
    csv_path = tmp_path / "data.csv"
    with open(csv_path, "w", newline="") as f:
      w = csv.writer(f)
      w.writerow(["path", "patient_id", *[f"l{i}" for i in range(8)]])
      for rel, pid, labels in rows:
        w.writerow([rel, pid, *labels])
    config = _config(root, csv_path=csv_path)
    patients = np.array([pid for _, pid, _ in rows])
  else:
    filelist = tmp_path / "list.txt"
    _write_filelist(filelist, rows)
    config = _config(root, filelist=filelist)
    ref = {"cxr8": lambda r: r.split("/")[1].split("_")[0], "chexpert": lambda r: r.split("/")[2],
           "mimic": lambda r: r.split("/")[2]}[style]
    patients = np.array([ref(rel) for rel, _, _ in rows])
  workdir = str(tmp_path / "run")
  card = prepare.run(config, workdir)

  expected = _expected_splits(patients, [l for *_, l in rows])
  for split, want in expected.items():
    got = dataset.load_arrays(workdir, split, ("image", "labels", "patient_id", "path", "feature", "index"))
    assert list(got["path"]) == [rows[i][0] for i in want]
    assert list(got["patient_id"]) == list(patients[want])
    assert np.array_equal(got["labels"], np.array([rows[i][2] for i in want], np.float32))
    assert np.array_equal(got["index"], np.arange(len(want)))
    assert card["splits"][split]["records"] == len(want)
    assert card["splits"][split]["patients"] == len(set(patients[want]))
    np.testing.assert_allclose(np.linalg.norm(got["feature"], axis=1), 1, atol=1e-5)
    for i, path in zip(want[:3], got["path"][:3]):  # pixels: PIL decode, grey, resize
      with Image.open(root / rows[i][0]) as im:
        ref_img = np.asarray(im.convert("L").resize((SIZE, SIZE), Image.BICUBIC))
      k = list(got["path"]).index(path)
      assert np.array_equal(got["image"][k, ..., 0], ref_img)
  # the split filelists beside the records are in the reference format and record order
  lines = open(os.path.join(workdir, "data", "train.txt")).read().splitlines()
  assert lines[0].split()[0] == rows[expected["train"][0]][0] and len(lines[0].split()) == 9
  assert os.path.exists(os.path.join(workdir, "data", "card.md"))


def test_phantom_round_trip_and_skip_when_complete(tmp_path):
  config = load_config("tiny")
  workdir = str(tmp_path)
  card = prepare.run(config, workdir)
  idx, imgs = phantom.generate(config)
  position = {p: i for i, p in enumerate(idx.paths)}
  total, multi = 0, {}
  for split in ("train", "val", "test"):
    got = dataset.load_arrays(workdir, split, ("image", "labels", "patient_id", "path"))
    rows = [position[p] for p in got["path"]]
    assert np.array_equal(got["image"], imgs[rows])
    assert np.array_equal(got["labels"], idx.labels[rows])
    assert list(got["patient_id"]) == list(idx.patient_ids[rows])
    total += len(rows)
    mine = np.isin(idx.patient_ids, got["patient_id"])
    multi[split] = int((idx.labels[mine].sum(1) > 1).sum())  # multi-label scans of its patients
  assert card["splits"]["train"]["multi_label"] == card["splits"]["val"]["multi_label"] == 0
  assert card["splits"]["test"]["multi_label"] == multi["test"]
  assert card["splits"]["train"]["dropped_rows"] == multi["train"]
  assert total + sum(s["dropped_rows"] for s in card["splits"].values()) == len(idx)
  # random projections: whitened on train, so the train features are spread over all directions
  train = dataset.load_features(workdir, "train")
  assert train.shape == (card["splits"]["train"]["records"], config.data.features.dim)
  eig = np.linalg.eigvalsh(np.cov(train, rowvar=False))
  assert eig.min() > 0.1 * eig.max()
  mtime = os.path.getmtime(os.path.join(workdir, "data", "COMPLETE"))
  assert prepare.run(config, workdir) == card  # complete: returns at once, rewrites nothing
  assert os.path.getmtime(os.path.join(workdir, "data", "COMPLETE")) == mtime


def break_png_pixels(path):
  """Zeroes a PNG's compressed pixels and fixes the chunk's CRC: the file's structure is intact
  (the header check passes), only decoding it fails."""
  data = bytearray(path.read_bytes())
  at = data.find(b"IDAT")
  length = int.from_bytes(data[at - 4:at], "big")
  end = at + 4 + length
  data[at + 6:end] = bytes(length - 2)  # keep the 2-byte zlib header
  data[end:end + 4] = zlib.crc32(bytes(data[at:end])).to_bytes(4, "big")
  path.write_bytes(bytes(data))


def test_interrupted_prepare_leaves_no_dataset_and_resumes(tmp_path, monkeypatch):
  root = tmp_path / "images"
  rows = _make_dataset(str(root), "cxr8", n_patients=16)
  filelist = tmp_path / "list.txt"
  _write_filelist(filelist, rows)
  config = _config(root, filelist=filelist)
  config.data.prepare_chunk = 4
  plan = prepare_plan.make_plan(config)
  kept = [rows[i][0] for i in sorted(np.concatenate(list(plan.rows.values())))]
  last = kept[-1]  # records are decoded in filelist order: every earlier chunk is done by then
  good = (root / last).read_bytes()
  break_png_pixels(root / last)
  workdir = tmp_path / "run"
  line = [r[0] for r in rows].index(last) + 1
  with pytest.raises(UserError, match=f"list.txt:{line}: image '.*{last}' cannot be decoded"):
    prepare.run(config, str(workdir))
  assert not (workdir / "data").exists()
  assert len(os.listdir(workdir / ".data.partial" / "chunks")) >= 2

  decoded = []
  real = images.load_images
  monkeypatch.setattr(images, "load_images",
                      lambda root_, paths, *a: decoded.extend(paths) or real(root_, paths, *a))
  (root / last).write_bytes(good)
  prepare.run(config, str(workdir))
  # only the failed chunk (a run of records ending at the repaired one) was decoded again
  assert 0 < len(decoded) <= 4 * 4 < len(kept) and decoded == kept[-len(decoded):]
  assert dataset.is_complete(str(workdir)) and not (workdir / ".data.partial").exists()


def test_interrupted_record_writing_resumes_per_part(tmp_path, monkeypatch):
  """Killed while writing the val split's records: the rerun keeps the train part written before
  (same file, not rewritten), writes the rest, and the dataset equals an uninterrupted one's."""
  config = load_config("tiny")
  fresh = str(tmp_path / "fresh")
  prepare.run(config, fresh)

  workdir = str(tmp_path / "run")
  real = builder.write_part

  def dies_at_val(folder, spec, split, *args):
    if split == "val":
      raise KeyboardInterrupt("killed")
    return real(folder, spec, split, *args)
  monkeypatch.setattr(builder, "write_part", dies_at_val)
  with pytest.raises(KeyboardInterrupt):
    prepare.run(config, workdir)
  assert not dataset.is_complete(workdir)
  (part,) = glob.glob(os.path.join(workdir, ".data.partial", "stage-*", "pso_cxr", "1.0.0", ".train.*.file0"))
  before = os.stat(part)

  rewritten = []

  def counts_new_parts(folder, spec, split, start, stop, records):
    if not os.path.exists(os.path.join(folder, builder.part_name(split, start, stop) + ".json")):
      rewritten.append(split)
    return real(folder, spec, split, start, stop, records)
  monkeypatch.setattr(builder, "write_part", counts_new_parts)
  prepare.run(config, workdir)
  assert rewritten == ["val", "test"]  # train's part was kept
  final = os.path.join(workdir, "data", "pso_cxr", "1.0.0", "pso_cxr-train.array_record-00000-of-00001")
  assert (os.stat(final).st_ino, os.stat(final).st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
  for split in filelists.SPLITS:
    got, want = (dataset.load_arrays(w, split, ("image", "labels", "feature", "path", "index"))
                 for w in (workdir, fresh))
    for k in got:
      np.testing.assert_array_equal(got[k], want[k], err_msg=f"{split} {k}")


def _bad_input(tmp_path, breaks):
  root = tmp_path / "images"
  rows = _make_dataset(str(root), "cxr8")
  filelist = tmp_path / "list.txt"
  _write_filelist(filelist, rows)
  config = _config(root, filelist=filelist)
  breaks(config, root, filelist, rows)
  workdir = tmp_path / "run"
  with pytest.raises(UserError) as e:
    prepare.run(config, str(workdir))
  assert not (workdir / "data").exists()
  return str(e.value)


def test_bad_input_missing_image_root(tmp_path):
  def breaks(config, *_):
    config.data.image_root = str(tmp_path / "nowhere")
  assert "image root" in _bad_input(tmp_path, breaks) and "data.image_root" in _bad_input(tmp_path, breaks)


def test_bad_input_missing_file(tmp_path):
  def breaks(config, root, filelist, rows):
    os.remove(root / rows[5][0])
  msg = _bad_input(tmp_path, breaks)
  assert msg.startswith("1 image listed in ") and "list.txt:6 images/00000003_001.png;" in msg
  assert "does not exist under config.data.image_root" in msg


def test_bad_input_malformed_line(tmp_path):
  def breaks(config, root, filelist, rows):
    lines = filelist.read_text().splitlines()
    lines[3] = lines[3].rsplit(" ", 1)[0]
    filelist.write_text("\n".join(lines) + "\n")
  assert "list.txt:4: expected 8 labels after the path, found 7" in _bad_input(tmp_path, breaks)


def test_bad_input_duplicate_path(tmp_path):
  def breaks(config, root, filelist, rows):
    filelist.write_text(filelist.read_text() + filelist.read_text().splitlines()[2] + "\n")
  assert "list.txt:25: duplicate path 'images/00000002_000.png' (first at" in _bad_input(tmp_path, breaks)


def test_bad_input_unreadable_image(tmp_path):
  def breaks(config, root, filelist, rows):
    (root / rows[0][0]).write_bytes(b"not an image")
  msg = _bad_input(tmp_path, breaks)
  assert "00000001_000.png' cannot be decoded" in msg and "unreadable or truncated" in msg


def _features_file(tmp_path, config, n, dim=None, paths=None):
  dim = dim or config.data.features.dim
  path = tmp_path / "feats.npy"
  np.save(path, np.random.default_rng(0).standard_normal((n, dim)).astype(np.float32))
  txt = tmp_path / "feats.txt"
  if paths is not None:
    txt.write_text("\n".join(paths) + "\n")
  elif txt.exists():
    txt.unlink()
  config.data.features.kind = "file"
  config.data.features.path = str(path)
  return np.load(path)


def test_features_from_file_aligned_with_filelist(tmp_path):
  root = tmp_path / "images"
  rows = _make_dataset(str(root), "cxr8")
  filelist = tmp_path / "list.txt"
  _write_filelist(filelist, rows)
  config = _config(root, filelist=filelist)
  feats = _features_file(tmp_path, config, len(rows), paths=[r[0] for r in rows])
  workdir = str(tmp_path / "run")
  prepare.run(config, workdir)
  got = dataset.load_arrays(workdir, "val", ("feature", "path"))
  want = [next(i for i, r in enumerate(rows) if r[0] == p) for p in got["path"]]
  np.testing.assert_allclose(got["feature"], features.unit_normalise(feats[want]), rtol=1e-6)


def test_features_path_list_is_normalised_like_the_filelist(tmp_path):
  """feats.txt naming `./images/x.png` lists the same image as the filelist's `images/x.png`."""
  root = tmp_path / "images"
  rows = _make_dataset(str(root), "cxr8")
  filelist = tmp_path / "list.txt"
  _write_filelist(filelist, rows)
  config = _config(root, filelist=filelist)
  _features_file(tmp_path, config, len(rows), paths=["./" + r[0] for r in rows])
  prepare.run(config, str(tmp_path / "run"))
  assert dataset.is_complete(str(tmp_path / "run"))


def test_bad_input_features_misaligned(tmp_path):
  def wrong_length(config, root, filelist, rows):
    _features_file(tmp_path, config, len(rows) - 1)
  msg = _bad_input(tmp_path, wrong_length)
  assert "feats.npy' has 23 rows but the filelist has 24 lines" in msg and "misaligned" in msg

  def wrong_order(config, root, filelist, rows):
    paths = [r[0] for r in rows]
    paths[1], paths[2] = paths[2], paths[1]
    _features_file(tmp_path, config, len(rows), paths=paths)
  msg = _bad_input(tmp_path, wrong_order)
  assert "feats.txt:2: features row 1 is for 'images/00000002_000.png'" in msg
  assert "different order" in msg

  def wrong_dim(config, root, filelist, rows):
    _features_file(tmp_path, config, len(rows), dim=5)
  assert "set --config.data.features.dim=5" in _bad_input(tmp_path, wrong_dim)


def test_identity_latents_round_trip():
  config = load_config("tiny")
  pixels = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
  x = latents.to_model_space(pixels, config)
  assert x.dtype == np.float32 and x.min() == -1 and x.max() == 1
  assert np.array_equal(latents.from_model_space(x, config), pixels)
  assert np.array_equal(latents.from_model_space(x + 0.003, config), pixels)   # rounds
  assert latents.from_model_space(np.full((1, 1), 7.0), config)[0, 0] == 255     # clips
  assert latents.model_shape(config) == (16, 16, 1)


def test_sd_vae_latents_stored_per_record(tmp_path):
  """latent.kind=sd_vae: each record holds the VAE latent of its image; chunked encoding
  (prepare_chunk=8) equals one call over all records in train+val+test order."""
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  from pso_jax.data import vae_latents
  vae = save_tiny_sd_vae(str(tmp_path / "vae"))
  config = load_config("tiny")
  config.data.latent.kind = "sd_vae"
  config.data.latent.vae_dir = str(tmp_path / "vae")
  config.data.latent.mean, config.data.latent.std = (0.1, 0.2, 0.3, 0.4), (1.0, 2.0, 3.0, 4.0)
  config.data.prepare_chunk = 8
  workdir = str(tmp_path / "run")
  prepare.run(config, workdir)
  splits = [dataset.load_arrays(workdir, s, ("image", "latent")) for s in ("train", "val", "test")]
  all_images = np.concatenate([s["image"] for s in splits])
  stored = np.concatenate([s["latent"] for s in splits])
  assert stored.shape == (len(all_images), 8, 8, 4)
  T.assert_close(stored, vae_latents.encode_images(config, all_images),  # other batches
                 T.network_rtol(sd_vae.load_vae(config.data.latent.vae_dir)[1]))
  assert latents.model_shape(config) == (8, 8, 4)


def test_features_aligned_with_train_split_only(tmp_path):
  """A features file with one row per train record: val/test records get the null condition."""
  root = tmp_path / "images"
  rows = _make_dataset(str(root), "cxr8")
  filelist = tmp_path / "list.txt"
  _write_filelist(filelist, rows)
  config = _config(root, filelist=filelist)
  n_train = len(prepare_plan.make_plan(config).rows["train"])
  feats = _features_file(tmp_path, config, n_train)
  workdir = str(tmp_path / "run")
  card = prepare.run(config, workdir)
  np.testing.assert_allclose(dataset.load_features(workdir, "train"), features.unit_normalise(feats),
                             rtol=1e-6)
  assert not dataset.load_arrays(workdir, "test", ("feature",))["feature"].any()
  assert card["splits"]["train"]["null_features"] == 0
  assert card["splits"]["test"]["null_features"] == card["splits"]["test"]["records"]


def test_image_decoding_16_bit_and_channels(tmp_path):
  ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
  Image.fromarray(ramp).save(tmp_path / "deep.png")
  grey, rule = images.load_image(str(tmp_path / "deep.png"), 64, 1)
  assert grey.shape == (64, 64, 1) and rule == "16-bit"
  assert np.abs(grey[..., 0].astype(int) - np.rint(ramp / 257).astype(int)).max() <= 1  # not clipped
  rgb, _ = images.load_image(str(tmp_path / "deep.png"), 32, 3)
  assert rgb.shape == (32, 32, 3) and np.array_equal(rgb[..., 0], rgb[..., 2])
  colour = np.zeros((8, 8, 3), np.uint8)
  colour[..., 0] = 200
  Image.fromarray(colour).save(tmp_path / "red.png")
  red, rule = images.load_image(str(tmp_path / "red.png"), 8, 1)
  assert red[0, 0, 0] == round(200 * 0.299) and rule == "8-bit"

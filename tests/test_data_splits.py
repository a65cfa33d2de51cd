"""Fixed splits (config.data.split_files) and the reference's filter order (config.data.filter_order),
on the reference's real filelists and on synthetic ones, against independent re-implementations."""

import os

import numpy as np
import pytest
from PIL import Image
from sklearn.model_selection import train_test_split

from conftest import load_config
from pso_jax.data import dataset, filelists
from pso_jax.errors import UserError
from pso_jax.stages import prepare


def _lines_by_patient(reference_filelists, name="eight_cxr8_val.txt"):
  """The reference filelist's lines and each line's patient (the text before `_`, read here
  without pso_jax's path rules)."""
  lines = open(os.path.join(reference_filelists, name)).read().splitlines()
  patients = np.array([line.split()[0].split("/")[-1].split("_")[0] for line in lines])
  return np.array(lines), patients


def _write(path, lines):
  path.write_text("".join(line + "\n" for line in lines))
  return str(path)


def _three_files(tmp_path, lines, patients, move=()):
  """The lines cut into train/val/test files by patient (60/20/20 of the patients in order);
  `move`: patients of which one line is copied from train into val as well (an overlap)."""
  ids = list(dict.fromkeys(patients))
  a, b = int(0.6 * len(ids)), int(0.8 * len(ids))
  owner = {p: ("train" if i < a else "val" if i < b else "test") for i, p in enumerate(ids)}
  parts = {s: [line for line, p in zip(lines, patients) if owner[p] == s] for s in filelists.SPLITS}
  for p in move:  # another image of the patient, listed in val
    labels = next(line for line, q in zip(lines, patients) if q == p).split()[1:]
    parts["val"].append(f"images/{p}_999.png {' '.join(labels)}")
  return [_write(tmp_path / f"{s}.txt", parts[s]) for s in filelists.SPLITS], parts


def test_fixed_splits_from_the_reference_filelist_are_used_as_given(tmp_path, reference_filelists):
  lines, patients = _lines_by_patient(reference_filelists)
  files, parts = _three_files(tmp_path, lines, patients)
  table, fixed = filelists.read_split_files(files)
  d = load_config("tiny").data
  rows, dropped = filelists.split_rows(table, d, fixed)
  for split in filelists.SPLITS:
    assert list(table.paths[rows[split]]) == [line.split()[0] for line in parts[split]]
    want = {line.split()[0].split("/")[-1].split("_")[0] for line in parts[split]}
    assert set(table.patient_ids[rows[split]]) == want
  assert len(rows[filelists.ATTACKER]) == 0 and sum(dropped.values()) == 0  # val is single-label
  assert sum(len(r) for r in rows.values()) == 8114
  # a row is named by its own file and line
  i = rows["val"][3]
  assert table.where(i) == f"{files[1]}:4"
  # the command-line form `a,b,c` arrives as one string
  assert filelists.split_files_of((",".join(files),)) == tuple(files)


def test_overlapping_split_files_name_the_patients_and_the_files(tmp_path, reference_filelists):
  lines, patients = _lines_by_patient(reference_filelists)
  ids = list(dict.fromkeys(patients))
  shared = ids[:7]  # train patients with one more image in val
  files, _ = _three_files(tmp_path, lines, patients, move=shared)
  with pytest.raises(UserError) as e:
    filelists.read_split_files(files)
  msg = str(e.value)
  assert "7 patient(s) have images in more than one split" in msg
  for p in shared[:5]:
    assert f"{p} (train, val)" in msg
  assert shared[5] not in msg and "and 2 more" in msg
  assert f"train={files[0]}" in msg and f"val={files[1]}" in msg and "test=" not in msg


def test_split_files_with_the_attacker_split(tmp_path, reference_filelists):
  lines, patients = _lines_by_patient(reference_filelists)
  cut = int(np.flatnonzero(patients != patients[400])[np.flatnonzero(patients != patients[400]) > 400][0])
  files, parts = _three_files(tmp_path, lines[:cut], patients[:cut])  # cut between patients
  attacker = _write(tmp_path / "attacker.txt", lines[cut:cut + 50])
  table, fixed = filelists.read_split_files(files + [attacker])
  rows, _ = filelists.split_rows(table, load_config("tiny").data, fixed)
  assert list(table.paths[rows[filelists.ATTACKER]]) == [l.split()[0] for l in lines[cut:cut + 50]]
  # carving attacker patients out of given splits would change them: refused, with the way out
  d = load_config("tiny").data
  d.source, d.split_files, d.attacker_patients = "filelist", tuple(files), 10
  with pytest.raises(UserError, match="attacker_patients=10 cannot carve.*fourth file"):
    filelists.check_split_config(d)
  d.attacker_patients, d.filelist = 0, files[0]
  with pytest.raises(UserError, match="split_files and config.data.filelist are both set"):
    filelists.check_split_config(d)
  d.filelist, d.split_files = "", tuple(files[:2])
  with pytest.raises(UserError, match="has 2 file"):
    filelists.check_split_config(d)


# ---------------------------------------------------------------- filter order


def _numpy_reference_split(patients, labels, filter_first: bool, seed=42):
  """The reference notebook's procedure written out with numpy + scikit-learn: optionally drop
  rows without a positive label, then split the unique patients (order of first appearance)
  80/20 and the 20 50/50, then train/val keep single-label rows, test any labelled row."""
  positives = labels.sum(1)
  pool = patients[positives >= 1] if filter_first else patients
  _, first = np.unique(pool, return_index=True)
  ids = pool[np.sort(first)]
  train, rest = train_test_split(ids, test_size=0.2, random_state=seed)
  val, test = train_test_split(rest, test_size=0.5, random_state=seed)
  out = {}
  for name, members in (("train", train), ("val", val), ("test", test)):
    rule = positives == 1 if name != "test" else positives >= 1
    out[name] = np.flatnonzero(np.isin(patients, members) & rule)
  return out


def _synthetic_table(seed=0, n_patients=300):
  """Patients with 1-4 scans; a third of the patients have only unlabelled rows (the reference
  drops them before splitting, which moves the patient cut)."""
  rng = np.random.default_rng(seed)
  paths, pids, labels = [], [], []
  for p in range(n_patients):
    unlabelled = rng.random() < 0.33
    for s in range(rng.integers(1, 5)):
      row = np.zeros(8, np.float32)
      if not unlabelled and rng.random() > 0.1:
        row[rng.integers(0, 8)] = 1
        if rng.random() < 0.2:
          row[rng.integers(0, 8)] = 1
      paths.append(f"images/{p + 1:08d}_{s:03d}.png")
      pids.append(f"{p + 1:08d}")
      labels.append(row)
  return filelists.Table(np.array(paths), np.array(labels), np.array(pids))


@pytest.mark.parametrize("order", filelists.FILTER_ORDERS)
def test_filter_order_matches_a_numpy_reimplementation(order):
  table = _synthetic_table()
  d = load_config("tiny").data
  d.filter_order = order
  rows, dropped = filelists.split_rows(table, d)
  want = _numpy_reference_split(table.patient_ids, table.labels, order == "filter_then_split")
  for split in filelists.SPLITS:
    assert np.array_equal(rows[split], want[split]), split
    assert set(table.patient_ids[rows[split]]) == set(table.patient_ids[want[split]])
  # the two orders really differ on this table (else the test could not tell them apart)
  other = _numpy_reference_split(table.patient_ids, table.labels, order != "filter_then_split")
  assert not np.array_equal(rows["train"], other["train"])
  sizes = [len(rows[s]) for s in filelists.SPLITS]
  assert sum(sizes) + sum(dropped.values()) == len(table)


def test_unknown_filter_order_is_refused():
  d = load_config("tiny").data
  d.filter_order = "reference"
  with pytest.raises(UserError, match="filter_order='reference' is unknown; use split_then_filter"):
    filelists.check_split_config(d)


# ---------------------------------------------------------------- end to end


def test_prepare_with_split_files_keeps_the_given_splits(tmp_path):
  """prepare on three small filelists with images: the records hold exactly each file's rows."""
  root = tmp_path / "images"
  rng = np.random.default_rng(1)
  parts = {"train": range(0, 8), "val": range(8, 10), "test": range(10, 12)}
  files = []
  for split, patients in parts.items():
    lines = []
    for p in patients:
      for s in range(2):
        rel = f"images/{p + 1:08d}_{s:03d}.png"
        os.makedirs(root / "images", exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8)).save(root / rel)
        labels = ["0"] * 8
        labels[(p + s) % 8] = "1"
        lines.append(f"{rel} {' '.join(labels)}")
    files.append(_write(tmp_path / f"{split}.txt", lines))
  config = load_config("tiny")
  d = config.data
  d.source, d.image_root, d.split_files = "filelist", str(root), (",".join(files),)
  d.latent.kind, d.features.kind = "identity", "random_projection"
  workdir = str(tmp_path / "run")
  card = prepare.run(config, workdir)
  for split, f in zip(filelists.SPLITS, files):
    got = dataset.load_arrays(workdir, split, ("path",))
    assert list(got["path"]) == [line.split()[0] for line in open(f).read().splitlines()]
    assert card["splits"][split]["records"] == 2 * len(parts[split])
  assert card["split_files"] == files
  assert "Fixed splits from" in open(os.path.join(workdir, "data", "card.md")).read()


def test_missing_images_of_split_files_are_listed_with_their_file_and_line(tmp_path):
  """An image root missing some files: the first five named with their split file and line, the
  rest counted, before any image is decoded (images.check_images, for fixed splits too)."""
  root = tmp_path / "images"
  os.makedirs(root / "images")
  files = []
  for k, split in enumerate(filelists.SPLITS):
    lines = [f"images/{10 * k + p + 1:08d}_000.png 1 0 0 0 0 0 0 0" for p in range(4)]
    files.append(_write(tmp_path / f"{split}.txt", lines))
  for f in files:
    for line in open(f).read().splitlines()[:2]:  # two of each file's four images exist
      Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / line.split()[0])
  config = load_config("tiny")
  d = config.data
  d.source, d.image_root, d.split_files = "filelist", str(root), tuple(files)
  d.latent.kind, d.features.kind = "identity", "random_projection"
  with pytest.raises(UserError) as e:
    prepare.run(config, str(tmp_path / "run"))
  msg = str(e.value)
  assert msg.startswith("6 images listed in ") and "and 1 more" in msg
  assert f"{files[0]}:3 images/00000003_000.png" in msg and f"{files[2]}:3" in msg
  assert not (tmp_path / "run" / "data").exists()

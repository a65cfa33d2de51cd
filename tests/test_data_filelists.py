"""Filelist parsing, patient ids and patient-disjoint splits, on the reference's real filelists."""

import os

import numpy as np
import pytest
from sklearn.model_selection import train_test_split

from conftest import load_config
from pso_jax.data import filelists
from pso_jax.errors import UserError

# README of ../shared/data/reference_filelists: lines and patients a correct parser finds
REFERENCE = {"cxr8": (8114, 2709), "chexpert": (8963, 4328), "mimic": (11566, 4794)}


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_reference_filelists_patient_counts(reference_filelists, name):
  table = filelists.read_filelist(os.path.join(reference_filelists, f"eight_{name}_val.txt"))
  lines, patients = REFERENCE[name]
  assert len(table) == lines
  assert len(np.unique(table.patient_ids)) == patients
  assert filelists.detect_path_style(table.paths) == name
  assert set(np.unique(table.labels)) == {0.0, 1.0}
  # the reference's val split is single-label (docs/method.md §1.3)
  assert np.all(table.labels.sum(1) == 1)


def test_split_matches_scikit_learn_procedure(reference_filelists):
  table = filelists.read_filelist(os.path.join(reference_filelists, "eight_cxr8_val.txt"))
  ours = filelists.split_patients(table.patient_ids, (0.8, 0.1, 0.1), 42)
  ids = filelists.unique_in_order(table.patient_ids)
  train, rest = train_test_split(ids, test_size=0.2, random_state=42)
  val, test = train_test_split(rest, test_size=0.5, random_state=42)
  for got, want in zip((ours["train"], ours["val"], ours["test"]), (train, val, test)):
    assert np.array_equal(got, want)
  assert [len(ours[s]) for s in filelists.SPLITS] == [2167, 271, 271]


def test_patient_ids_per_style():
  assert filelists.patient_id("images/00000006_000.png", "cxr8") == "00000006"
  assert filelists.patient_id("CheXpert-v1.0/train/patient00006/study1/view1_frontal.jpg",
                              "chexpert") == "patient00006"
  assert filelists.patient_id("files/p19/p19994586/s54820351/ab-cd.jpg", "mimic") == "p19994586"
  with pytest.raises(UserError, match="cannot tell the patient id"):
    filelists.detect_path_style(np.array(["scans/a.png"]))


def test_split_rows_apply_single_label_rule_and_stay_disjoint():
  rng = np.random.default_rng(0)
  n = 600
  pids = np.array([f"{i // 3:08d}" for i in range(n)])
  paths = np.array([f"images/{p}_{i % 3:03d}.png" for i, p in enumerate(pids)])
  labels = np.zeros((n, 8), np.float32)
  labels[np.arange(n), rng.integers(0, 8, n)] = 1
  labels[rng.random(n) < 0.2, 3] = 1            # some multi-label rows
  labels[rng.random(n) < 0.05] = 0              # some rows with no label at all
  table = filelists.Table(paths, labels, pids)
  rows, dropped = filelists.split_rows(table, load_config("tiny").data)
  positives = labels.sum(1)
  for split in ("train", "val"):
    assert np.all(positives[rows[split]] == 1)
  assert np.all(positives[rows["test"]] >= 1) and np.any(positives[rows["test"]] > 1)
  sets = {s: set(pids[r]) for s, r in rows.items()}
  assert not (sets["train"] & sets["val"]) and not (sets["train"] & sets["test"])
  assert not (sets["val"] & sets["test"])
  kept = sum(len(r) for r in rows.values())
  assert kept + sum(dropped.values()) == n
  assert kept == int((positives == 1).sum() + ((positives > 1) & np.isin(pids, list(sets["test"]))).sum())


def test_patient_in_two_splits_is_an_error():
  t = filelists.Table(np.array(["images/00000001_000.png", "images/00000001_001.png"]),
                      np.eye(8, dtype=np.float32)[:2], np.array(["00000001", "00000001"]))
  with pytest.raises(UserError, match="patient '00000001' is in both the train and the test split"):
    filelists.check_patient_disjoint({"train": t.take([0]), "test": t.take([1])})


def _write(tmp_path, text, name="list.txt"):
  path = tmp_path / name
  path.write_text(text)
  return str(path)


@pytest.mark.parametrize("line, message", [
    ("images/00000001_001.png 1 0 0 0 0 0 0", "list.txt:2: expected 8 labels after the path, found 7"),
    ("images/00000001_001.png 1 0 0 0 0 0 0 0 1", "list.txt:2: expected 8 labels after the path, found 9"),
    ("images/00000001_001.png 1 0 -1 0 0 0 0 0", "list.txt:2: label '-1' is not 0 or 1"),
    ("images/00000001_001.png 1 0 x 0 0 0 0 0", "list.txt:2: label 'x' is not 0 or 1"),
    ("images/00000001_000.png 1 0 0 0 0 0 0 0", "list.txt:2: duplicate path 'images/00000001_000.png'"),
    ("other/a.png 1 0 0 0 0 0 0 0", "list.txt:2: cannot tell the patient id from path 'other/a.png'"),
])
def test_malformed_filelist_lines(tmp_path, line, message):
  path = _write(tmp_path, f"images/00000001_000.png 1 0 0 0 0 0 0 0\n{line}\n")
  with pytest.raises(UserError, match=message.replace("(", r"\(")):
    filelists.read_filelist(path)


def test_csv_and_filelist_round_trip(tmp_path):
  csv_path = _write(tmp_path, "path,patient_id,a,b,c,d,e,f,g,h\nx/1.png,P1,0,1,0,0,0,0,0,0\n"
                    "x/2.png,P2,1,0,0,0,0,0,0,0\n", "data.csv")
  table = filelists.read_csv(csv_path)
  assert list(table.patient_ids) == ["P1", "P2"] and table.labels[0, 1] == 1
  out = tmp_path / "out.txt"
  filelists.write_filelist(str(out), table)
  assert out.read_text().splitlines()[0] == "x/1.png 0 1 0 0 0 0 0 0"
  bad = _write(tmp_path, "path,patient,a,b,c,d,e,f,g,h\n", "bad.csv")
  with pytest.raises(UserError, match="bad.csv:1: header"):
    filelists.read_csv(bad)
  short = _write(tmp_path, "path,patient_id,a,b,c,d,e,f,g,h\nx/1.png,P1,0,1\n", "short.csv")
  with pytest.raises(UserError, match="short.csv:2: expected 8 labels"):
    filelists.read_csv(short)

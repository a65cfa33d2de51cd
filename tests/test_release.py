"""The release folder is safe to hand over: the tiny pipeline runs on phantom scans stored under
planted patient ids and paths, and no byte of `<workdir>/release/` (names, PNG bytes, filelist,
card) holds any of them; the internal records that do stay outside the release."""

import csv
import json
import os

import numpy as np
import pytest
from PIL import Image

from conftest import load_config
from pso_jax import stages
from pso_jax import workdir as workdir_lib
from pso_jax.data import phantom
from pso_jax.data import release
from pso_jax.errors import UserError

pytest.importorskip("pso_jax.stages.train")

PIPELINE = ("prepare", "train", "train_reid", "train_classifier", "select", "audit", "evaluate")


def patient(p):
  return f"PATIENTSECRET{p + 1:04d}"


def scan_path(p, s):
  return f"SECRETDIR/{patient(p)}/SCANSTEM{p + 1:04d}x{s}.png"


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory):
  """The tiny pipeline through evaluate on phantom scans saved as PNGs at planted paths, read
  from a CSV with planted patient ids."""
  base = tmp_path_factory.mktemp("release")
  config = load_config("tiny")
  index, images = phantom.generate(config)
  root = base / "SECRETROOT"
  rows = []
  for k, (p, s) in enumerate(zip(index.patient, index.scan)):
    rel = scan_path(int(p), int(s))
    os.makedirs(root / os.path.dirname(rel), exist_ok=True)
    Image.fromarray(images[k, ..., 0]).save(root / rel)
    rows.append([rel, patient(int(p)), *index.labels[k].astype(int).tolist()])
  table = base / "SECRETROOT.csv"
  with open(table, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["path", "patient_id", *[f"l{i}" for i in range(8)]])
    w.writerows(rows)
  config.data.source, config.data.csv, config.data.image_root = "csv", str(table), str(root)
  workdir = str(base / "run")
  workdir_lib.prepare_workdir(workdir, config)
  for mode in PIPELINE:
    stages.get_stage(mode)(config, workdir)
  secrets = {r[0] for r in rows} | {r[1] for r in rows}
  secrets |= {os.path.splitext(os.path.basename(r[0]))[0] for r in rows}
  secrets |= {"SECRETDIR", "SECRETROOT", "PATIENTSECRET", "SCANSTEM", str(root), str(table)}
  return config, workdir, sorted(secrets)


def release_files(workdir):
  out = {}
  root = os.path.join(workdir, "release")
  for base, dirs, files in os.walk(root):
    for name in dirs + files:
      path = os.path.join(base, name)
      out[os.path.relpath(path, root)] = open(path, "rb").read() if name in files else b""
  return out


def test_no_byte_of_the_release_names_a_patient_or_a_source_scan(planted_run):
  config, workdir, secrets = planted_run
  files = release_files(workdir)
  assert files, "the pipeline wrote no release folder"
  assert {"filelist.txt", "card.md", "card.json", "images"} <= set(files)
  leaks = [(rel, s) for rel, data in files.items() for s in secrets
           if s.lower().encode() in rel.lower().encode() or s.lower().encode() in data.lower()]
  assert not leaks, f"{len(leaks)} leaks, e.g. {leaks[:5]}"
  # the internal records do name them (so the search above would have found them) and are not
  # inside the release
  internal = os.path.join(workdir, "synthetic")
  assert patient(0).encode() in open(os.path.join(internal, "selection.jsonl"), "rb").read()
  assert not os.path.realpath(internal).startswith(os.path.realpath(os.path.join(workdir, "release")))


def test_released_pngs_carry_no_metadata(planted_run):
  _, workdir, _ = planted_run
  pngs = {rel: data for rel, data in release_files(workdir).items() if rel.endswith(".png")}
  assert pngs
  for rel, data in pngs.items():
    assert data[:8] == b"\x89PNG\r\n\x1a\n", rel
    chunks, pos = [], 8
    while pos < len(data):
      length = int.from_bytes(data[pos:pos + 4], "big")
      chunks.append(data[pos + 4:pos + 8])
      pos += 12 + length
    assert set(chunks) <= {b"IHDR", b"IDAT", b"IEND"}, (rel, chunks)


def test_filelist_names_are_opaque_and_out_of_source_order(planted_run):
  config, workdir, _ = planted_run
  root = os.path.join(workdir, "release")
  lines = open(os.path.join(root, "filelist.txt"), encoding="utf-8").read().splitlines()
  names = [line.split()[0] for line in lines]
  assert len(set(names)) == len(names) > 10
  assert sorted(os.listdir(os.path.join(root, "images"))) == sorted(os.path.basename(n) for n in names)
  assert all(len(line.split()) == 1 + len(config.data.findings) for line in lines)
  # the internal index maps each name to its source; neither the listed order nor the names'
  # own order follows the source order
  released = release.load_released(workdir)
  source = dict(zip(released["paths"], released["source_index"].tolist()))
  listed = [source[n] for n in names]
  by_name = [source[n] for n in sorted(names)]
  assert listed != sorted(listed) and by_name != sorted(by_name)
  # what audit and evaluate read is exactly the release: its files, with the filelist's labels
  for n, image, labels in zip(released["paths"], released["images"], released["labels"]):
    with Image.open(os.path.join(root, n)) as im:
      assert np.array_equal(np.asarray(im)[..., None], image)
    assert lines[names.index(n)].split()[1:] == [str(int(v)) for v in labels]
  audit = json.load(open(os.path.join(workdir, "audit", "audit.json")))
  evaluate = json.load(open(os.path.join(workdir, "evaluate", "evaluate.json")))
  assert audit["meta"]["n_audited"] == evaluate["n_synthetic"] == len(names)


def test_card_says_how_the_set_was_made_and_the_audit_verdict(planted_run):
  config, workdir, _ = planted_run
  root = os.path.join(workdir, "release")
  card = json.load(open(os.path.join(root, "card.json")))
  summary = json.load(open(os.path.join(workdir, "synthetic", "summary.json")))
  audit = json.load(open(os.path.join(workdir, "audit", "audit.json")))["summary"]
  assert card["images"]["count"] == summary["released"] == len(release.load_released(workdir)["paths"])
  assert card["images"]["shape"] == [config.data.image_size] * 2 + [config.data.channels]
  assert card["made_with"]["select"]["n_candidates"] == config.select.n_candidates
  assert card["audit"]["verdict"] == audit["verdict"]
  assert card["audit"]["attack"] == audit["attack"] and card["audit"]["control"] == audit["control"]
  assert card["audit"]["residual_risk"] == audit["residual_risk"]
  md = open(os.path.join(root, "card.md"), encoding="utf-8").read()
  assert f"verdict: **{audit['verdict']}**" in md and str(summary["released"]) in md


def test_a_release_path_that_resolves_outside_the_workdir_is_refused(tmp_path):
  workdir, outside = tmp_path / "run", tmp_path / "outside"
  os.makedirs(workdir / "release")
  os.makedirs(outside)
  os.symlink(outside, workdir / "release" / "images")
  writer = release.ReleaseWriter(str(workdir))
  with pytest.raises(UserError, match="outside the workdir"):
    writer.save(0, False, np.zeros((4, 4, 1), np.uint8))
  assert os.listdir(outside) == []


def test_a_release_folder_that_is_not_this_selections_is_refused(tmp_path):
  workdir = str(tmp_path / "run")
  image = np.zeros((4, 4, 1), np.uint8)
  writer = release.ReleaseWriter(workdir)
  writer.save(0, False, image)
  # the internal folder (and its key) deleted, the release kept: new names would mix two sets
  os.remove(os.path.join(workdir, "synthetic", release.KEY_FILE))
  with pytest.raises(UserError, match="another selection.*delete"):
    release.ReleaseWriter(workdir)
  # a file that is not one of the selection's images would be handed over with them
  os.makedirs(os.path.join(workdir, "synthetic"), exist_ok=True)
  os.rename(os.path.join(workdir, "release"), str(tmp_path / "old_release"))
  writer = release.ReleaseWriter(workdir)
  writer.save(0, False, image)
  open(os.path.join(workdir, "release", "images", "notes.txt"), "w").close()
  with pytest.raises(UserError, match="notes.txt.*not part of this selection"):
    writer.write_lists([(0, False)], ["a.png"], np.zeros((1, 8)))
  # the internal records linked into the release
  other = tmp_path / "linked"
  os.makedirs(other / "release" / "internal")
  os.symlink(other / "release" / "internal", other / "synthetic")
  with pytest.raises(UserError, match="inside the release"):
    release.ReleaseWriter(str(other))

"""Faults on the input side of `prepare` (issue 12, items 2, 4, 8 and 9): each test plants one bad
input or fault and checks the one clear message, or the right result, that it now gets."""

import os

import numpy as np
import pytest
from PIL import Image

from pso_jax.data import dataset, filelists, images
from pso_jax.errors import UserError
from pso_jax.stages import prepare
from test_stages_prepare import _config, _make_dataset, _write_filelist, break_png_pixels

LABELS = " 1 0 0 0 0 0 0 0"
CSV_HEADER = "path,patient_id,l0,l1,l2,l3,l4,l5,l6,l7\n"


def _dataset(tmp_path, n_patients=12, scans=2):
  root = tmp_path / "images"
  rows = _make_dataset(str(root), "cxr8", n_patients=n_patients, scans=scans)
  filelist = tmp_path / "list.txt"
  _write_filelist(filelist, rows)
  return root, rows, filelist


def _filelist(tmp_path, lines, name="list.txt", prefix=""):
  path = tmp_path / name
  path.write_text(prefix + "".join(line + "\n" for line in lines), encoding="utf-8")
  return str(path)


def _count_decoded(monkeypatch) -> list:
  """Paths every later images.load_images call decodes."""
  decoded = []
  real = images.load_images

  def recording(root, paths, *args, **kwargs):
    decoded.extend(map(str, paths))
    return real(root, paths, *args, **kwargs)
  monkeypatch.setattr(images, "load_images", recording)
  return decoded


# ---------------------------------------------------------------- item 2: paths


@pytest.mark.parametrize("bad, what", [("/etc/images/00000002_000.png", "is absolute"),
                                       ("images/../../00000002_000.png", "contains '..'")])
def test_path_leaving_the_image_root_is_refused_when_read(tmp_path, bad, what):
  path = _filelist(tmp_path, ["images/00000001_000.png" + LABELS, bad + LABELS])
  with pytest.raises(UserError, match=f"list.txt:2: path '{bad}' {what}") as e:
    filelists.read_filelist(path)
  assert "config.data.image_root" in str(e.value)
  csv_path = tmp_path / "data.csv"
  csv_path.write_text(CSV_HEADER + "images/a.png,P1,1,0,0,0,0,0,0,0\n"
                      f"{bad},P2,1,0,0,0,0,0,0,0\n")
  with pytest.raises(UserError, match=f"data.csv:3: path '{bad}' {what}"):
    filelists.read_csv(str(csv_path))


def test_symlink_leaving_the_image_root_is_refused(tmp_path, monkeypatch):
  root, rows, filelist = _dataset(tmp_path)
  outside = tmp_path / "outside.png"
  os.replace(root / rows[4][0], outside)
  os.symlink(outside, root / rows[4][0])
  decoded = _count_decoded(monkeypatch)
  with pytest.raises(UserError, match=f"list.txt:5: image '{rows[4][0]}' resolves to "
                     f"'{outside}', outside config.data.image_root"):
    prepare.run(_config(root, filelist=filelist), str(tmp_path / "run"))
  assert decoded == [] and not (tmp_path / "run" / "data").exists()


# ---------------------------------------------------------------- item 4: pixel values


def _decode(tmp_path, array, name):
  Image.fromarray(array).save(tmp_path / name)
  return images.load_image(str(tmp_path / name), array.shape[0], 1)


def test_12_bit_values_in_a_16_bit_png_use_the_full_range(tmp_path):
  ramp = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)  # 0..4095, as DICOM stores 12 bits
  image, rule = _decode(tmp_path, ramp, "dicom.png")
  assert rule == "12-bit in 16"
  assert np.array_equal(image[..., 0], np.rint(ramp / 4095 * 255).astype(np.uint8))
  wide = ramp * 16  # 0..65520: 16-bit values keep the 16-bit scale
  image, rule = _decode(tmp_path, wide, "wide.tif")
  assert rule == "16-bit"
  assert np.array_equal(image[..., 0], np.rint(wide / 65535 * 255).astype(np.uint8))


def test_float_tiff_is_scaled_by_its_range_and_non_finite_is_refused(tmp_path):
  x = np.linspace(0, 3, 32 * 32, dtype=np.float32).reshape(32, 32)
  image, rule = _decode(tmp_path, x, "float.tif")
  assert rule == "range"
  assert np.array_equal(image[..., 0], np.rint(x / 3 * 255).astype(np.uint8))
  x[3, 5] = np.nan
  Image.fromarray(x).save(tmp_path / "nan.tif")
  with pytest.raises(UserError, match="nan.tif' holds non-finite pixel values"):
    images.load_image(str(tmp_path / "nan.tif"), 32, 1)


def test_negative_integers_are_scaled_by_range_not_clipped(tmp_path):
  x = (np.arange(32 * 32, dtype=np.int32).reshape(32, 32) * 50 - 30000)
  image, rule = _decode(tmp_path, x, "signed.tif")
  assert rule == "range"
  want = np.rint((x - x.min()) / (x.max() - x.min()) * 255).astype(np.uint8)
  assert np.array_equal(image[..., 0], want)


def test_card_counts_the_pixel_scaling_rules(tmp_path):
  root, rows, filelist = _dataset(tmp_path)
  twelve = [rel for i, (rel, _, _) in enumerate(rows) if i % 3 == 0]
  for rel in twelve:
    values = np.random.default_rng(1).integers(0, 4096, (24, 24)).astype(np.uint16)
    Image.fromarray(values).save(root / rel)
  workdir = str(tmp_path / "run")
  card = prepare.run(_config(root, filelist=filelist), workdir)
  prepared = [p for s in filelists.SPLITS for p in dataset.load_arrays(workdir, s, ("path",))["path"]]
  n_twelve = len(set(prepared) & set(twelve))
  assert 0 < n_twelve < len(prepared)
  assert card["pixel_scaling"] == {"8-bit": len(prepared) - n_twelve, "12-bit in 16": n_twelve}
  md = open(os.path.join(workdir, "data", "card.md")).read()
  assert f"12-bit in 16 (x / 4095): {n_twelve}" in md and "mixed" in md


# ---------------------------------------------------------------- item 8: before decoding starts


def test_truncated_png_is_named_before_any_image_is_decoded(tmp_path, monkeypatch):
  root, rows, filelist = _dataset(tmp_path)
  bad = root / rows[20][0]
  bad.write_bytes(bad.read_bytes()[:-30])
  decoded = _count_decoded(monkeypatch)
  with pytest.raises(UserError, match=f"list.txt:21: image '.*{rows[20][0]}' cannot be decoded"):
    prepare.run(_config(root, filelist=filelist), str(tmp_path / "run"))
  assert decoded == []


def test_missing_files_are_listed_with_their_lines_and_count(tmp_path):
  root, rows, filelist = _dataset(tmp_path)
  for i in (2, 9, 10, 13, 17, 21, 22):
    os.remove(root / rows[i][0])
  with pytest.raises(UserError) as e:
    prepare.run(_config(root, filelist=filelist), str(tmp_path / "run"))
  msg = str(e.value)
  assert msg.startswith("7 images listed in ") and "do not exist under config.data.image_root" in msg
  for i in (2, 9, 10, 13, 17):
    assert f"list.txt:{i + 1} {rows[i][0]}" in msg
  assert rows[21][0] not in msg and "and 2 more" in msg


def test_removed_line_keeps_the_other_cached_chunks(tmp_path, monkeypatch):
  """A fault only decoding finds stops prepare late; the user removes that line (its patient's only
  scan, so the patient split changes) and reruns: the chunks before it are not decoded again."""
  root, rows, filelist = _dataset(tmp_path, n_patients=48, scans=1)
  config = _config(root, filelist=filelist)
  config.data.prepare_chunk = 4
  workdir = tmp_path / "run"
  break_png_pixels(root / rows[40][0])
  with pytest.raises(UserError, match=f"image '.*{rows[40][0]}' cannot be decoded"):
    prepare.run(config, str(workdir))

  del rows[40]
  _write_filelist(filelist, rows)
  decoded = _count_decoded(monkeypatch)
  prepare.run(config, str(workdir))
  # chunks hold 4 * prepare_chunk records at most: rows 0..23 were cached and stay usable
  assert decoded and not set(decoded) & {rel for rel, _, _ in rows[:24]}

  fresh = str(tmp_path / "fresh")
  prepare.run(config, fresh)
  for split in filelists.SPLITS:
    got, want = (dataset.load_arrays(w, split, ("image", "path", "feature")) for w in (str(workdir), fresh))
    for key in want:
      assert np.array_equal(got[key], want[key])


# ---------------------------------------------------------------- item 9: small ones


def test_csv_path_with_whitespace_is_refused_and_filelists_round_trip(tmp_path):
  csv_path = tmp_path / "data.csv"
  csv_path.write_text(CSV_HEADER + "images/00000001_000.png,P1,0,1,0,0,0,0,0,0\n"
                      "my scans/00000002_000.png,P2,1,0,0,0,0,0,0,0\n")
  with pytest.raises(UserError, match="data.csv:3: path 'my scans/00000002_000.png' contains "
                     "whitespace"):
    filelists.read_csv(str(csv_path))
  csv_path.write_text(CSV_HEADER + "images/00000001_000.png,P1,0,1,0,0,0,0,0,0\n"
                      "./images//00000002_000.png,P2,1,0,0,0,0,1,0,0\n")
  table = filelists.read_csv(str(csv_path))
  out = tmp_path / "out.txt"
  filelists.write_filelist(str(out), table)
  assert out.read_text().splitlines() == ["images/00000001_000.png 0 1 0 0 0 0 0 0",
                                          "images/00000002_000.png 1 0 0 0 0 1 0 0"]
  back = filelists.read_filelist(str(out))
  assert list(back.paths) == list(table.paths) and np.array_equal(back.labels, table.labels)


def test_utf8_bom_is_accepted(tmp_path):
  path = _filelist(tmp_path, ["images/00000001_000.png" + LABELS, "images/00000002_000.png" + LABELS],
                   prefix="\ufeff")
  assert list(filelists.read_filelist(path).paths) == ["images/00000001_000.png", "images/00000002_000.png"]
  csv_path = tmp_path / "data.csv"
  csv_path.write_text("\ufeff" + CSV_HEADER + "x/1.png,P1,0,1,0,0,0,0,0,0\n", encoding="utf-8")
  assert list(filelists.read_csv(str(csv_path)).paths) == ["x/1.png"]


def test_patient_id_error_quotes_the_offending_line(tmp_path):
  path = _filelist(tmp_path, ["images/00000001_000.png" + LABELS, "", "images/00000002_000.png" + LABELS,
                              "scans/two.png" + LABELS, "images/00000003_000.png" + LABELS])
  with pytest.raises(UserError, match="list.txt:4: cannot tell the patient id from path 'scans/two.png'"):
    filelists.read_filelist(path)
  with pytest.raises(UserError, match="list.txt:4: path 'scans/two.png' does not follow the cxr8 style"):
    filelists.read_filelist(path, "cxr8")


@pytest.mark.parametrize("twin", ["./images/00000001_000.png", "images//00000001_000.png",
                                  "images/./00000001_000.png"])
def test_the_same_file_spelled_twice_is_one_record(tmp_path, twin):
  path = _filelist(tmp_path, ["images/00000001_000.png" + LABELS, "images/00000002_000.png" + LABELS,
                              twin + LABELS])
  with pytest.raises(UserError, match="list.txt:3: duplicate path 'images/00000001_000.png' "
                     r"\(first at .*list.txt:1;"):
    filelists.read_filelist(path)
  one = _filelist(tmp_path, [twin + LABELS, "images/00000002_000.png" + LABELS], name="one.txt")
  assert filelists.read_filelist(one).paths[0] == "images/00000001_000.png"

"""DICOM input: files written here with pydicom (uncompressed, explicit VR little endian) and read by
pso_jax.data.images, compared with a numpy reference of the same transform; bad DICOM refused."""

import logging
import os

import numpy as np
import pytest
from PIL import Image

import pydicom  # noqa: E402
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.sequence import Sequence  # noqa: E402
from pydicom.uid import (DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian,  # noqa: E402
                         JPEGLSLossless, generate_uid)

from conftest import load_config  # noqa: E402
from pso_jax.data import dataset, dicom, filelists, images  # noqa: E402
from pso_jax.errors import UserError  # noqa: E402
from pso_jax.stages import prepare  # noqa: E402


def write_dicom(path, stored, *, photometric="MONOCHROME2", bits=12, signed=False, slope=None,
                intercept=None, window=None, pixels=True, syntax=ExplicitVRLittleEndian, **extra):
  """A one-frame radiograph; `stored`: the integer values as stored."""
  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
  meta.MediaStorageSOPInstanceUID = generate_uid()
  meta.TransferSyntaxUID = syntax
  ds = Dataset()
  ds.file_meta = meta
  ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
  ds.Modality, ds.PatientID = "DX", "P1"
  ds.Rows, ds.Columns = stored.shape
  ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
  ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits, bits - 1
  ds.PixelRepresentation = int(signed)
  if slope is not None:
    ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = slope, intercept, "US"
  if window is not None:
    ds.WindowCenter, ds.WindowWidth = window
  for k, v in extra.items():
    setattr(ds, k, v)
  if pixels:
    ds.PixelData = stored.astype(np.int16 if signed else np.uint16).tobytes()
  if syntax != ExplicitVRLittleEndian:  # encapsulated: the bytes are never decoded
    ds.PixelData = pydicom.encaps.encapsulate([b"\x00" * 16])
  os.makedirs(os.path.dirname(str(path)) or ".", exist_ok=True)
  ds.save_as(str(path), enforce_file_format=True)
  return str(path)


def _linear_window(x, c, w):
  """DICOM PS3.3 C.11.2.1.2.1, written out (y in 0..1)."""
  return np.where(x <= c - 0.5 - (w - 1) / 2, 0.0,
                  np.where(x > c - 0.5 + (w - 1) / 2, 1.0, (x - (c - 0.5)) / (w - 1) + 0.5))


def _u8(y):
  return np.rint(np.asarray(y) * 255).astype(np.uint8)


RNG = np.random.default_rng(3)
RAMP = (np.arange(32 * 24).reshape(32, 24) * 5 % 4096).astype(np.int64)  # 12-bit values


def test_monochrome2_rescale_and_window(tmp_path):
  """The transform alone (floats, before 8-bit rounding)."""
  path = write_dicom(tmp_path / "a.dcm", RAMP, slope=2.0, intercept=-1024.0, window=(1500, 3001))
  unit, rule = dicom.read_unit(path)
  np.testing.assert_allclose(unit, _linear_window(RAMP * 2.0 - 1024.0, 1500, 3001), rtol=0, atol=1e-12)
  assert rule == "dicom window" and 0 < (unit == 0).sum() and 0 < (unit == 1).sum()


def test_monochrome2_matches_numpy_reference_through_the_image_path(tmp_path):
  path = write_dicom(tmp_path / "a.dcm", RAMP, slope=2.0, intercept=-1024.0, window=(1500, 3001))
  want = _u8(_linear_window(RAMP * 2.0 - 1024.0, 1500, 3001))
  img = np.asarray(Image.fromarray(want).resize((16, 16), Image.BICUBIC))
  got, rule = images.load_image(path, 16, 1)
  assert rule == "dicom window"
  assert np.array_equal(got[..., 0], img)
  # the same 8-bit picture saved as PNG goes through the PNG path to the same record, RGB too
  Image.fromarray(want).save(tmp_path / "a.png")
  for channels in (1, 3):
    png, _ = images.load_image(str(tmp_path / "a.png"), 16, channels)
    assert np.array_equal(images.load_image(path, 16, channels)[0], png)


def test_monochrome1_without_window_is_min_max_then_inverted(tmp_path):
  stored = RNG.integers(100, 3000, (20, 20))
  path = write_dicom(tmp_path / "m1.dcm", stored, photometric="MONOCHROME1", slope=0.5,
                     intercept=10.0)
  x = stored * 0.5 + 10.0
  want = _u8(1.0 - (x - x.min()) / (x.max() - x.min()))
  got, rule = images.load_image(path, 20, 1)
  assert rule == "dicom range" and np.array_equal(got[..., 0], want)
  # a MONOCHROME1 window: windowed first, then inverted
  path = write_dicom(tmp_path / "m1w.dcm", stored, photometric="MONOCHROME1", window=(1200, 801))
  got, rule = images.load_image(path, 20, 1)
  assert rule == "dicom window"
  assert np.array_equal(got[..., 0], _u8(1.0 - _linear_window(stored.astype(float), 1200, 801)))


def test_signed_16_bit_and_multi_valued_window(tmp_path):
  stored = RNG.integers(-2000, 2000, (16, 16))
  path = write_dicom(tmp_path / "s.dcm", stored, bits=16, signed=True, slope=1.0, intercept=-1000.0,
                     window=([40.0, 400.0], [350.0, 2000.0]))  # two windows: the first is used
  got, rule = images.load_image(path, 16, 1)
  assert rule == "dicom window"
  assert np.array_equal(got[..., 0], _u8(_linear_window(stored - 1000.0, 40.0, 350.0)))


def test_voi_lut_sequence_is_applied(tmp_path):
  stored = RNG.integers(0, 256, (12, 12))
  table = (np.arange(256) ** 2 // 256).astype(np.uint16)  # 8-bit out: a gamma-like curve
  item = Dataset()
  item.LUTDescriptor = [256, 0, 8]
  item.LUTData = table.tolist()
  item["LUTData"].VR = "US"
  path = write_dicom(tmp_path / "lut.dcm", stored, bits=8, VOILUTSequence=Sequence([item]))
  got, rule = images.load_image(path, 12, 1)
  assert rule == "dicom VOI LUT"
  assert np.array_equal(got[..., 0], _u8(table[stored] / 255.0))


def test_dicom_is_recognised_by_its_marker_without_an_extension(tmp_path):
  path = write_dicom(tmp_path / "noext", RAMP, window=(2048, 4096))
  assert dicom.is_dicom(path)
  Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "x.png")
  assert not dicom.is_dicom(str(tmp_path / "x.png"))


# ---------------------------------------------------------------- bad input


def _filelist_dataset(tmp_path, bad=None):
  """Twelve patients x two DICOM scans at cxr8-style .dcm paths; `bad(path, i)` may rewrite one."""
  root = tmp_path / "images"
  lines = []
  for p in range(12):
    for s in range(2):
      rel = f"images/{p + 1:08d}_{s:03d}.dcm"
      write_dicom(root / rel, RNG.integers(0, 4096, (24, 24)), window=(2048, 4096))
      labels = ["0"] * 8
      labels[(p + s) % 8] = "1"
      lines.append(f"{rel} {' '.join(labels)}")
  (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
  config = load_config("tiny")
  d = config.data
  d.source, d.filelist, d.image_root = "filelist", str(tmp_path / "list.txt"), str(root)
  d.latent.kind, d.features.kind = "identity", "random_projection"
  return config, root, [l.split()[0] for l in lines]


def test_prepare_reads_a_dicom_dataset(tmp_path):
  config, root, rels = _filelist_dataset(tmp_path)
  workdir = str(tmp_path / "run")
  card = prepare.run(config, workdir)
  assert card["pixel_scaling"] == {"dicom window": len(rels)}
  got = dataset.load_arrays(workdir, "train", ("image", "path"))
  first = str(got["path"][0])
  want, _ = images.load_image(str(root / first), config.data.image_size, 1)
  assert np.array_equal(got["image"][0], want)


@pytest.mark.parametrize("fault, message", [
    ("no_pixels", "list.txt:6: image '.*00000003_001.dcm' holds no pixel data"),
    ("jpeg_ls", "list.txt:6: image .* uses the transfer syntax JPEG-LS Lossless Image Compression "
                ".* which no installed decoder handles .install one of: .*pyjpegls"),
    ("two_frames", "list.txt:6: image .* holds 2 frames"),
])
def test_bad_dicom_is_named_before_any_image_is_decoded(tmp_path, monkeypatch, fault, message):
  config, root, rels = _filelist_dataset(tmp_path)
  target = root / rels[5]
  stored = RNG.integers(0, 4096, (24, 24))
  if fault == "no_pixels":
    write_dicom(target, stored, pixels=False)
  elif fault == "jpeg_ls":
    write_dicom(target, stored, syntax=JPEGLSLossless)
  else:
    write_dicom(target, np.concatenate([stored, stored]), NumberOfFrames=2, Rows=24)
  decoded = []
  real = images.load_images
  monkeypatch.setattr(images, "load_images", lambda *a, **k: decoded.append(1) or real(*a, **k))
  with pytest.raises(UserError, match=message):
    prepare.run(config, str(tmp_path / "run"))
  assert decoded == [] and not (tmp_path / "run" / "data").exists()


def test_mixed_bit_depths_are_scaled_per_image_and_counted(tmp_path, caplog):
  """8-bit PNG, 16-bit PNG and 12-bit DICOM in one dataset: each reaches 0..255 by its own rule
  (none is truncated), the card counts the rules and prepare warns that they are mixed."""
  config, root, rels = _filelist_dataset(tmp_path)
  lines = (tmp_path / "list.txt").read_text().splitlines()
  deep = RNG.integers(0, 65536, (24, 24)).astype(np.uint16)
  for i in range(0, len(lines), 3):
    rel = rels[i].replace(".dcm", ".png")
    if i % 2:
      Image.fromarray(RNG.integers(0, 256, (24, 24), dtype=np.uint8)).save(root / rel)
    else:
      Image.fromarray(deep).save(root / rel)
    lines[i] = lines[i].replace(rels[i], rel)
  (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
  got, rule = images.load_image(str(root / rels[0].replace(".dcm", ".png")), 24, 1)
  assert rule == "16-bit" and np.array_equal(got[..., 0], _u8(deep / 65535))  # full depth, rounded
  workdir = str(tmp_path / "run")
  with caplog.at_level(logging.WARNING):
    card = prepare.run(config, workdir)
  n = sum(s["records"] for s in card["splits"].values())
  assert set(card["pixel_scaling"]) == {"8-bit", "16-bit", "dicom window"}
  assert sum(card["pixel_scaling"].values()) == n
  assert "mixed rules" in open(os.path.join(workdir, "data", "card.md")).read()

"""Compressed records (config.data.image_codec=png): lossless PNG per record, decoded by every reader
to the same arrays as raw records; the card gives bytes per record."""

import io
import os

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordReader
from PIL import Image

from conftest import load_config
from pso_jax.data import builder, dataset, filelists, record_codec
from pso_jax.errors import UserError
from pso_jax.stages import prepare


@pytest.mark.parametrize("shape, dtype", [((16, 12, 1), np.uint8), ((16, 12, 3), np.uint8),
                                          ((9, 7, 1), np.uint16)])
def test_png_round_trip_is_lossless(shape, dtype):
  rng = np.random.default_rng(0)
  image = rng.integers(0, np.iinfo(dtype).max + 1, shape).astype(dtype)
  data = record_codec.encode_png(image)
  assert data[:8] == b"\x89PNG\r\n\x1a\n"
  assert np.array_equal(record_codec.decode_png(data, shape, dtype), image)
  # the bytes are a PNG any reader opens at the stored depth (16-bit grey stays 16-bit)
  with Image.open(io.BytesIO(data)) as im:
    assert np.array_equal(np.asarray(im).reshape(shape).astype(dtype), image)
    assert im.mode in (("L", "RGB") if dtype == np.uint8 else ("I;16", "I"))


def test_unknown_codec_is_refused():
  with pytest.raises(UserError, match="image_codec='jpeg' is unknown; use raw"):
    record_codec.check_codec("jpeg")


@pytest.fixture(scope="module")
def both(tmp_path_factory):
  """The tiny phantom prepared twice: raw and PNG records."""
  root = tmp_path_factory.mktemp("codec")
  out = {}
  for codec in record_codec.CODECS:
    config = load_config("tiny")
    config.data.image_codec = codec
    config.data.image_size = 64  # large enough for PNG's ~70 bytes of chunks to pay off
    out[codec] = (str(root / codec), prepare.run(config, str(root / codec)))
  return out


def test_png_records_read_back_as_the_raw_ones(both):
  (raw_dir, raw_card), (png_dir, png_card) = both["raw"], both["png"]
  for split in filelists.SPLITS:
    a = dataset.load_arrays(raw_dir, split, ("image", "index", "path"))
    b = dataset.load_arrays(png_dir, split, ("image", "index", "path"))
    assert b["image"].dtype == np.uint8 and np.array_equal(a["image"], b["image"])
    assert np.array_equal(a["path"], b["path"])
  # random access, the record spec and lazy columns see arrays, not bytes
  record = dataset.load_split(png_dir, "train")[3]
  assert record["image"].shape == (64, 64, 1)
  assert builder.record_shapes(dataset.data_dir(png_dir))["image"] == ((64, 64, 1), np.uint8)
  column = dataset.load_columns(png_dir, "val", ("image",))["image"]
  assert np.array_equal(np.asarray(column[[1, 0]]),
                        dataset.load_arrays(raw_dir, "val", ("image",))["image"][[1, 0]])


def test_card_gives_bytes_per_record(both):
  (raw_dir, raw_card), (png_dir, png_card) = both["raw"], both["png"]
  for codec, (workdir, card) in both.items():
    assert card["records"]["image_codec"] == codec
    folder = builder.builder_dir(dataset.data_dir(workdir))
    files = [f for f in os.listdir(folder) if f.startswith("pso_cxr-train.array_record")]
    records = [r for f in files for r in ArrayRecordReader(os.path.join(folder, f)).read_all()]
    assert len(records) == card["splits"]["train"]["records"]
    assert card["records"]["bytes_per_record"]["train"] == round(np.mean([len(r) for r in records]))
    total = sum(os.path.getsize(os.path.join(folder, f)) for f in files)
    assert card["records"]["file_bytes_per_record"]["train"] == round(total / len(records))
  raw, png = raw_card["records"]["bytes_per_record"]["train"], png_card["records"]["bytes_per_record"]["train"]
  assert png < raw - 64 * 64 / 4  # the phantom's smooth images compress (by more than a quarter)
  md = open(os.path.join(dataset.data_dir(png_dir), "card.md")).read()
  assert "lossless PNG" in md and f"train {png:,}" in md

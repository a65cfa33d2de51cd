"""How images are stored in the records (`config.data.image_codec`).

`raw`: the uint8 [H, W, C] array as it is (tfds Tensor), ~H*W*C bytes per record.
`png`: one lossless PNG per record (8-bit grey or RGB, 16-bit grey), written by PIL at prepare
time and decoded by PIL when a record is read. `PngImage` is a tfds feature whose spec keeps the
image's shape and dtype, so every reader (the loaders, record columns, record_shapes) sees the
same uint8 array as with `raw`; tfds re-imports this module by name when it opens the folder.
"""

import io

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from pso_jax.errors import UserError

CODECS = ("raw", "png")


def check_codec(codec: str) -> str:
  if codec not in CODECS:
    raise UserError(f"config.data.image_codec={codec!r} is unknown; use raw (arrays as they are) "
                    "or png (lossless PNG per record, decoded by the loader)")
  return codec


def encode_png(image: np.ndarray) -> bytes:
  """uint8 [H, W, 1|3] or uint16 [H, W, 1] -> PNG bytes (lossless)."""
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] not in (1, 3):
    raise ValueError(f"PNG records hold [H, W, 1|3] images, got shape {image.shape}")
  if image.dtype == np.uint16 and image.shape[-1] == 3:
    raise ValueError("16-bit PNG records are grey only (PIL writes no 16-bit RGB PNG)")
  if image.dtype not in (np.uint8, np.uint16):
    raise ValueError(f"PNG records hold uint8 or uint16 images, got {image.dtype}")
  pixels = image[..., 0] if image.shape[-1] == 1 else image
  out = io.BytesIO()
  Image.fromarray(pixels).save(out, format="PNG", compress_level=6)
  return out.getvalue()


def decode_png(data: bytes, shape, dtype) -> np.ndarray:
  """PNG bytes -> the [H, W, C] array encode_png was given."""
  with Image.open(io.BytesIO(bytes(data))) as im:
    arr = np.asarray(im)
  return arr.astype(dtype, copy=False).reshape(shape)


class PngImage(tfds.features.Tensor):
  """An image feature stored as PNG bytes; read back as the [H, W, C] array."""

  def __init__(self, *, shape, dtype=np.uint8, **kwargs):
    kwargs["encoding"] = "bytes"  # serialized as one bytes value (what the PNG is)
    super().__init__(shape=shape, dtype=dtype, **kwargs)

  def encode_example(self, example_data):
    image = np.asarray(example_data)
    if image.shape != self.shape or image.dtype != self.np_dtype:
      raise ValueError(f"image {image.dtype} {image.shape} does not match the record spec "
                       f"{self.np_dtype} {self.shape}")
    return encode_png(image)

  def decode_example_np(self, example_data):
    if isinstance(example_data, np.ndarray):  # a 0-d object array holding the bytes
      example_data = example_data.item()
    return decode_png(example_data, self.shape, self.np_dtype)


def image_feature(shape, codec: str):
  """The tfds feature that stores uint8 images of `shape` with `codec`."""
  if check_codec(codec) == "png":
    return PngImage(shape=tuple(shape), dtype=np.uint8)
  return tfds.features.Tensor(shape=tuple(shape), dtype=np.uint8)

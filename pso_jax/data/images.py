"""Image files -> uint8 [H, W, C] arrays: PIL decode, grey or RGB, resize (reference: PIL default
filter, aspect ratio not kept; docs/method.md §1.4)."""

import concurrent.futures
import os

import numpy as np
from PIL import Image

from pso_jax.errors import UserError


def resolve(image_root: str, relative_path: str) -> str:
  return os.path.join(image_root, relative_path)


def check_files_exist(image_root: str, relative_paths, source: str = "") -> None:
  """All files present, before any decoding starts (one message naming the first missing file)."""
  if not image_root or not os.path.isdir(image_root):
    raise UserError(f"image root {image_root!r} is not a folder; set --config.data.image_root to "
                    "the folder the filelist's relative paths start from")
  missing = [p for p in relative_paths if not os.path.isfile(resolve(image_root, p))]
  if missing:
    more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
    raise UserError(f"image {resolve(image_root, missing[0])!r}{more} listed in {source or 'the filelist'} "
                    "does not exist; check config.data.image_root or remove the lines")


def _to_8bit(im: Image.Image) -> Image.Image:
  """16-bit and 32-bit grey images scaled to 8 bits (PIL's convert would clip them at 255)."""
  if im.mode.startswith("I;16") or im.mode in ("I", "F"):
    arr = np.asarray(im, np.float64)
    full = 65535.0 if im.mode != "F" or arr.max() > 1 else 1.0
    return Image.fromarray(np.clip(np.rint(arr / full * 255), 0, 255).astype(np.uint8))
  return im


def load_image(path: str, image_size: int, channels: int) -> np.ndarray:
  """uint8 [image_size, image_size, channels]; an unreadable or truncated file is a UserError."""
  try:
    with Image.open(path) as im:
      im.load()  # decodes fully: truncated files fail here, not later
      im = _to_8bit(im).convert("L" if channels == 1 else "RGB")
      if im.size != (image_size, image_size):
        im = im.resize((image_size, image_size), Image.BICUBIC)
      arr = np.asarray(im, dtype=np.uint8)
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise UserError(f"image {path!r} cannot be decoded ({e}); the file is unreadable or truncated: "
                    "replace it or remove its line from the filelist") from None
  return arr.reshape(image_size, image_size, channels)


def load_images(image_root: str, relative_paths, image_size: int, channels: int,
                threads: int | None = None) -> np.ndarray:
  """uint8 [N, S, S, C], decoded by a thread pool (PIL releases the GIL while decoding)."""
  threads = threads or min(8, os.cpu_count() or 1)
  load = lambda p: load_image(resolve(image_root, p), image_size, channels)
  out = np.empty((len(relative_paths), image_size, image_size, channels), np.uint8)
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    for i, img in enumerate(pool.map(load, relative_paths)):  # in order; first error re-raised
      out[i] = img
  return out

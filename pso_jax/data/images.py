"""Image files -> uint8 [H, W, C] arrays: PIL decode, scale to 8 bits, grey or RGB, resize
(reference: PIL default filter, aspect ratio not kept; docs/method.md §1.4). DICOM files (by
extension .dcm/.dicom or by their DICM marker) are read by pso_jax.data.dicom (rescale, window,
MONOCHROME1 inverted) and then converted and resized like any other file.

`check_images` runs before any decoding: every listed file exists, lies inside the image root
(links followed) and has a readable header, so a bad file is named with its filelist line before
the images before it have been decoded. Pixel values reach 0..255 by one of the SCALING rules,
chosen per image from its mode and values and counted in the dataset card; nothing is clipped.
"""

import concurrent.futures
import os

import numpy as np
from PIL import Image

from pso_jax.data import dicom
from pso_jax.errors import UserError

# rule -> how a value x becomes x' in 0..1 (then x' * 255, rounded)
SCALING = {
    "8-bit": "as stored",             # 8-bit grey, colour, palette and bilevel files
    "12-bit in 16": "x / 4095",       # integers wider than 8 bits, all <= 4095 (DICOM-style 12 bits)
    "16-bit": "x / 65535",            # other integers in 0..65535
    "range": "(x - min) / (max - min)",  # float files, and integers outside 0..65535 (signed, 32-bit)
    **dicom.RULES,                    # DICOM files: by their own header (pso_jax.data.dicom)
}
_SHOWN = 5  # missing files named in the message
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def resolve(image_root: str, relative_path: str) -> str:
  return os.path.join(image_root, relative_path)


def file_key(image_root: str, relative_path: str) -> str:
  """Names a file's content without reading it: path, size, mtime and inode (rewriting a file
  changes its mtime, replacing it its inode)."""
  st = os.stat(resolve(image_root, relative_path))
  return f"{relative_path} {st.st_size} {st.st_mtime_ns} {st.st_ino}"


def _named(path: str, where: str) -> str:
  return f"{where}: image {path!r}" if where else f"image {path!r}"


def _cannot_decode(path: str, error: Exception, where: str = "") -> UserError:
  return UserError(f"{_named(path, where)} cannot be decoded ({error}); the file is unreadable or "
                   "truncated: replace it or remove its line from the filelist")


def _header_error(path: str) -> Exception | None:
  if dicom.is_dicom(path):
    problem = dicom.header_problem(path)
    return None if problem is None else UserError(problem)
  try:
    with Image.open(path) as im:
      im.verify()  # PNG: every chunk's checksum up to its end, without decoding; JPEG: the header
  except _DECODE_ERRORS as e:
    return e
  return None


def check_images(image_root: str, table, threads: int | None = None) -> None:
  """Every image of a filelists.Table is present, inside the root and readable, else one
  UserError naming the file and its line."""
  if not image_root or not os.path.isdir(image_root):
    raise UserError(f"image root {image_root!r} is not a folder; set --config.data.image_root to "
                    "the folder the filelist's relative paths start from")
  files = [resolve(image_root, p) for p in table.paths]
  missing = [i for i, f in enumerate(files) if not os.path.isfile(f)]
  if missing:
    n = len(missing)
    shown = ", ".join(f"{table.where(i)} {table.paths[i]}" for i in missing[:_SHOWN])
    more = f" and {n - _SHOWN} more" if n > _SHOWN else ""
    raise UserError(f"{n} {'image' if n == 1 else 'images'} listed in {table.source} "
                    f"{'does' if n == 1 else 'do'} not exist under config.data.image_root="
                    f"{image_root!r}: {shown}{more}; check config.data.image_root or remove the lines")
  root = os.path.realpath(image_root)
  for i, f in enumerate(files):
    real = os.path.realpath(f)
    if os.path.commonpath([root, real]) != root:
      raise UserError(f"{table.where(i)}: image {str(table.paths[i])!r} resolves to {real!r}, outside "
                      f"config.data.image_root={image_root!r} (a link leads out of it); copy the "
                      "file into the image root or remove the line")
  threads = threads or min(8, os.cpu_count() or 1)
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    for i, error in enumerate(pool.map(_header_error, files)):  # in file order
      if isinstance(error, UserError):  # a DICOM file that holds no image pso_jax can read
        raise UserError(f"{_named(files[i], table.where(i))} {error}")
      if error is not None:
        raise _cannot_decode(files[i], error, table.where(i))


def _to_8bit(im: Image.Image, path: str, where: str) -> tuple[Image.Image, str]:
  """Integer images wider than 8 bits and float images mapped to 8 bits, and the SCALING rule
  used (PIL's convert would clip them at 255)."""
  if not (im.mode.startswith("I") or im.mode == "F"):
    return im, "8-bit"
  x = np.asarray(im, np.float64)
  if not np.isfinite(x).all():
    raise UserError(f"{_named(path, where)} holds non-finite pixel values (NaN or infinity) that no "
                    "scale can map; fix or replace the file, or remove its line from the filelist")
  lo, hi = x.min(), x.max()
  if im.mode != "F" and lo >= 0 and hi <= 65535:
    rule, lo, span = ("12-bit in 16", 0, 4095) if hi <= 4095 else ("16-bit", 0, 65535)
  else:
    rule, span = "range", (hi - lo) or 1.0  # a constant image becomes black
  return Image.fromarray(np.clip(np.rint((x - lo) / span * 255), 0, 255).astype(np.uint8)), rule


def load_image(path: str, image_size: int, channels: int, where: str = "") -> tuple[np.ndarray, str]:
  """(uint8 [image_size, image_size, channels], SCALING rule); an unreadable or truncated file is
  a UserError (`where`: its filelist line, for the message)."""
  if dicom.is_dicom(path):
    try:
      unit, rule = dicom.read_unit(path)
    except UserError as e:
      raise UserError(f"{where}: {e}" if where else str(e)) from None
    im = Image.fromarray(np.rint(unit * 255).astype(np.uint8))
    return _resized(im, image_size, channels), rule
  try:
    with Image.open(path) as im:
      im.load()  # decodes fully: truncated files fail here, not later
      im, rule = _to_8bit(im, path, where)
      return _resized(im, image_size, channels), rule
  except _DECODE_ERRORS as e:
    raise _cannot_decode(path, e, where) from None


def _resized(im: Image.Image, image_size: int, channels: int) -> np.ndarray:
  """An 8-bit image as uint8 [image_size, image_size, channels]: grey or RGB, PIL bicubic."""
  im = im.convert("L" if channels == 1 else "RGB")
  if im.size != (image_size, image_size):
    im = im.resize((image_size, image_size), Image.BICUBIC)
  return np.asarray(im, dtype=np.uint8).reshape(image_size, image_size, channels)


def load_images(image_root: str, relative_paths, image_size: int, channels: int, where=None,
                threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 [N, S, S, C], SCALING rule of each image), decoded by a thread pool (PIL releases the
  GIL while decoding); `where`: each path's filelist line, for messages."""
  threads = threads or min(8, os.cpu_count() or 1)
  where = [""] * len(relative_paths) if where is None else where
  load = lambda i: load_image(resolve(image_root, relative_paths[i]), image_size, channels, where[i])
  out = np.empty((len(relative_paths), image_size, image_size, channels), np.uint8)
  rules = []
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    for i, (img, rule) in enumerate(pool.map(load, range(len(relative_paths)))):  # first error re-raised
      out[i] = img
      rules.append(rule)
  return out, np.array(rules, dtype=str)

"""The released synthetic dataset under `<workdir>/synthetic/`: PNG files in the reference layout,
`filelist.txt` (`<relpath> l0 .. l7`), `selection.jsonl` (every candidate) and `summary.json`."""

import io
import json
import os

import numpy as np
from PIL import Image

from pso_jax import io_utils
from pso_jax.errors import UserError

SUBDIR = "synthetic"
KEPT, SECOND = "kept", "second"  # the selection outcomes that are released


def output_path(relpath: str, second: bool = False) -> str:
  """Reference layout: the real image's relative path with a .png suffix (`_2nd` for the second)."""
  stem = os.path.splitext(relpath)[0]
  return stem + ("_2nd" if second else "") + ".png"


def write_png(path: str, image: np.ndarray) -> None:
  """uint8 [H, W, 1|3] -> PNG (grey or RGB), written atomically."""
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3):
    raise ValueError(f"expected uint8 [H, W, 1|3], got {image.dtype} {image.shape}")
  buffer = io.BytesIO()
  Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="PNG")
  io_utils.write_bytes(path, buffer.getvalue())


def read_png(path: str, channels: int) -> np.ndarray:
  with Image.open(path) as im:
    array = np.asarray(im.convert("L" if channels == 1 else "RGB"))
  return array[..., None] if channels == 1 else array


def read_filelist(path: str) -> tuple[list, np.ndarray]:
  paths, labels = [], []
  with open(path, encoding="utf-8") as f:
    for line in f:
      parts = line.split()
      if parts:
        paths.append(parts[0])
        labels.append([float(v) for v in parts[1:]])
  return paths, np.asarray(labels, np.float32).reshape(len(paths), -1)


def load_released(workdir: str) -> dict:
  """The released set: images uint8 [N, H, W, C], labels float32 [N, 8], paths (filelist order),
  source_index int [N] (position of the conditioning real image in the train split)."""
  root = os.path.join(workdir, SUBDIR)
  if not os.path.exists(os.path.join(root, "COMPLETE")):
    raise UserError(f"no synthetic dataset in {root!r}; run --mode=select first")
  paths, labels = read_filelist(os.path.join(root, "filelist.txt"))
  summary = io_utils.read_json(os.path.join(root, "summary.json"))
  source = {}
  with open(os.path.join(root, "selection.jsonl"), encoding="utf-8") as f:
    for line in f:
      r = json.loads(line)
      if r["outcome"] in (KEPT, SECOND):
        source[output_path(r["path"], r["outcome"] == SECOND)] = r["index"]
  channels = int(summary["image_shape"][-1])
  images = [read_png(os.path.join(root, "images", p), channels) for p in paths]
  shape = tuple(summary["image_shape"])
  return dict(images=np.stack(images) if images else np.zeros((0,) + shape, np.uint8),
              labels=labels, paths=paths,
              source_index=np.asarray([source[p] for p in paths], np.int64))

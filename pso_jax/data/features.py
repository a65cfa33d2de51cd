"""Pseudo-conditioning features: one unit-norm vector per image (docs/method.md §1.5).

Kinds (config.data.features.kind):
- `random_projection` (in-project default, no weights): average-pool the image to pool_size^2
  pixels, project with a fixed Gaussian matrix (features.seed) to features.dim, whiten with the
  train split's mean and covariance, unit-normalise.
- `file`: a `.npy` [N, dim] computed by any extractor (SwAV ResNet-50 in the reference), aligned
  row by row with the input filelist (all its lines, in order) or with the train split's filelist
  (`data/train.txt`; val/test then get zero rows = the null condition). A `.txt` of paths beside it
  (same name, `.txt`) is checked line by line against that order.
- `resnet50`: `pso_jax.data.resnet_features.extract(config, images)` (torchvision weights ported).
"""

import os
import posixpath

import numpy as np

from pso_jax.data import resnet_features
from pso_jax.errors import UserError

KINDS = ("random_projection", "file", "resnet50")


def check_kind(config) -> str:
  kind = config.data.features.kind
  if kind not in KINDS:
    raise UserError(f"config.data.features.kind={kind!r} is unknown; use one of {', '.join(KINDS)}")
  if kind == "random_projection" and config.data.image_size % config.data.features.pool_size:
    raise UserError(f"config.data.features.pool_size={config.data.features.pool_size} must divide "
                    f"config.data.image_size={config.data.image_size}")
  return kind


def unit_normalise(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


def average_pool(images_uint8: np.ndarray, pool_size: int) -> np.ndarray:
  """float32 [N, pool_size^2 * C] block means of [N, H, W, C] images in [0, 1]."""
  n, h, w, c = images_uint8.shape
  k = h // pool_size
  x = np.asarray(images_uint8, np.float32).reshape(n, pool_size, k, pool_size, w // pool_size, c)
  return x.mean(axis=(2, 4)).reshape(n, -1) / 255.0


def projection_matrix(in_dim: int, dim: int, seed: int) -> np.ndarray:
  rng = np.random.default_rng(seed)
  return (rng.standard_normal((in_dim, dim)) / np.sqrt(in_dim)).astype(np.float32)


def raw_features(config, images_uint8: np.ndarray) -> np.ndarray | None:
  """Per-image features before whitening/normalising, for a chunk of images (None for `file`)."""
  f = config.data.features
  kind = check_kind(config)
  if kind == "file":
    return None
  if kind == "resnet50":
    return np.asarray(resnet_features.extract(config, images_uint8), np.float32)
  pooled = average_pool(images_uint8, f.pool_size)
  return pooled @ projection_matrix(pooled.shape[1], f.dim, f.seed)


def whitening(train: np.ndarray, rel_eps: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
  """(mean, W) with (x - mean) @ W white on the train rows (ZCA; eps keeps rank-deficient
  covariances finite)."""
  x = np.asarray(train, np.float64)
  mean = x.mean(axis=0)
  cov = np.cov(x - mean, rowvar=False, bias=True).reshape(x.shape[1], x.shape[1])
  s, u = np.linalg.eigh(cov)
  s = np.maximum(s, 0) + rel_eps * max(s.mean(), 1e-12)
  return mean.astype(np.float32), ((u / np.sqrt(s)) @ u.T).astype(np.float32)


def finalise(config, raw_by_split: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Unit-norm features per split; random projections are whitened on train statistics first."""
  if check_kind(config) == "random_projection":
    mean, w = whitening(raw_by_split["train"])
    raw_by_split = {k: (v - mean) @ w for k, v in raw_by_split.items()}
  return {k: unit_normalise(v) for k, v in raw_by_split.items()}


def _paths_beside(npy_path: str) -> list[str] | None:
  txt = os.path.splitext(npy_path)[0] + ".txt"
  if not os.path.isfile(txt):
    return None
  with open(txt, "r", encoding="utf-8") as f:
    # normalised like the filelist's own paths (./a and a are one image)
    return [posixpath.normpath(line.split()[0]) for line in f if line.strip()]


def load_file(config, input_paths: np.ndarray, split_rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Features per split from config.data.features.path, checked against the filelist.

  `input_paths`: the input filelist's paths in file order; `split_rows[s]`: row positions of split
  s in that list (in order). Cheap: called before any image is decoded.
  """
  path = config.data.features.path
  if not path or not os.path.isfile(path):
    raise UserError(f"config.data.features.path={path!r} is not a file; give a .npy [N, dim] of "
                    "features aligned with the filelist, or use --config.data.features.kind=random_projection")
  try:
    feats = np.load(path, mmap_mode="r")
  except (OSError, ValueError) as e:
    raise UserError(f"features file {path!r} cannot be read as .npy ({e})") from None
  if feats.ndim != 2:
    raise UserError(f"features file {path!r} has shape {feats.shape}; expected [N, dim]")
  n_all, n_train = len(input_paths), len(split_rows["train"])
  if len(feats) == n_all:
    expected, rows_of = [str(p) for p in input_paths], dict(split_rows)
  elif len(feats) == n_train:
    expected = [str(p) for p in input_paths[split_rows["train"]]]
    rows_of = {"train": np.arange(n_train)}
  else:
    raise UserError(f"features file {path!r} has {len(feats)} rows but the filelist has {n_all} "
                    f"lines ({n_train} in the train split): features are misaligned with the "
                    "filelist; recompute them for this filelist, one row per line in its order")
  listed = _paths_beside(path)
  if listed is not None:
    txt = os.path.splitext(path)[0] + ".txt"
    if len(listed) != len(expected):
      raise UserError(f"{txt} lists {len(listed)} paths but {path!r} has {len(feats)} rows; "
                      "the features are misaligned with their path list")
    for i, (a, b) in enumerate(zip(listed, expected)):
      if a != b:
        raise UserError(f"{txt}:{i + 1}: features row {i} is for {a!r} but the filelist has {b!r} "
                        "there: features are in a different order than the filelist; recompute "
                        "them in filelist order")
  dim = feats.shape[1]
  if dim != config.data.features.dim:
    raise UserError(f"features file {path!r} has {dim}-d rows but config.data.features.dim="
                    f"{config.data.features.dim}; set --config.data.features.dim={dim}")
  out = {}
  for split, rows in split_rows.items():
    if split in rows_of:
      out[split] = unit_normalise(np.asarray(feats[rows_of[split]], np.float32))
    else:
      out[split] = np.zeros((len(rows), dim), np.float32)  # the null condition
  bad = [s for s, v in out.items() if not np.all(np.isfinite(v))]
  if bad:
    raise UserError(f"features file {path!r} holds non-finite values ({bad[0]} rows)")
  return out

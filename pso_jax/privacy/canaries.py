"""Canaries: exact and near copies of training images planted into an audited set.

A sound audit flags every canary and names the patient it came from. Near copies cover what a
memorising generator plausibly emits: added noise, a small shift, a contrast change.
"""

import dataclasses

import numpy as np

from pso_jax.errors import UserError

KINDS = ("exact", "noise", "shift", "contrast")


@dataclasses.dataclass(frozen=True)
class Canaries:
  position: np.ndarray      # [n] row of each canary in the returned audited set
  train_index: np.ndarray   # [n] training image it copies
  patient: np.ndarray       # [n] that image's patient id (str)
  kind: np.ndarray          # [n] one of KINDS

  def to_dict(self) -> dict:
    return {k: np.asarray(v).tolist() for k, v in dataclasses.asdict(self).items()}


def near_copy(image: np.ndarray, kind: str, rng: np.random.Generator, *, noise: float,
              shift: int, contrast: float) -> np.ndarray:
  """uint8 [H, W, C] -> a perturbed uint8 copy."""
  x = image.astype(np.float32)
  if kind == "noise":
    x = x + rng.normal(0.0, noise, x.shape)
  elif kind == "shift":
    dy, dx = rng.choice([-shift, shift], size=2)
    x = np.roll(x, (int(dy), int(dx)), axis=(0, 1))
  elif kind == "contrast":
    x = (x - x.mean()) * contrast + x.mean()
  elif kind != "exact":
    raise ValueError(f"unknown canary kind {kind!r}; use one of {KINDS}")
  return np.clip(np.rint(x), 0, 255).astype(np.uint8)


# near copies of a leaking generator (audit_power): a 1-2 px shift, noise, a contrast change, or a
# blend with another training image
LEAK_KINDS = ("shift", "noise", "contrast", "blend")


def leaking_copies(train_images: np.ndarray, n: int, rng: np.random.Generator, *, noise: float,
                   contrast: float, blend: float = 0.3):
  """n near copies of distinct random training images, the LEAK_KINDS in rotation.
  Returns (copies uint8 [n, ...], the training image each one copies)."""
  if n > len(train_images):
    raise UserError(f"{n} near copies need as many training images, there are {len(train_images)}")
  src = rng.choice(len(train_images), n, replace=False)
  copies = []
  for i, s in enumerate(src):
    kind = LEAK_KINDS[i % len(LEAK_KINDS)]
    if kind == "blend":
      other = train_images[rng.integers(len(train_images))].astype(np.float32)
      mixed = (1 - blend) * train_images[s].astype(np.float32) + blend * other
      copies.append(np.clip(np.rint(mixed), 0, 255).astype(np.uint8))
    else:
      copies.append(near_copy(train_images[s], kind, rng, noise=noise,
                              shift=int(rng.integers(1, 3)), contrast=contrast))
  shape = (0,) + train_images.shape[1:]
  return (np.stack(copies) if copies else np.zeros(shape, np.uint8)), src


def plant(audited: np.ndarray, train_images: np.ndarray, train_patients, n: int, seed: int, *,
          noise: float, shift: int, contrast: float):
  """Inserts n canaries (kinds in rotation, distinct training images) at random rows.

  Returns (images [len(audited) + n, ...], Canaries).
  """
  train_patients = np.asarray(train_patients)
  if n <= 0:
    return audited, Canaries(*(np.zeros(0, t) for t in (np.int64, np.int64, str, str)))
  if n > len(train_images):
    raise UserError(f"config.audit.canaries={n} exceeds the {len(train_images)} training images")
  if audited.shape[1:] != train_images.shape[1:]:
    raise UserError(f"audited images {audited.shape[1:]} and training images "
                    f"{train_images.shape[1:]} differ in shape; canaries need the same shape")
  rng = np.random.default_rng(seed)
  src = rng.choice(len(train_images), n, replace=False)
  kinds = np.array([KINDS[i % len(KINDS)] for i in range(n)])
  copies = np.stack([near_copy(train_images[s], k, rng, noise=noise, shift=shift,
                               contrast=contrast) for s, k in zip(src, kinds)])
  total = len(audited) + n
  position = np.sort(rng.choice(total, n, replace=False))
  is_canary = np.zeros(total, bool)
  is_canary[position] = True
  if isinstance(audited, np.ndarray):
    out = np.empty((total,) + audited.shape[1:], np.uint8)
    out[is_canary] = copies
    out[~is_canary] = audited
  else:  # a lazy column (a streamed release): the copies join it, nothing of it is read
    from pso_jax.data import dataset
    out = dataset.MergedColumn(audited, copies, is_canary)
  return out, Canaries(position=position, train_index=src, patient=train_patients[src], kind=kinds)

"""Non-leaking augmentation for training the diffusion model on few images (EDM's augment pipe).

Each training image is, independently with probability `p` per transform, mirrored left-right and
moved by whole pixels (up to `max_shift`, the border reflected in). The network is told what was
done through an augmentation label [flip, dy / max_shift, dx / max_shift] (zeros: untouched), so
it learns augmented images as a separate condition; sampling asks for the zero label, and the
released images are not mirrored or shifted. On a small training set this makes the network see
more distinct inputs than there are images, which slows memorisation (Karras et al. 2020, 2022).
"""

import jax
import jax.numpy as jnp

from pso_jax.models.presets import AUGMENT_LABEL_DIM
from pso_jax.training.augment import shifted_windows


def max_shift(section, side: int) -> int:
  """The largest translation in model-input pixels: `augment_shift` of the side, at least 1."""
  return max(1, int(round(float(section.augment_shift) * side)))


def augment_one(x: jax.Array, key: jax.Array, p: float, shift: int):
  """(augmented x [H,W,C], label [3]) for one image; every draw comes from `key`."""
  k_flip_on, k_shift_on, k_shift = jax.random.split(key, 3)
  flip = jax.random.bernoulli(k_flip_on, p)
  moved = jax.random.bernoulli(k_shift_on, p)
  offset = jax.random.randint(k_shift, (2,), 0, 2 * shift + 1) * moved + shift * (1 - moved)
  x = jnp.where(flip, x[:, ::-1, :], x)
  # offset o cuts rows o..o+h-1 of the reflect-padded image: content moves by shift - o pixels
  x = shifted_windows(x[None], shift, "reflect", offset[None, None])[0, 0]
  moved_by = (shift - offset).astype(jnp.float32) / shift
  label = jnp.concatenate([flip.astype(jnp.float32)[None], moved_by])
  assert label.shape == (AUGMENT_LABEL_DIM,)
  return x, label

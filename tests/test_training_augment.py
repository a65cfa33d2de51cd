"""The re-id training augmentation's whole-pixel shifts: exact np.roll / edge-padded shifts, one
per image, every offset drawn, a pure function of the key, off at 0."""

import jax
import numpy as np
import pytest

import tolerances as T
from pso_jax.training import augment


def _offsets(x, y, max_shift, shifted):
  """For each image, the (dy, dx) with shifted(x[i], dy, dx) == y[i] (exactly one must match)."""
  found = []
  for a, b in zip(x, y):
    hits = [(dy, dx) for dy in range(-max_shift, max_shift + 1)
            for dx in range(-max_shift, max_shift + 1) if np.array_equal(shifted(a, dy, dx), b)]
    assert len(hits) == 1, hits
    found.append(hits[0])
  return found


def _edge_shift(a, dy, dx):
  h, w = a.shape[:2]
  rows = np.clip(np.arange(h) - dy, 0, h - 1)
  cols = np.clip(np.arange(w) - dx, 0, w - 1)
  return a[rows][:, cols]


@pytest.mark.parametrize("mode, reference", [
    ("wrap", lambda a, dy, dx: np.roll(a, (dy, dx), axis=(0, 1))),
    ("edge", _edge_shift)])
def test_random_translate_is_a_whole_pixel_shift(mode, reference):
  x = np.asarray(jax.random.uniform(jax.random.key(0), (200, 7, 9, 2)))
  shift = jax.jit(augment.random_translate, static_argnums=(2, 3))
  y = np.asarray(shift(x, jax.random.key(1), 2, mode))
  offsets = _offsets(x, y, 2, reference)
  # 25 offsets, drawn independently per image: 200 draws see them all (miss chance < 1e-2)
  assert len(set(offsets)) == 25
  np.testing.assert_array_equal(y, np.asarray(shift(x, jax.random.key(1), 2, mode)))
  assert not np.array_equal(y, np.asarray(shift(x, jax.random.key(2), 2, mode)))


def test_random_translate_off_and_bad_mode():
  x = np.asarray(jax.random.uniform(jax.random.key(0), (3, 5, 5, 1)))
  np.testing.assert_array_equal(augment.random_translate(x, jax.random.key(1), 0), x)
  with pytest.raises(ValueError, match="translate mode"):
    augment.random_translate(x, jax.random.key(1), 1, "reflect")


def test_shift_averaged_embedding():
  """embed_images(shifts=1): the normalised mean of the plain embeddings of the 9 edge-filled
  whole-pixel shifts of each image."""
  from pso_jax.privacy import reid
  from pso_jax.models import cnn
  spec = cnn.CnnSpec("small_resnet", "embed", 8, image_size=8, channels=1, width=4, blocks=(1, 1))
  model = cnn.build_cnn(spec)
  variables = cnn.init_cnn(spec, jax.random.key(0))
  x = np.random.default_rng(0).integers(0, 256, (5, 12, 12, 1), np.uint8)
  got = np.asarray(reid.embed_images(model, variables, x, spec, shifts=1))
  plain = lambda im: np.asarray(reid.embed_images(model, variables, im, spec))
  manual = sum(plain(np.stack([_edge_shift(a, dy, dx) for a in x]))
               for dy in (-1, 0, 1) for dx in (-1, 0, 1))
  manual /= np.linalg.norm(manual, axis=1, keepdims=True)
  T.assert_close(got, manual, T.network_rtol(variables))  # 9 shifts in one batch vs one by one
  np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)
  stack = np.asarray(reid.shift_stack(x, 2))
  assert stack.shape == (25, 5, 12, 12, 1)
  np.testing.assert_array_equal(stack[12], x)  # the middle of the stack is the unshifted image

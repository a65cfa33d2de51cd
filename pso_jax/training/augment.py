"""In-graph image augmentation for the supervised CNNs, driven by an explicit PRNG key.

Images are float32 NHWC in [0, 1]; every sample gets its own crop, flip and intensity change from
`split(key, batch)`, so a step's augmentation is a pure function of its key.
"""

import math

import jax
import jax.numpy as jnp


def _crop_one(image, key, out_size: int, scale, ratio):
  """torchvision-style RandomResizedCrop of one HWC image (one draw, clipped to the image)."""
  h, w = image.shape[0], image.shape[1]
  k_area, k_ratio, k_y, k_x = jax.random.split(key, 4)
  area = jax.random.uniform(k_area, (), minval=scale[0], maxval=scale[1])
  log_r = jax.random.uniform(k_ratio, (), minval=math.log(ratio[0]), maxval=math.log(ratio[1]))
  aspect = jnp.exp(log_r)  # width / height of the crop
  crop_w = jnp.clip(jnp.sqrt(area * aspect), 0.0, 1.0) * w
  crop_h = jnp.clip(jnp.sqrt(area / aspect), 0.0, 1.0) * h
  y0 = jax.random.uniform(k_y, ()) * (h - crop_h)
  x0 = jax.random.uniform(k_x, ()) * (w - crop_w)
  scale_yx = jnp.stack([out_size / crop_h, out_size / crop_w])
  # output = input * scale + translation, so the crop's corner lands at 0
  translation = -jnp.stack([y0, x0]) * scale_yx
  return jax.image.scale_and_translate(image, (out_size, out_size, image.shape[2]), (0, 1),
                                       scale_yx, translation, method="linear", antialias=True)


def random_resized_crop(x, key, out_size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
  keys = jax.random.split(key, x.shape[0])
  return jax.vmap(lambda im, k: _crop_one(im, k, out_size, scale, ratio))(x, keys)


TRANSLATE_MODES = ("edge", "wrap", "both")


def shifted_windows(x, shift: int, mode: str, offsets):
  """x [N, H, W, C] padded by `shift` pixels on each side (jnp.pad `mode`) and cut back to H x W
  at `offsets` [K, N, 2]: (oy, ox) in [0, 2 shift] per window and image. Returns [K, N, H, W, C]
  with out[k, i, y, x] = padded[i, y + oy, x + ox], i.e. image i moved by whole pixels
  (shift - oy, shift - ox), the gap filled as `mode` pads."""
  n, h, w, c = x.shape
  padded = jnp.pad(x, ((0, 0), (shift, shift), (shift, shift), (0, 0)), mode=mode)
  cut = lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, c))
  return jax.vmap(jax.vmap(cut), in_axes=(None, 0))(padded, offsets)


def random_translate(x, key, max_shift: int, mode: str = "edge"):
  """Shifts each image by its own integer (dy, dx), uniform in [-max_shift, max_shift]^2 pixels.

  Pad by max_shift and cut the image back out at the shifted offset (`shifted_windows`), so the
  content moves by exactly whole pixels (no resampling blur). What fills the gap: "edge" repeats
  the border row/column, "wrap" brings in the opposite border (np.roll), "both" picks one of the
  two per image. Shifts too small to matter for a pose change still move every pixel, which a
  downsampled, strided CNN otherwise sees as a different image (aliasing).
  """
  if max_shift <= 0:
    return x
  if mode not in TRANSLATE_MODES:
    raise ValueError(f"translate mode must be one of {TRANSLATE_MODES}, got {mode!r}")
  k_offset, k_mode = jax.random.split(key)
  n, s = x.shape[0], int(max_shift)
  # offset o cuts rows o..o+h-1 of the padded image: output[y] = input[y + o - s], a shift by s - o
  offsets = jax.random.randint(k_offset, (n, 2), 0, 2 * s + 1)
  window = lambda m: shifted_windows(x, s, m, offsets[None])[0]
  if mode == "both":
    wrap = jax.random.bernoulli(k_mode, 0.5, (n, 1, 1, 1))
    return jnp.where(wrap, window("wrap"), window("edge"))
  return window(mode)


def random_flip(x, key):
  """Horizontal flip of each image with probability 1/2."""
  flip = jax.random.bernoulli(key, 0.5, (x.shape[0], 1, 1, 1))
  return jnp.where(flip, x[:, :, ::-1, :], x)


def random_intensity(x, key, amount: float):
  """Per-image contrast and brightness jitter of relative size `amount` (exposure changes)."""
  k_c, k_b = jax.random.split(key)
  contrast = 1.0 + jax.random.uniform(k_c, (x.shape[0], 1, 1, 1), minval=-amount, maxval=amount)
  bright = jax.random.uniform(k_b, (x.shape[0], 1, 1, 1), minval=-amount, maxval=amount) / 2
  mean = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
  return jnp.clip((x - mean) * contrast + mean + bright, 0.0, 1.0)


def ten_crop(x, crop: int):
  """The 4 corner + centre crops of x and of its mirror image: [10, N, crop, crop, C]."""
  h, w = x.shape[1], x.shape[2]
  offsets = [(0, 0), (0, w - crop), (h - crop, 0), (h - crop, w - crop),
             ((h - crop) // 2, (w - crop) // 2)]
  crops = [x[:, y:y + crop, z:z + crop] for y, z in offsets]
  return jnp.stack(crops + [c[:, :, ::-1] for c in crops])

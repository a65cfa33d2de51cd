"""Magnitude-preserving (MP) layers of EDM2 (Karras et al. 2024), NHWC activations, HWIO kernels.

Every layer keeps unit-variance inputs at unit variance. Learned MP weights are stored as a param
named `mp_weight`; `project_mp_weights` renormalises them after each optimizer update (forced
weight normalisation) while `MPConv` also normalises inside the graph, so the gradient is that of a
weight-normalised layer and the stored weights never grow.
"""

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

MP_WEIGHT = "mp_weight"
CONSTANTS = "constants"  # collection of fixed, never-trained values (Fourier features)


def normalize(x: jax.Array, axis: Sequence[int], eps: float = 1e-4) -> jax.Array:
  """Scales `x` so that each slice over `axis` has RMS 1 (norm in fp32, result in x.dtype)."""
  axis = tuple(a % x.ndim for a in axis)
  size = math.prod(x.shape[a] for a in axis)
  norm = jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=axis, keepdims=True))
  return x / (eps + norm / math.sqrt(size)).astype(x.dtype)


def fan_in_axes(w: jax.Array) -> tuple[int, ...]:
  """All axes but the output one (last, for HWIO kernels and [in, out] matrices)."""
  return tuple(range(w.ndim - 1))


@jax.custom_jvp
def mp_silu(x: jax.Array) -> jax.Array:
  """silu(x) / 0.596, the standard deviation of silu(z) for z ~ N(0, 1).

  Written as one expression with exp and a divide (the derivative is written out below, finite
  for any x): XLA:CPU then computes it once, where `x * sigmoid(x)` was recomputed inside each
  transpose that feeds a kernel-gradient convolution, a loop ~6x slower than a plain transpose
  (about a tenth of the tiny preset's train step)."""
  return x / ((1 + jnp.exp(-x)) * 0.596)


@mp_silu.defjvp
def _mp_silu_jvp(primals, tangents):
  (x,), (dx,) = primals, tangents
  s = jax.nn.sigmoid(x)
  return mp_silu(x), dx * (s * (1 + x * (1 - s)) / 0.596)


def mp_sum(a: jax.Array, b: jax.Array, t: float = 0.5) -> jax.Array:
  """Interpolation of a and b that keeps unit variance for independent unit-variance inputs."""
  return (a + t * (b - a)) / math.sqrt((1 - t) ** 2 + t ** 2)


def mp_cat(a: jax.Array, b: jax.Array, t: float = 0.5, axis: int = -1) -> jax.Array:
  """Concatenation weighting a by (1-t) and b by t, with unit total variance."""
  na, nb = a.shape[axis], b.shape[axis]
  c = math.sqrt((na + nb) / ((1 - t) ** 2 + t ** 2))
  wa = c / math.sqrt(na) * (1 - t)
  wb = c / math.sqrt(nb) * t
  return jnp.concatenate([wa * a, wb * b], axis=axis)


def _path_name(entry) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def is_mp_weight(path) -> bool:
  """True for the path (tree_util key path or tuple of names) of a stored MP weight."""
  return len(path) > 0 and _path_name(path[-1]) == MP_WEIGHT


def project_mp_weights(params):
  """Forced weight normalisation: every MP weight row (one per output unit) gets RMS 1.

  Pure and jittable; other leaves pass through unchanged. Idempotent up to the eps of `normalize`.
  """
  def project(path, w):
    if not is_mp_weight(path):
      return w
    return normalize(w, fan_in_axes(w)).astype(w.dtype)
  return jax.tree_util.tree_map_with_path(project, params)


class MPFourier(nn.Module):
  """cos(x * freqs + phases) * sqrt(2), with fixed random freqs and phases (in `constants`)."""
  num_channels: int
  bandwidth: float = 1.0

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    n = self.num_channels
    freqs = self.variable(CONSTANTS, "freqs", lambda: 2 * math.pi * self.bandwidth *
                          jax.random.normal(self.make_rng("params"), (n,), jnp.float32))
    phases = self.variable(CONSTANTS, "phases", lambda: 2 * math.pi *
                           jax.random.uniform(self.make_rng("params"), (n,), jnp.float32))
    y = x.astype(jnp.float32)[:, None] * freqs.value[None, :] + phases.value[None, :]
    return jnp.cos(y) * math.sqrt(2)


class MPConv(nn.Module):
  """Bias-free conv (kernel (k, k), "same" padding) or linear layer (kernel ()) with MP weights.

  The weight is normalised in fp32 inside the graph and scaled by gain / sqrt(fan_in), then cast
  to the activation dtype. `gain` may be a traced scalar (EDM2's emb_gain / out_gain).
  """
  features: int
  kernel_size: tuple[int, ...] = ()

  @nn.compact
  def __call__(self, x: jax.Array, gain=1.0) -> jax.Array:
    shape = tuple(self.kernel_size) + (x.shape[-1], self.features)
    w = self.param(MP_WEIGHT, nn.initializers.normal(stddev=1.0), shape, jnp.float32)
    w = normalize(w.astype(jnp.float32), fan_in_axes(w))
    w = (w * (gain / math.sqrt(math.prod(shape[:-1])))).astype(x.dtype)
    if not self.kernel_size:
      return x @ w
    return jax.lax.conv_general_dilated(
        x, w, window_strides=(1,) * len(self.kernel_size), padding="SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"))

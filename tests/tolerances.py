"""What a test may assume when it compares floats that two programs computed.

There are two cases, and every comparison of the suite is one of them:

* The same program on the same shapes (the same jitted function, mesh, batch layout and CPU
  instruction set, e.g. a rerun or a resumed run) is deterministic: the results are
  bit-identical. Use `assert_identical`.
* A different program computes the same mathematics: another device count, batch size or padding,
  FSDP, gradient accumulation, blocked vs whole, jit vs eager, XLA vs numpy, or the same code on a
  CPU with other vector instructions (AVX-512, AVX2, SSE4.2: XLA picks the vector width, and with
  it the order in which sums are added). Every rounding may then differ, and the results agree only
  up to float32 rounding grown by the depth of the computation: `reduction_rtol` for a sum of n
  terms, `sequential_rtol` for a chain of dependent steps (sampler steps, train steps, layers).
  Compare with `assert_close` (element-wise, relative to the array's scale) or, for optimiser
  states, `assert_close_normwise`.
"""

import math

import jax
import numpy as np

EPS32 = float(np.finfo(np.float32).eps)  # 2**-23: float32's spacing relative to the value


def reduction_rtol(terms: int, sigmas: float = 4.0) -> float:
  """Relative difference between two float32 sums of the same `terms` values added in different
  orders. Each addition rounds by at most eps/2 of its partial sum and the roundings are
  independent, so their total grows like a random walk, ~eps * sqrt(terms) of the sum of the
  magnitudes; `sigmas` of those cover the largest of many compared elements."""
  return sigmas * EPS32 * math.sqrt(max(terms, 1))


def sequential_rtol(steps: int, per_step: float) -> float:
  """Relative difference after `steps` dependent steps that each add `per_step` (their inputs
  already differ, and they round again): the differences add up, growing linearly. Valid when a
  step does not amplify its input's error, e.g. the sampler's ODE, which contracts towards the
  data, or a normalised network."""
  return steps * per_step


def training_rtol(steps: int, terms: int) -> float:
  """Losses and weights of two layouts of the same training (devices, FSDP, micro-batches,
  processes): every weight's gradient is a sum of `terms` (batch x pixels) added in a
  layout-dependent order, and each step adds that rounding to what the earlier steps left. Compare
  losses with `assert_close`, weights with `assert_close_normwise`."""
  return sequential_rtol(steps, reduction_rtol(terms))


def network_rtol(params) -> float:
  """Outputs of one network run by two programs (batch layout, devices, jit vs eager, blocks):
  each layer (every weight of 2 or more dimensions; arrays or shapes) rounds its fan-in sum in
  its own order, and the layers chain."""
  kernels = [w.shape for w in jax.tree.leaves(params) if len(w.shape) >= 2]
  fan_in = max(math.prod(shape[:-1]) for shape in kernels)
  return sequential_rtol(len(kernels), reduction_rtol(fan_in))


def cnn_rtol(section, channels: int) -> float:
  """`network_rtol` of the CNN that config.reid or config.classifier (`section`) builds."""
  from pso_jax.models import cnn
  spec = cnn.spec_from_config(section, head="logits", out_dim=1, channels=channels)
  return network_rtol(jax.eval_shape(lambda: cnn.init_cnn(spec, jax.random.key(0))))


def _scale(desired) -> float:
  return float(np.max(np.abs(desired))) if np.size(desired) else 0.0


def _pairs(actual, desired):
  """(actual leaf, desired leaf) over `desired`'s tree; a list of numbers against one array is one
  pair."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(desired)
  return [(jax.tree_util.keystr(path), a, d)
          for (path, d), a in zip(leaves, treedef.flatten_up_to(actual), strict=True)]


def assert_identical(actual, desired, err_msg: str = ""):
  """The same program on the same shapes: every bit equal (arrays or pytrees of arrays)."""
  for path, a, d in _pairs(actual, desired):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(d), err_msg=err_msg + path)


def assert_close(actual, desired, rtol: float, err_msg: str = ""):
  """Every element within `rtol` times the largest |desired| of its array (each leaf of a pytree
  on its own). Rounding error scales with the magnitudes that went into an element, not with the
  element itself, which may be a cancelled near-zero; so the bound is relative to the array."""
  for path, a, d in _pairs(actual, desired):
    a, d = np.asarray(a, np.float64), np.asarray(d, np.float64)
    np.testing.assert_allclose(a, d, rtol=0, atol=rtol * _scale(d), err_msg=err_msg + path)


def assert_close_normwise(actual, desired, rtol: float, err_msg: str = ""):
  """||actual - desired|| <= rtol ||desired|| for each leaf. For weights after Adam steps, where
  one element may legitimately differ by much more than rounding: Adam divides each gradient by its
  own running RMS, so a weight whose gradient nearly cancels carries that gradient's large
  relative rounding error into its update. Such weights are rare, so the leaf as a whole still
  agrees to rounding."""
  for path, a, d in _pairs(actual, desired):
    a, d = np.asarray(a, np.float64), np.asarray(d, np.float64)
    error, norm = np.linalg.norm(a - d), np.linalg.norm(d)
    assert error <= rtol * norm, (
        f"{err_msg}{path}: norm-wise relative difference "
        f"{error / max(norm, 1e-300):.3g} > {rtol:.3g} (max element difference "
        f"{np.max(np.abs(a - d)):.3g})")

"""Analytic forward FLOPs of the denoiser (multiply-adds counted as 2), EDM2's convention.

Counts every MPConv as a dense layer (all kernel taps, padding included) plus the two attention
matmuls. XLA's `cost_analysis()` counts a little less (it skips taps that fall on the zero padding)
and adds element-wise work, so the two differ by a few percent.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from pso_jax.models.mp_layers import MPConv
from pso_jax.models.unet import Block


def forward_flops(model, variables, input_shape, batch: int = 1) -> int:
  """FLOPs of one `model.apply` on `batch` inputs of `input_shape` (H, W, C); shapes only."""
  macs = []

  def count(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    module = context.module
    if isinstance(module, MPConv) and context.method_name == "__call__":
      cin = args[0].shape[-1]
      macs.append(math.prod(out.shape[:-1]) * math.prod(module.kernel_size) * cin * out.shape[-1])
    elif isinstance(module, Block) and context.method_name == "_attention":
      b, h, w, c = args[0].shape
      macs.append(2 * b * (h * w) ** 2 * c)  # q.k logits and weights.v
    return out

  x = jax.ShapeDtypeStruct((batch,) + tuple(input_shape), jnp.float32)
  sigma = jax.ShapeDtypeStruct((batch,), jnp.float32)
  cond = jax.ShapeDtypeStruct((batch, model.cond_dim), jnp.float32) if model.cond_dim else None
  with nn.intercept_methods(count):
    jax.eval_shape(lambda v, x, s, c: model.apply(v, x, s, c), variables, x, sigma, cond)
  return 2 * sum(macs)

"""The machine's matmul rate, measured in the same run as every benchmark's figure."""

import time

import jax
import jax.numpy as jnp


def matmul_gflops(n: int = 2048, dtype=jnp.float32, repeats: int = 5) -> float:
  """Best-of-`repeats` GFLOP/s of an n x n x n jitted matmul on the default device."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
  f(a, b).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    f(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n ** 3 / best / 1e9

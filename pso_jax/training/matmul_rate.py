"""The machine's matmul rate: the peak a step's FLOP rate is compared with, in training metrics and
in every benchmark (measured in the same run as the figure it divides)."""

import time

import jax
import jax.numpy as jnp


def matmul_gflops(n: int = 2048, dtype=jnp.float32, repeats: int = 5,
                  compiler_options=None) -> float:
  """Best-of-`repeats` GFLOP/s of an n x n x n jitted matmul on the default device, compiled
  with XLA `compiler_options` (None: XLA's defaults)."""
  return gemm_gflops(n, n, n, dtype, repeats, compiler_options)


def gemm_gflops(m: int, n: int, k: int, dtype=jnp.float32, repeats: int = 5,
                compiler_options=None, *, transpose_b: bool = False) -> float:
  """Best-of-`repeats` GFLOP/s of a jitted [m, k] x [k, n] GEMM with fp32 accumulation;
  transpose_b: the second operand is stored [n, k] (the similarity kernel's q r^T)."""
  a = jax.random.normal(jax.random.key(0), (m, k), dtype)
  b = jax.random.normal(jax.random.key(1), (n, k) if transpose_b else (k, n), dtype)
  contract = (((1,), (1 if transpose_b else 0,)), ((), ()))
  f = jax.jit(lambda a, b: jax.lax.dot_general(a, b, contract,
                                               preferred_element_type=jnp.float32)) \
      .lower(a, b).compile(compiler_options=compiler_options)
  f(a, b).block_until_ready()
  return 2 * m * n * k / best_seconds(lambda: f(a, b).block_until_ready(), repeats) / 1e9


def best_seconds(fn, repeats: int) -> float:
  """The shortest of `repeats` timed calls of `fn` (which must wait for its own result)."""
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t)
  return best


def reference_gflops(n: int = 2048, repeats: int = 5, compiler_options=None) -> float:
  """The matmul reference for a program compiled with `compiler_options`: the faster of XLA's
  default matmul and one compiled with those options, so a ratio never flatters the program by
  comparing it with a matmul its own options slowed down (on CPU the train step and the sampler
  turn YNNPACK off)."""
  rate = matmul_gflops(n, repeats=repeats)
  if compiler_options:
    rate = max(rate, matmul_gflops(n, repeats=repeats, compiler_options=compiler_options))
  return rate

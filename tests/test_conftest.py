"""The suite's own set-up (tests/conftest.py): freed memory leaves the worker."""

import gc

import jax
import jax.numpy as jnp
import psutil
import pytest

import conftest


@pytest.mark.skipif(conftest._LIBC is None, reason="glibc's allocator only")
def test_freed_xla_buffers_leave_the_worker():
  """Blocks of 1 MiB and more get their own mappings, so a test's freed buffers are given back at
  once; glibc would otherwise serve them from its heap after the first large frees, and keep them
  there for the rest of the worker's life."""
  process = psutil.Process()
  for _ in range(2):  # the second round is where glibc kept them
    buffers = jax.block_until_ready([jnp.full((1 << 20,), k, jnp.float32) for k in range(64)])
    held = process.memory_info().rss  # 64 x 4 MiB
    del buffers
    gc.collect()
    assert held - process.memory_info().rss > 200 * 2 ** 20

"""The op profile's FLOP counts match XLA's cost analysis, its interval union matches a brute
force, and a traced program's convolution time is found."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pso_jax.bench import op_profile


def _program():
  def f(x, w, m):
    y = jax.lax.conv_general_dilated(x, w, (1, 1), "VALID",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.tanh(y).reshape(y.shape[0], -1) @ m
  x = jnp.ones((8, 18, 18, 16)), jnp.ones((3, 3, 16, 24)), jnp.ones((16 * 16 * 24, 40))
  return jax.jit(jax.grad(lambda *a: f(*a).sum(), argnums=(0, 1, 2))).lower(*x).compile(), x


def test_flops_match_cost_analysis():
  compiled, _ = _program()
  ops = op_profile.classify(compiled.as_text())
  conv = sum(f for k, f in ops.values() if k == "convolution")
  dot = sum(f for k, f in ops.values() if k == "dot")
  # by hand: the forward conv and the kernel gradient each 2 x 8x16x16x24 outputs x 3x3x16 taps;
  # the input gradient is a conv padded by 2 (8x18x18x16 outputs x 3x3x24 taps, padding counted)
  fwd = 2.0 * 8 * 16 * 16 * 24 * 3 * 3 * 16
  assert conv == pytest.approx(2 * fwd + 2.0 * 8 * 18 * 18 * 16 * 3 * 3 * 24)
  assert dot == pytest.approx(2 * 2.0 * 8 * 16 * 16 * 24 * 40)  # the two gradient matmuls
  # XLA's cost analysis counts only the taps that meet the input (3 x fwd) and elementwise ops
  analysis = compiled.cost_analysis()
  analysis = analysis[0] if isinstance(analysis, list) else analysis
  assert 3 * fwd + dot <= analysis["flops"] <= 1.02 * (3 * fwd + dot)


def test_union_seconds_against_brute_force():
  rng = np.random.default_rng(0)
  starts = rng.uniform(0, 10, 50)
  intervals = [(s, s + d) for s, d in zip(starts, rng.uniform(0, 1, 50))]
  grid = np.linspace(0, 12, 120001)
  covered = np.zeros_like(grid, bool)
  for a, b in intervals:
    covered |= (grid >= a) & (grid < b)
  assert op_profile.union_seconds(intervals) == pytest.approx(covered.mean() * 12, abs=2e-3)
  assert op_profile.union_seconds([]) == 0.0


def test_breakdown_of_a_traced_program():
  compiled, args = _program()
  run = lambda: jax.block_until_ready(compiled(*args))
  run()
  b = op_profile.breakdown(compiled, run, repeats=2)
  kinds = b["kinds"]
  assert set(kinds) == set(op_profile.KINDS) and b["traced_ops"] > 0
  assert kinds["convolution"]["ops"] == 3 and kinds["convolution"]["seconds"] > 0
  assert kinds["dot"]["ops"] >= 1 and kinds["dot"]["gflops"] > 0
  assert all(0 <= r["share"] <= 1 for r in kinds.values())


def test_convolutions_rebuilt_alone_match_the_module():
  """Each convolution of the module is rebuilt with lax (its output shape is checked inside) and
  timed alone; their FLOPs are the module's."""
  compiled, _ = _program()
  text = compiled.as_text()
  alone = op_profile.time_convolutions(text, repeats=1)
  assert alone["convolutions"] == 3 and alone["shapes"] == 3 and alone["seconds"] > 0
  ops = op_profile.classify(text)
  assert alone["flops"] == sum(f for k, f in ops.values() if k == "convolution")


def test_train_bench_prints_the_breakdown(capsys):
  from pso_jax.bench import train as bench_train
  r = bench_train.main(["train", "--preset=tiny", "--batch=8", "--steps=1", "--matmul_n=256"])
  out = capsys.readouterr().out
  alone = r["breakdown"]["convolutions_alone"]
  assert alone["convolutions"] > 0 and alone["shapes"] <= alone["convolutions"]
  assert "run alone" in out and "at 80% of matmul the whole step may take" in out
  assert "compiled" not in r

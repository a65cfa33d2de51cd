"""The prepare-scaling bench's arithmetic and command lines (the bench itself runs prepare several
times over, so it never runs in the suite)."""

import pytest

from pso_jax.bench import prepare_scaling as ps


def test_speedup_rows_against_hand_arithmetic():
  rows = ps.speedup_rows({1: [100.0, 90.0], 2: [60.0, 50.0], 4: [40.0]}, images=900)
  assert [r["processes"] for r in rows] == [1, 2, 4]
  # best of the repeats: 90 s alone, 50 s over 2, 40 s over 4
  assert [r["seconds"] for r in rows] == [90.0, 50.0, 40.0]
  assert [r["images_per_s"] for r in rows] == pytest.approx([10.0, 18.0, 22.5])
  assert [r["speedup"] for r in rows] == pytest.approx([1.0, 1.8, 2.25])
  assert [r["efficiency"] for r in rows] == pytest.approx([1.0, 0.9, 0.5625])
  text = ps.format_rows(rows)
  assert "1.80x" in text and "(ok the 1.7x target)" in text
  assert "BELOW" in ps.format_rows(ps.speedup_rows({1: [10.0], 2: [6.0]}, 10))  # 1.67x


def test_one_command_per_process_with_its_id():
  one = ps.commands("scale", "/w", 1, ["--config.a=1"], 1234)
  assert len(one) == 1 and not any("distributed" in a for a in one[0])
  two = ps.commands("scale", "/w", 2, ["--config.a=1"], 1234)
  assert len(two) == 2
  for i, cmd in enumerate(two):
    assert "--mode=prepare" in cmd and "--workdir=/w" in cmd and "--config.a=1" in cmd
    assert "--config.distributed.coordinator_address=127.0.0.1:1234" in cmd
    assert "--config.distributed.num_processes=2" in cmd
    assert f"--config.distributed.process_id={i}" in cmd


def test_thread_env_pins_blas_openmp_and_xla():
  base = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2", "PATH": "/bin"}
  assert ps.thread_env(base, 0) is base
  env = ps.thread_env(base, 1)
  assert env["OMP_NUM_THREADS"] == env["OPENBLAS_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "1"
  assert env["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=2",
                                      "--xla_cpu_multi_thread_eigen=false"]
  assert base["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2"  # not modified

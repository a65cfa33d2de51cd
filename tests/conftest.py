"""Test set-up: 8 fake CPU devices for every test (meshes of 1 device take jax.devices()[:1]).

PSO_JAX_TEST_MAX_ISA=AVX2 (or SSE4_2) runs the suite as on a CPU without AVX-512: XLA then emits
only that instruction set, which changes vector widths and so the order of sums; the float
comparisons must hold either way (tests/tolerances.py). PSO_JAX_TEST_MEMORY_LOG=FILE.jsonl logs
every test's peak memory (tests/tools/peak_memory.py).
"""

import contextlib
import ctypes
import json
import os
import sys
import time

os.environ.setdefault("PSO_JAX_NO_PROGRESS", "1")
_MAX_ISA = os.environ.get("PSO_JAX_TEST_MAX_ISA")
os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS"),
                                                _MAX_ISA and f"--xla_cpu_max_isa={_MAX_ISA}",
                                                "--xla_force_host_platform_device_count=8"]))

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
# compiles are most of the suite's time; the same tiny programs recur across tests and workers
jax.config.update("jax_compilation_cache_dir", os.environ.get(
    "PSO_JAX_TEST_COMPILATION_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "pso_jax", "xla-tests")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()  # grain workers read absl flags

import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


def load_config(variant: str = "tiny"):
  import importlib.util
  spec = importlib.util.spec_from_file_location("cxr_config", os.path.join(ROOT, "configs", "cxr.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


@pytest.fixture
def tiny_config():
  return load_config("tiny")


def save_tiny_sd_vae(folder: str):
  """A diffusers AutoencoderKL of SD's layout at toy width (8 channels, 4 latent channels, its
  seeded init), saved to `folder` as prepare's `latent.vae_dir` expects. Returns the torch model."""
  import diffusers
  import torch
  torch.manual_seed(0)
  vae = diffusers.AutoencoderKL(
      block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
      up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4,
      latent_channels=4, sample_size=16)
  vae.save_pretrained(folder)
  return vae


@pytest.fixture(scope="session")
def reference_filelists():
  path = os.path.join(SHARED, "data", "reference_filelists")
  if not os.path.isdir(path):
    pytest.skip("../shared/data/reference_filelists is not beside this checkout")
  return path


TRAINED_STAGES = ("prepare", "train", "train_reid", "train_classifier")


@pytest.fixture(scope="session")
def tiny_trained_workdir(tmp_path_factory):
  """One tiny workdir through prepare/train/train_reid/train_classifier, built once per test run
  and shared by all xdist workers (file lock beside pytest's base temp). Read-only: tests that
  write into it copy it first (`clone_workdir`)."""
  import fcntl
  from pso_jax import stages, workdir as workdir_lib
  # xdist workers' base temps sit in one folder per test run; a plain run's base temp is its own
  # (its parent is shared by every run and would serve stale models built by older code)
  base = tmp_path_factory.getbasetemp()
  root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
  target = root / "tiny_trained"
  config = load_config("tiny")
  with open(root / "tiny_trained.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not (target / "READY").exists():
      workdir_lib.prepare_workdir(str(target), config)
      for mode in TRAINED_STAGES:
        stages.get_stage(mode)(config, str(target))
      (target / "READY").write_text("ok")
    fcntl.flock(lock, fcntl.LOCK_UN)
  return config, str(target)


def clone_workdir(src: str, dst) -> str:
  import shutil
  shutil.copytree(src, str(dst), ignore=shutil.ignore_patterns("READY"))
  return str(dst)



# ---------------------------------------------------------------- memory: `-n 2` fits 8 GB
# glibc keeps freed memory in its heaps (one arena per thread, and XLA runs many), so a worker's
# RSS only grew from test to test and the full-recipe test peaked at 10 GB. Blocks of 1 MiB and
# more get their own mapping, given back when freed (glibc would raise this threshold up to 32 MiB
# after the first large frees), and the heaps are trimmed after every test.
try:
  _LIBC = ctypes.CDLL("libc.so.6")
  _LIBC.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
except OSError:  # not glibc (macOS): nothing to tune
  _LIBC = None
_MEMORY_LOG = os.environ.get("PSO_JAX_TEST_MEMORY_LOG")
if _MEMORY_LOG:
  from tools import peak_memory
  _PEAK = peak_memory.TreePeak()


@contextlib.contextmanager
def _machine_share(config, exclusive: bool):
  """Under pytest-xdist a test marked `exclusive` (most of the memory) or `multiprocess` (its own
  processes, several GB together) runs while no other worker runs a test: every test holds a lock
  shared, such a test holds it alone. It first closes a gate that the others pass on their way in,
  so they queue behind it instead of overtaking it one test after another."""
  if not os.environ.get("PYTEST_XDIST_WORKER"):
    yield
    return
  import fcntl
  base = os.path.join(os.path.dirname(str(config.option.basetemp)), "machine_share")
  mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
  with open(base + ".gate", "a") as gate, open(base + ".lock", "a") as lock:
    fcntl.flock(gate, mode)
    fcntl.flock(lock, mode)
    if not exclusive:
      fcntl.flock(gate, fcntl.LOCK_UN)
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
  start = time.monotonic()
  exclusive = any(item.get_closest_marker(m) for m in ("exclusive", "multiprocess"))
  with _machine_share(item.config, exclusive):
    yield
  if _LIBC is not None:
    _LIBC.malloc_trim(0)
  if _MEMORY_LOG:  # one line per test: this worker's peak RSS, its subprocesses' included
    line = dict(test=item.nodeid, worker=os.environ.get("PYTEST_XDIST_WORKER", "main"),
                peak_mb=round(_PEAK.reset() / 2 ** 20),
                after_mb=round(peak_memory.tree_rss(_PEAK.root) / 2 ** 20),
                seconds=round(time.monotonic() - start, 1))
    with open(_MEMORY_LOG, "a") as f:
      f.write(json.dumps(line) + "\n")

"""Test set-up: 8 fake CPU devices for every test (meshes of 1 device take jax.devices()[:1])."""

import os
import sys

os.environ.setdefault("PSO_JAX_NO_PROGRESS", "1")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()

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

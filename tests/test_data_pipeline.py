"""grain loaders: static batches, exact resume, disjoint shards across 2 real JAX processes."""

import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT, load_config
from pso_jax.data import dataset, pipeline, prepare
from pso_jax.errors import UserError


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("prepared"))
  prepare.run(load_config("tiny"), path)
  return path


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def test_batches_static_and_resume_exactly(workdir):
  source = dataset.load_split(workdir, "train")
  loader = pipeline.make_loader(source, global_batch_size=16, seed=3)
  it = iter(loader)
  first = _take(it, 3)
  state = it.get_state()
  expected = _take(it, 12)  # crosses an epoch boundary (88 records, 5 batches per epoch)
  assert all(b["image"].shape == (16, 16, 16, 1) and b["labels"].shape == (16, 8) for b in expected)
  resumed = iter(pipeline.make_loader(dataset.load_split(workdir, "train"), global_batch_size=16, seed=3))
  resumed.set_state(state)
  for want, got in zip(expected, _take(resumed, 12)):
    assert set(want) == set(got)
    for key in want:
      assert np.array_equal(want[key], got[key]), key
  # within an epoch, no record repeats; records are the stored ones
  seen = np.concatenate([b["index"] for b in first + expected[:2]])
  assert len(set(seen.tolist())) == len(seen) == 80
  record = source[int(first[0]["index"][0])]
  assert np.array_equal(record["image"], first[0]["image"][0])
  assert record["patient_id"] == first[0]["patient_id"][0]
  # another seed, another order; no shuffle, file order
  other = next(iter(pipeline.make_loader(source, global_batch_size=16, seed=4)))
  assert not np.array_equal(other["index"], first[0]["index"])
  plain = next(iter(pipeline.make_loader(source, global_batch_size=16, seed=0, shuffle=False)))
  assert np.array_equal(plain["index"], np.arange(16))


def test_in_memory_source_matches_file_source(workdir):
  files, memory = dataset.load_split(workdir, "val"), dataset.load_split(workdir, "val", in_memory=True)
  assert len(files) == len(memory)
  for i in (0, len(files) - 1):
    a, b = files[i], memory[i]
    assert set(a) == set(b) and isinstance(b["path"], str)
    for key in a:
      assert np.array_equal(a[key], b[key]), key
  batch = lambda s: next(iter(pipeline.make_loader(s, global_batch_size=4, seed=9)))
  x, y = batch(files), batch(memory)
  for key in x:
    assert np.array_equal(x[key], y[key]), key


def test_finite_epochs_and_too_large_batch(workdir):
  source = dataset.load_split(workdir, "val")
  batches = list(pipeline.make_loader(source, global_batch_size=4, seed=0, num_epochs=1))
  assert len(batches) == len(source) // 4
  with pytest.raises(UserError, match="too few for a batch"):
    pipeline.make_loader(source, global_batch_size=len(source) + 1, seed=0)


def test_to_global_on_8_devices(workdir):
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  batch = next(iter(pipeline.make_loader(dataset.load_split(workdir, "train"),
                                         global_batch_size=16, seed=0)))
  out = pipeline.to_global(batch, mesh)
  assert isinstance(out["image"], jax.Array) and out["image"].shape == (16, 16, 16, 1)
  assert len(out["image"].sharding.device_set) == 8
  assert isinstance(out["patient_id"], np.ndarray)  # text stays on the host
  np.testing.assert_allclose(np.asarray(jnp.sum(out["feature"], axis=0)), batch["feature"].sum(0),
                             rtol=1e-5, atol=1e-5)


_WORKER = r"""
import json, sys
import jax
jax.config.update("jax_num_cpu_devices", 2)
port, pid, workdir, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid)
import jax.numpy as jnp
from pso_jax.data import dataset, pipeline
loader = pipeline.make_loader(dataset.load_split(workdir, "train"), global_batch_size=8, seed=5)
it = iter(loader)
batches = [next(it) for _ in range(4)]
mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
total = jax.jit(lambda x: jnp.sum(x))(pipeline.to_global(batches[0], mesh)["index"])
json.dump({"indices": [b["index"].tolist() for b in batches], "global_sum": int(total),
           "devices": jax.device_count()}, open(out, "w"))
"""


def test_two_processes_get_disjoint_shards(workdir, tmp_path):
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  script = tmp_path / "worker.py"
  script.write_text(_WORKER)
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, PSO_JAX_NO_PROGRESS="1")
  outs = [tmp_path / f"out{i}.json" for i in range(2)]
  procs = [subprocess.Popen([sys.executable, str(script), str(port), str(i), workdir, str(outs[i])],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
           for i in range(2)]
  logs = [p.communicate(timeout=240)[0].decode()[-3000:] for p in procs]
  assert all(p.returncode == 0 for p in procs), logs
  a, b = (json.loads(o.read_text()) for o in outs)
  assert a["devices"] == b["devices"] == 4
  ia, ib = np.array(a["indices"]), np.array(b["indices"])
  assert ia.shape == ib.shape == (4, 4)                     # 8 per global batch, 4 per process
  assert not set(ia.ravel()) & set(ib.ravel())               # disjoint shards
  n = len(dataset.load_split(workdir, "train"))
  assert set(ia.ravel()) <= set(range(n // 2)) and set(ib.ravel()) <= set(range(n // 2, n))
  assert a["global_sum"] == b["global_sum"] == int(ia[0].sum() + ib[0].sum())

"""grain loaders: static batches, exact resume, one global sample stream whatever the process
layout (in-process shares, loader workers, 2 real JAX processes), and the resume-layout checks."""

import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import tolerances as T
from conftest import ROOT, load_config
from pso_jax import parallel
from pso_jax.data import dataset, pipeline
from pso_jax.stages import prepare
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
  with pytest.raises(UserError, match="too few for a global batch of 12"):
    pipeline.make_loader(source, global_batch_size=len(source) + 1, seed=0)


def test_local_rows_to_global_on_8_devices(workdir):
  batch = next(iter(pipeline.make_loader(dataset.load_split(workdir, "train"),
                                         global_batch_size=16, seed=0)))
  out = parallel.local_rows_to_global(batch, parallel.batch_sharding(parallel.data_mesh()))
  assert isinstance(out["image"], jax.Array) and out["image"].shape == (16, 16, 16, 1)
  assert len(out["image"].sharding.device_set) == 8
  assert isinstance(out["patient_id"], np.ndarray)  # text stays on the host
  T.assert_close(np.asarray(jnp.sum(out["feature"], axis=0)), batch["feature"].sum(0),
                 T.reduction_rtol(16))  # 16 rows on 8 devices vs numpy


_WORKER = r"""
import json, sys
import jax
jax.config.update("jax_num_cpu_devices", 2)
port, pid, workdir, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid)
import jax.numpy as jnp
from pso_jax import parallel
from pso_jax.data import dataset, pipeline
loader = pipeline.make_loader(dataset.load_split(workdir, "train"), global_batch_size=8, seed=5)
it = iter(loader)
batches = [next(it) for _ in range(4)]
data_sharding = parallel.batch_sharding(parallel.data_mesh())
total = jax.jit(lambda x: jnp.sum(x))(parallel.local_rows_to_global(batches[0], data_sharding)["index"])
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
  assert not set(ia.ravel()) & set(ib.ravel())               # disjoint shares
  # together: the global batches a 1-process loader yields (rows 0-3 on process 0, 4-7 on 1)
  it = iter(pipeline.make_loader(dataset.load_split(workdir, "train"), global_batch_size=8, seed=5))
  for t in range(4):
    assert np.array_equal(np.concatenate([ia[t], ib[t]]), next(it)["index"]), t
  assert a["global_sum"] == b["global_sum"] == int(ia[0].sum() + ib[0].sum())


def _indices(loader, n):
  it = iter(loader)
  return [next(it)["index"] for _ in range(n)]


def test_global_stream_is_the_same_on_every_layout(workdir):
  """Shares of 1, 2 or 4 processes (contiguous or interleaved rows), loader workers and a start
  batch all read the same global batches: grain's own 1-process IndexSampler stream."""
  import grain
  source = dataset.load_split(workdir, "train")
  batch, n = 8, 14  # 88 records: the 14 batches cross an epoch boundary
  reference = grain.DataLoader(  # grain's sampler, as the loader was built before (independent)
      data_source=source, operations=[grain.transforms.Batch(batch_size=batch, drop_remainder=True)],
      sampler=grain.samplers.IndexSampler(num_records=len(source), shuffle=True, seed=7,
                                          shard_options=grain.sharding.NoSharding()))
  want = _indices(reference, n)
  layouts = {"1 process": [range(8)], "2 processes": [range(4), range(4, 8)],
             "4 processes": [range(i, i + 2) for i in range(0, 8, 2)],
             "2 interleaved": [[0, 1, 4, 5], [2, 3, 6, 7]]}
  for name, shares in layouts.items():
    parts = [_indices(pipeline.make_loader(source, global_batch_size=batch, seed=7, rows=r), n)
             for r in shares]
    got = [np.zeros(batch, int) for _ in range(n)]
    for rows, part in zip(shares, parts):
      for t in range(n):
        got[t][list(rows)] = part[t]
    assert all(np.array_equal(w, g) for w, g in zip(want, got)), name
  # a loader started at global batch 5 continues the stream; so does one with 2 workers (grain
  # hands worker w the records w, w+2, ... and takes the workers' batches in turn)
  late = _indices(pipeline.make_loader(source, global_batch_size=batch, seed=7, rows=range(4, 8),
                                       start_batch=5), n - 5)
  assert all(np.array_equal(w[4:], g) for w, g in zip(want[5:], late))
  make = lambda: pipeline.make_loader(source, global_batch_size=batch, seed=7, rows=range(4, 8),
                                      start_batch=5)
  it = iter(make())
  _take(it, 2)
  again = iter(make())  # such a loader's own saved state resumes it
  again.set_state(it.get_state())
  assert np.array_equal(next(again)["index"], want[7][4:])
  workers = _indices(pipeline.make_loader(source, global_batch_size=batch, seed=7, rows=range(4, 8),
                                          start_batch=3, worker_count=2), 5)
  assert all(np.array_equal(w[4:], g) for w, g in zip(want[3:8], workers))


def test_process_rows_and_layout():
  mesh = parallel.make_mesh(ml_collections.ConfigDict(dict(data=4, fsdp=2)))
  rows = pipeline.process_rows(parallel.batch_sharding(mesh), 16)
  assert rows == {0: list(range(16))}
  assert pipeline.row_ranges([6, 0, 1, 2, 5]) == [[0, 3], [5, 7]]
  layout = pipeline.stream_layout(num_records=88, global_batch_size=16, seed=1, shuffle=True,
                                  rows_by_process={0: range(8), 1: range(8, 16)}, worker_count=0)
  assert layout["process_count"] == 2 and layout["rows"] == [[[0, 8]], [[8, 16]]]
  json.dumps(layout)  # saved in the checkpoint's JSON metadata


def test_resume_checks_and_plan():
  layout = pipeline.stream_layout(num_records=88, global_batch_size=8, seed=1, shuffle=True,
                                  rows_by_process={0: range(4), 1: range(4, 8)}, worker_count=0)
  kw = dict(step=6, global_batch_size=8, grad_accum=1)
  pipeline.check_resume(None, process_count=3, device_count=3, **kw)  # nothing saved: no check
  pipeline.check_resume(layout, process_count=1, device_count=8, **kw)
  pipeline.check_resume(layout, process_count=4, device_count=4, **kw)
  with pytest.raises(UserError, match=r"cannot resume on 3 processes: the checkpoint of step 6 was "
                     r"trained on 2 process\(es\), and its global batch 8 does not split into 3 .*"
                     r"process count that divides 8 \(e\.g\. 1, 2, 4, 8\)"):
    pipeline.check_resume(layout, process_count=3, device_count=6, **kw)
  with pytest.raises(UserError, match=r"cannot resume on 6 devices.*micro-batch 4 .*grad_accum=2"
                     r".*divides 4 \(e\.g\. 1, 2, 4"):
    pipeline.check_resume(layout, process_count=2, device_count=6, **dict(kw, grad_accum=2))
  with pytest.raises(UserError, match=r"global batch 8, this config has 16.*batch_size=8"):
    pipeline.check_resume(layout, process_count=2, device_count=2, **dict(kw, global_batch_size=16))
  # the same layout restores the saved iterator states; any other starts a loader at batch `step`
  saved = {"layout": layout, "start_batch": 2}
  assert pipeline.resume_plan(saved, json.loads(json.dumps(layout)), 6) == (2, True)
  other = dict(layout, process_count=1, rows=[[[0, 8]]])
  assert pipeline.resume_plan(saved, other, 6) == (6, False)
  assert pipeline.resume_plan(None, layout, 6) == (6, False)  # checkpoints from before layouts

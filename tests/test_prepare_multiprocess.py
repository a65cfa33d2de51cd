"""prepare sharded over processes (issue 16 item 3): 2 real JAX processes on 127.0.0.1 each draw
their share of the chunks and write their own record files, process 0 the metadata; the records,
features and card equal a one-process prepare's."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

import tolerances as T
from conftest import ROOT, load_config
from pso_jax.data import dataset, filelists, prepare_plan
from pso_jax.stages import prepare

CHUNK = 8  # ~15 chunks of the tiny phantom: both processes get several
KEYS = ("image", "labels", "patient_id", "path", "feature", "index")


@pytest.mark.multiprocess
def test_two_process_prepare_equals_one(tmp_path):
  config = load_config("tiny")
  config.data.prepare_chunk = CHUNK
  one = str(tmp_path / "one")
  card_one = prepare.run(config, one)
  n_chunks = len(prepare_plan.plan_chunks(config, prepare_plan.make_plan(config)))

  two, out = str(tmp_path / "two"), str(tmp_path / "res")
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  worker = os.path.join(ROOT, "tests", "prepare_multiprocess_worker.py")
  procs = [subprocess.Popen([sys.executable, worker, str(port), str(i), two, str(CHUNK), out],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  logs = [p.communicate(timeout=300)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), "\n".join(logs)[-3000:]
  results = [json.load(open(f"{out}.{i}.json")) for i in range(2)]
  computed = [r["computed"][0] for r in results]
  # each process drew its own share (round robin), together every chunk once
  assert computed == [-(-n_chunks // 2), n_chunks // 2] and n_chunks >= 10
  assert all(r["records"] == {s: v["records"] for s, v in card_one["splits"].items()}
             for r in results)
  # each process wrote one contiguous half of every split: process 0 the first, process 1 the rest
  for split, info in card_one["splits"].items():
    n = info["records"]
    if not n:
      continue  # (tiny has no attacker split: none is written)
    ranges = [[(p["start"], p["stop"]) for p in r["parts"] if p["split"] == split] for r in results]
    assert ranges == [[(0, n // 2)], [(n // 2, n)]], (split, ranges)
  files = sorted(os.listdir(os.path.join(two, "data", "pso_cxr", "1.0.0")))
  assert sum(f.startswith("pso_cxr-train.array_record-") for f in files) == 2, files
  assert not [f for f in files if f.startswith(".")], files  # no manifest or part left behind
  for split in filelists.SPLITS:
    got, want = (dataset.load_arrays(w, split, KEYS) for w in (two, one))
    for k in KEYS:
      T.assert_identical(got[k], want[k], f"{split} {k}")
    T.assert_identical(dataset.load_features(two, split), dataset.load_features(one, split))
  card_two = dataset.load_card(two)
  for card in (card_one, card_two):
    card.pop("prepare_seconds")
    card["records"].pop("file_bytes_per_record")  # 2 files per split pad differently from 1
  assert card_two == card_one
  assert not os.path.exists(os.path.join(two, ".data.partial"))

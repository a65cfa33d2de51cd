"""Prepare over processes: wall time of the `prepare` stage run by 1, 2, ... JAX processes on this
machine (jax.distributed on 127.0.0.1), as speed-ups over the 1-process run measured in the same
bench, and a check that every run wrote the same dataset.

  nice -n 5 python -m pso_jax.bench prepare [--variant=scale] [--images=4000]
      [--processes=1,2] [--threads=0] [--set=data.image_size=128 ...] [--workdir=DIR]
      [--repeats=1]

Every process draws or decodes its share of the chunks, computes its share of the raw features
and writes its own record files (pso_jax.data.prepare_plan.build); process 0 whitens the features
and writes the metadata. Target (issue 16): 2 processes >= 1.7x one. The speed-up a machine can
show is bounded by its free cores: the bench prints the load average before each run. numpy's BLAS
(the phantom's interpolation) and XLA use every core by default, so one process may already use
them all; --threads=1 pins each process to one thread (processes as the only parallelism, one per
core).
"""

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np

from pso_jax.bench import ROOT
from pso_jax.bench.memory import patients_for, setup

SPEEDUP_TARGET = 1.7  # 2 processes over 1


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def commands(variant: str, workdir: str, processes: int, overrides: list, port: int) -> list:
  """One `python -m pso_jax.main --mode=prepare` command line per process."""
  base = [sys.executable, "-m", "pso_jax.main", f"--config=configs/cxr.py:{variant}",
          f"--workdir={workdir}", "--mode=prepare", *overrides]
  if processes == 1:
    return [base]
  return [base + [f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                  f"--config.distributed.num_processes={processes}",
                  f"--config.distributed.process_id={i}"] for i in range(processes)]


def thread_env(env: dict, threads: int) -> dict:
  """env with BLAS, OpenMP and XLA's CPU client limited to `threads` (0: left as it is)."""
  if threads <= 0:
    return env
  n = str(threads)
  flags = f"--xla_cpu_multi_thread_eigen={'true' if threads > 1 else 'false'}"
  return dict(env, OMP_NUM_THREADS=n, OPENBLAS_NUM_THREADS=n, MKL_NUM_THREADS=n,
              XLA_FLAGS=(env.get("XLA_FLAGS", "") + " " + flags).strip())


def run_group(cmds: list, log_prefix: str, env: dict) -> dict:
  """Starts every command at once; {seconds: wall time until the last exits, rcs}."""
  start = time.perf_counter()
  logs = [open(f"{log_prefix}.{i}.log", "w") for i in range(len(cmds))]
  try:
    procs = [subprocess.Popen(c, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
             for c, log in zip(cmds, logs)]
    rcs = [p.wait() for p in procs]
  finally:
    for log in logs:
      log.close()
  return {"seconds": time.perf_counter() - start, "rcs": rcs}


def speedup_rows(seconds: dict, images: int) -> list:
  """{processes: [wall seconds of each repeat]} -> rows with the best time, images/s, speed-up
  over 1 process and parallel efficiency (speed-up / processes)."""
  one = min(seconds[1])
  rows = []
  for p in sorted(seconds):
    best = min(seconds[p])
    rows.append(dict(processes=p, seconds=best, images_per_s=images / best, speedup=one / best,
                     efficiency=one / best / p))
  return rows


def format_rows(rows: list) -> str:
  lines = [f"{'processes':>9s} {'wall s':>8s} {'images/s':>9s} {'speed-up':>9s} {'efficiency':>10s}"]
  for r in rows:
    target = ""
    if r["processes"] == 2:
      target = f"  ({'ok' if r['speedup'] >= SPEEDUP_TARGET else 'BELOW'} the {SPEEDUP_TARGET}x target)"
    lines.append(f"{r['processes']:9d} {r['seconds']:8.1f} {r['images_per_s']:9.1f} "
                 f"{r['speedup']:8.2f}x {r['efficiency']:10.0%}{target}")
  return "\n".join(lines)


def same_dataset(a: str, b: str) -> bool:
  """The two workdirs hold the same features and the same card (but its timing and file sizes)."""
  from pso_jax.data import dataset, filelists
  for split in filelists.ALL_SPLITS:
    if not np.array_equal(dataset.load_features(a, split), dataset.load_features(b, split)):
      return False
  cards = [dataset.load_card(w) for w in (a, b)]
  for card in cards:
    card.pop("prepare_seconds", None)
    card.get("records", {}).pop("file_bytes_per_record", None)
  return json.dumps(cards[0], sort_keys=True) == json.dumps(cards[1], sort_keys=True)


def main(argv):
  parser = argparse.ArgumentParser(prog="python -m pso_jax.bench prepare", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--variant", default="scale")
  parser.add_argument("--images", type=int, default=4000, help="phantom scans, all splits")
  parser.add_argument("--processes", default="1,2")
  parser.add_argument("--repeats", type=int, default=1)
  parser.add_argument("--threads", type=int, default=0,
                      help="threads per process for BLAS/OpenMP/XLA (0: their defaults)")
  parser.add_argument("--set", action="append", default=[],
                      help="config override KEY=VALUE (without --config.), repeatable")
  parser.add_argument("--workdir", default="", help="default: a temporary folder, removed after")
  args = parser.parse_args(argv[1:])
  counts = sorted({int(p) for p in args.processes.split(",") if p})
  if not counts or counts[0] != 1 or args.images < 1 or args.repeats < 1:
    parser.error("--processes must include 1 (the reference), --images and --repeats >= 1")

  config, base, env = setup(args, "pso_jax_bench_prepare_")
  env = thread_env(env, args.threads)
  d = config.data
  patients = patients_for(args.images, int(d.phantom.scans_per_patient))
  overrides = [f"--config.{kv}" for kv in args.set] + [f"--config.data.phantom.num_patients={patients}"]
  images = patients * int(d.phantom.scans_per_patient)
  print(f"[prepare] {args.variant} {' '.join(args.set)}: {images} phantom scans of "
        f"{d.image_size}x{d.image_size}x{d.channels}, codec {d.image_codec}, chunks of "
        f"{d.prepare_chunk}; processes {counts}; {os.cpu_count()} CPUs; threads per process "
        f"{args.threads or 'default'}", flush=True)
  seconds = {p: [] for p in counts}
  try:
    for repeat in range(args.repeats):
      for p in counts:
        workdir = os.path.join(base, f"p{p}_r{repeat}")
        shutil.rmtree(workdir, ignore_errors=True)
        load = os.getloadavg()[0]
        r = run_group(commands(args.variant, workdir, p, overrides, free_port()),
                      os.path.join(base, f"p{p}_r{repeat}"), env)
        if any(r["rcs"]):
          raise SystemExit(f"[prepare] {p} process(es) failed (rcs {r['rcs']}); logs under "
                           f"{base}/p{p}_r{repeat}.*.log")
        seconds[p].append(r["seconds"])
        same = same_dataset(workdir, os.path.join(base, f"p1_r{repeat}"))
        print(f"[prepare] {p} process(es): {r['seconds']:.1f} s (load before {load:.1f}); "
              f"dataset {'identical to' if same else 'DIFFERS from'} 1 process's", flush=True)
        if not same:
          raise SystemExit("[prepare] the datasets differ: a bug, not a timing")
    print(format_rows(speedup_rows(seconds, images)))
  finally:
    if not args.workdir:
      shutil.rmtree(base, ignore_errors=True)

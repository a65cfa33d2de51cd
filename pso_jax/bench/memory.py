"""Memory bench: peak RSS of every stage at N and factor x N images, and the loader's images/s
against the train step's, measured in the same run.

  nice -n 5 python -m pso_jax.bench memory [--variant=tiny] [--images=480] [--factor=4]
      [--set=data.image_size=64 ...] [--stages=prepare,train,...] [--workdir=DIR]
      [--step_preset=xs] [--step_batch=2] [--loader_batches=50]

Each stage runs as its own process (`python -m pso_jax.main --mode=STAGE`) on a phantom of N scans
(all splits: data.phantom.num_patients = ceil(N / scans_per_patient)), then on a workdir of factor
x N; its peak RSS is the child's VmHWM, polled from /proc. Every run starts with an empty XLA
compilation cache, so both sizes compile alike. A stage that streams its images grows from N
to factor x N by its resident tables only (docs/streaming.md): the table prints the ratio and the
growth per added image next to the bytes of one image (target: ratio <= 1.10 beyond the tables).
Then the loader (pipeline.make_loader over the larger workdir's train split, at the config's
train batch) against the train step of `python -m pso_jax.bench train --preset=STEP_PRESET`
(target: loader >= 2x the step's images/s).
"""

import argparse
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

from pso_jax import workdir as workdir_lib
from pso_jax.bench import ROOT, cxr_config

STAGES = ("prepare", "train", "train_reid", "train_classifier", "sample", "select", "audit",
          "evaluate")
RATIO_TARGET = 1.10    # peak RSS at factor x N over N
HEADROOM_TARGET = 2.0  # loader images/s over the train step's
MIB = float(1 << 20)


# ------------------------------------------------------------------ measuring (tested)

def _hwm_bytes(pid: int) -> int:
  """VmHWM (peak resident set of the process's current program) from /proc, 0 once it is gone."""
  try:
    with open(f"/proc/{pid}/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) * 1024
  except (FileNotFoundError, ProcessLookupError):
    pass
  return 0


def run_measured(cmd: list, log_path: str, env=None, poll_s: float = 0.02, cwd: str = ROOT) -> dict:
  """Runs cmd as a child process; {rc, peak_rss (bytes), seconds}. Output goes to log_path.

  peak_rss is the child's VmHWM, polled from /proc while it runs: the peak of the program it
  executes. (ru_maxrss from wait4 would also count the parent's pages the child held between
  fork and exec: a bench run from a large process would read its own size.)"""
  start = time.perf_counter()
  peak = 0
  with open(log_path, "w") as log:
    child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=env)
    while child.poll() is None:
      peak = max(peak, _hwm_bytes(child.pid))
      time.sleep(poll_s)
  return {"rc": child.returncode, "peak_rss": peak, "seconds": time.perf_counter() - start}


def apply_override(config, kv: str) -> None:
  """KEY=VALUE onto config when the value is a number, bool or string (what the bench reads:
  image size, channels, scans per patient, batch sizes); other values only go to the children."""
  key, value = kv.split("=", 1)
  parent, _, leaf = key.rpartition(".")
  section = workdir_lib.config_field(config, parent)
  old = section[leaf]
  if isinstance(old, bool):
    section[leaf] = value.lower() in ("1", "true")
  elif isinstance(old, (int, float, str)):
    section[leaf] = type(old)(value)


def patients_for(images: int, scans_per_patient: int) -> int:
  return max(1, math.ceil(images / scans_per_patient))


def growth_rows(peaks: dict, sizes: tuple, image_bytes: int) -> list:
  """peaks {stage: {n: bytes}} at sizes (n_small, n_large) -> one row per stage measured at both:
  peak at each size (MiB), ratio large/small, growth per added image (bytes), that growth as a
  share of one image's bytes, and whether the ratio meets RATIO_TARGET."""
  small, large = sizes
  rows = []
  for stage, by_n in peaks.items():
    if small not in by_n or large not in by_n:
      continue
    a, b = by_n[small], by_n[large]
    per_image = (b - a) / (large - small)
    rows.append(dict(stage=stage, small_mib=a / MIB, large_mib=b / MIB, ratio=b / a,
                     per_image=per_image, image_share=per_image / image_bytes,
                     ok=b / a <= RATIO_TARGET))
  return rows


def format_rows(rows: list, sizes: tuple, image_bytes: int) -> str:
  small, large = sizes
  lines = [f"{'stage':17s} {'N=' + str(small):>10s} {'N=' + str(large):>10s} {'ratio':>6s} "
           f"{'B/added img':>12s} {'of image':>8s}  target",
           f"{'':17s} {'peak MiB':>10s} {'peak MiB':>10s} {'':6s} {'':>12s} "
           f"{str(image_bytes) + ' B':>8s}  ratio <= {RATIO_TARGET:.2f}"]
  for r in rows:
    lines.append(f"{r['stage']:17s} {r['small_mib']:10.0f} {r['large_mib']:10.0f} "
                 f"{r['ratio']:6.3f} {r['per_image']:12.0f} {r['image_share']:8.1%}  "
                 f"{'ok' if r['ok'] else 'ABOVE'}")
  return "\n".join(lines)


_STEP_LINE = re.compile(r"step: ([0-9.]+) ms, ([0-9.]+) images/s")


def parse_step_rate(text: str) -> float:
  """images/s from `python -m pso_jax.bench train`'s "step: X ms, Y images/s" line."""
  found = _STEP_LINE.findall(text)
  if not found:
    raise ValueError("no 'step: ... images/s' line in the train bench's output")
  return float(found[-1][1])


def headroom(loader_rate: float, step_rate: float) -> dict:
  ratio = loader_rate / step_rate
  return dict(loader=loader_rate, step=step_rate, ratio=ratio, ok=ratio >= HEADROOM_TARGET)


# ------------------------------------------------------------------ the bench

def _loader_rate(config, workdir: str, batches: int) -> float:
  """Records/s of the training loader (files, grain's default reader) after one warm-up batch."""
  from pso_jax.data import dataset, pipeline
  batch = int(config.train.batch_size)
  it = iter(pipeline.make_loader(dataset.load_split(workdir, "train"), global_batch_size=batch,
                                 seed=0))
  next(it)
  start = time.perf_counter()
  for _ in range(batches):
    next(it)
  return batches * batch / (time.perf_counter() - start)


def setup(args, prefix: str):
  """(config with the --set overrides, the scratch folder, the children's environment) of a bench
  that runs pso_jax.main children on the phantom."""
  config = cxr_config(args.variant)
  for kv in args.set:  # the children get them all; the sizes the bench reports follow them
    apply_override(config, kv)
  base = args.workdir or tempfile.mkdtemp(prefix=prefix)
  os.makedirs(base, exist_ok=True)
  return config, base, dict(os.environ, PSO_JAX_NO_PROGRESS="1")


def main(argv):
  parser = argparse.ArgumentParser(prog="python -m pso_jax.bench memory", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--variant", default="tiny")
  parser.add_argument("--images", type=int, default=480, help="N: phantom scans, all splits")
  parser.add_argument("--factor", type=int, default=4)
  parser.add_argument("--set", action="append", default=[],
                      help="config override KEY=VALUE (without --config.), repeatable")
  parser.add_argument("--stages", default=",".join(STAGES))
  parser.add_argument("--workdir", default="", help="default: a temporary folder, removed after")
  parser.add_argument("--step_preset", default="xs", help="'' skips the loader vs step figure")
  parser.add_argument("--step_batch", type=int, default=2)
  parser.add_argument("--loader_batches", type=int, default=50)
  args = parser.parse_args(argv[1:])
  stages = [s for s in args.stages.split(",") if s]
  unknown = [s for s in stages if s not in STAGES]
  if unknown or args.images < 1 or args.factor < 2:
    parser.error(f"stages from {STAGES} (got {unknown}), --images >= 1, --factor >= 2")

  config, base, env = setup(args, "pso_jax_bench_memory_")
  overrides = [f"--config.{kv}" for kv in args.set]
  d = config.data
  image_bytes = int(d.image_size) ** 2 * int(d.channels)
  sizes = (args.images, args.images * args.factor)
  print(f"[memory] {args.variant} {' '.join(args.set)}: images {d.image_size}x{d.image_size}x"
        f"{d.channels} ({image_bytes} B), N = {sizes[0]} and {sizes[1]} phantom scans; "
        f"stages {', '.join(stages)}", flush=True)
  peaks = {s: {} for s in stages}
  try:
    for n in sizes:
      workdir = os.path.join(base, f"n{n}")
      patients = patients_for(n, int(d.phantom.scans_per_patient))
      for stage in stages:
        cmd = [sys.executable, "-m", "pso_jax.main", f"--config=configs/cxr.py:{args.variant}",
               f"--workdir={workdir}", f"--mode={stage}",
               f"--config.data.phantom.num_patients={patients}", *overrides]
        log = os.path.join(base, f"n{n}_{stage}.log")
        # an empty compilation cache for every run: a cache the first size filled would spare the
        # second its compiles (and their memory), and the ratio would measure that
        cache = dict(env, PSO_JAX_COMPILATION_CACHE=os.path.join(base, f"xla_n{n}_{stage}"))
        r = run_measured(cmd, log, cache)
        if r["rc"] != 0:
          with open(log) as f:
            tail = f.read()[-3000:]
          raise SystemExit(f"[memory] {stage} at N={n} failed (rc {r['rc']}); {log}:\n{tail}")
        peaks[stage][n] = r["peak_rss"]
        print(f"[memory] N={n:6d} {stage:17s} peak {r['peak_rss'] / MIB:7.0f} MiB  "
              f"{r['seconds']:6.1f} s", flush=True)
    print(format_rows(growth_rows(peaks, sizes, image_bytes), sizes, image_bytes))

    if args.step_preset and os.path.exists(os.path.join(base, f"n{sizes[1]}", "data")):
      loader = _loader_rate(config, os.path.join(base, f"n{sizes[1]}"), args.loader_batches)
      cmd = [sys.executable, "-m", "pso_jax.bench", "train", f"--preset={args.step_preset}",
             f"--batch={args.step_batch}", "--steps=3", "--no-breakdown"]
      log = os.path.join(base, "train_step.log")
      r = run_measured(cmd, log, env)
      with open(log) as f:
        step = parse_step_rate(f.read())
      h = headroom(loader, step)
      print(f"[memory] loader {h['loader']:.1f} images/s (train split of N={sizes[1]}, batch "
            f"{config.train.batch_size}) vs the {args.step_preset} train step "
            f"{h['step']:.2f} images/s (batch {args.step_batch}): {h['ratio']:.1f}x "
            f"({'ok' if h['ok'] else 'BELOW'} the {HEADROOM_TARGET:.0f}x target)")
  finally:
    if not args.workdir:
      shutil.rmtree(base, ignore_errors=True)

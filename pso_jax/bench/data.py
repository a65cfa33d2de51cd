"""Data benchmark: prepare time and records/s, loader batches/s at the config's batch size.

  python -m pso_jax.bench data [--variant=demo] [--batches=200] [--workdir=DIR]

References measured in the same run: writing and reading the same arrays as one .npy file (the
floor any on-disk format pays), and gathering shuffled batches from in-memory numpy (what a
loader with zero overhead would deliver).
"""

import argparse
import os
import shutil
import tempfile
import time

import numpy as np

from pso_jax.bench import cxr_config

def _timed(fn):
  start = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - start


def main(argv):
  parser = argparse.ArgumentParser(prog="python -m pso_jax.bench data")
  parser.add_argument("--variant", default="demo")
  parser.add_argument("--batches", type=int, default=200)
  parser.add_argument("--workdir", default="", help="default: a temporary folder, removed after")
  args = parser.parse_args(argv[1:])
  os.environ.setdefault("PSO_JAX_NO_PROGRESS", "1")

  from pso_jax.data import dataset, phantom, pipeline
  from pso_jax.stages import prepare
  config = cxr_config(args.variant)
  workdir = args.workdir or tempfile.mkdtemp(prefix="pso_jax_bench_data_")
  try:
    if dataset.is_complete(workdir):
      shutil.rmtree(dataset.data_dir(workdir))
    (_, imgs), t_draw = _timed(lambda: phantom.generate(config))
    card, t_prep = _timed(lambda: prepare.run(config, workdir))
    n = sum(s["records"] for s in card["splits"].values())

    # reference: the same image bytes through one .npy write + read
    ref_path = os.path.join(workdir, "reference.npy")
    _, t_ref = _timed(lambda: (np.save(ref_path, imgs), np.load(ref_path)))
    print(f"[data] {args.variant}: {len(imgs)} scans {imgs.shape[1:]}, {n} records after the split rules")
    print(f"[data] phantom draw      {t_draw:7.2f} s  {len(imgs) / t_draw:9.0f} img/s")
    print(f"[data] prepare (total)   {t_prep:7.2f} s  {n / t_prep:9.0f} records/s")
    print(f"[data] reference .npy    {t_ref:7.3f} s  {len(imgs) / t_ref:9.0f} img/s write+read; "
          f"prepare takes {t_prep / t_ref:.0f}x the raw .npy round trip")

    # loader vs an in-memory gather of the same batches
    batch = int(config.train.batch_size)
    source = dataset.load_split(workdir, "train")
    arrays = dataset.load_arrays(workdir, "train", ("image", "labels", "feature", "index"))
    import grain
    loader_bps = {}
    memory = dataset.load_split(workdir, "train", in_memory=True)
    variants = (("files, grain default", source, None),
                ("files, num_threads=0", source, grain.ReadOptions(num_threads=0)),
                ("in memory, threads=0", memory, grain.ReadOptions(num_threads=0)))
    for name, src, options in variants:
      it = iter(pipeline.make_loader(src, global_batch_size=batch, seed=0, read_options=options))
      next(it)  # start-up (thread pool, file handles) is not throughput
      _, t_loader = _timed(lambda: [next(it) for _ in range(args.batches)])
      loader_bps[name] = args.batches / t_loader
    rng = np.random.default_rng(0)
    def gather():
      for _ in range(args.batches):
        rows = rng.choice(len(source), batch, replace=False)
        {k: v[rows] for k, v in arrays.items()}
    _, t_gather = _timed(gather)
    gather_bps = args.batches / t_gather
    print(f"[data] in-memory gather  {gather_bps:9.1f} batches/s of {batch} (reference)")
    for name, bps in loader_bps.items():
      print(f"[data] loader ({name:21s}) {bps:7.1f} batches/s ({bps * batch:.0f} records/s) "
            f"= {bps / gather_bps:.4f}x the in-memory gather")
  finally:
    if not args.workdir:
      shutil.rmtree(workdir, ignore_errors=True)

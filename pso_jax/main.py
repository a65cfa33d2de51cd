"""pso_jax entry point.

  python -m pso_jax.main --config=configs/cxr.py:demo --workdir=runs/demo --mode=pipeline
  python -m pso_jax.main --config=configs/cxr.py:demo --workdir=runs/demo --mode=train \
      --config.train.batch_size=128

Every process of a multi-host run executes this same program.
"""

import json
import logging as std_logging
import os
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

from pso_jax import progress, stages, workdir as workdir_lib
from pso_jax.errors import UserError

config_flags.DEFINE_config_file("config", None, "configs/cxr.py[:demo|:tiny]", lock_config=True)
flags.DEFINE_string("workdir", None, "folder for this run's files")
flags.DEFINE_enum("mode", "pipeline", stages.MODES, "stage to run; pipeline = all in order: "
                  + "; ".join(f"{s.mode} ({s.what})" for s in stages.STAGES))
flags.DEFINE_bool("allow_config_change", False, "continue a workdir with a different config")
flags.DEFINE_string("compare", None, "--mode=report: another workdir to show side by side")
FLAGS = flags.FLAGS


def setup_jax(config) -> None:
  import jax
  from pso_jax import distributed
  cache = os.environ.get("PSO_JAX_COMPILATION_CACHE",
                         os.path.join(os.path.expanduser("~"), ".cache", "pso_jax", "xla"))
  jax.config.update("jax_compilation_cache_dir", cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  distributed.maybe_initialize(config.distributed)


def run_modes(config, workdir: str, mode: str, **options) -> dict:
  import jax
  modes = [s.mode for s in stages.STAGES] if mode == "pipeline" else [mode]
  runners = [(m, stages.get_stage(m)) for m in modes]  # fail on a missing stage before work starts
  results, timings = {}, {}
  overall = progress.bar(total=len(runners), desc="pipeline", unit="stage") if len(runners) > 1 else None
  for i, (m, run) in enumerate(runners):
    if jax.process_index() == 0:
      logging.info("stage %d/%d: %s", i + 1, len(runners), m)
    if overall is not None:
      overall.set_postfix_str(m)
    start = time.time()
    kwargs = {"compare": options.get("compare")} if m == "report" else {}
    results[m] = run(config, workdir, **kwargs)
    timings[m] = time.time() - start
    if jax.process_index() == 0:
      record_timing(workdir, m, timings[m])
      print(f"[pso_jax] {m}: done in {timings[m]:.1f} s", flush=True)
    if overall is not None:
      overall.update(1)
  if overall is not None:
    overall.close()
  return {"results": results, "timings": timings}


def record_timing(workdir: str, mode: str, seconds: float) -> None:
  """Appends one stage run's wall time to timings.jsonl (the report sums them per stage)."""
  line = json.dumps({"stage": mode, "seconds": round(seconds, 3), "finished": time.time()})
  with open(os.path.join(workdir, "timings.jsonl"), "a", encoding="utf-8") as f:
    f.write(line + "\n")


def _quiet_checkpoint_library(record) -> bool:
  """Hides orbax's per-checkpoint INFO lines (dozens per save or load); its warnings still show."""
  return record.levelno >= std_logging.WARNING or f"{os.sep}orbax{os.sep}" not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_quiet_checkpoint_library)
  config = FLAGS.config
  try:
    if config is None:
      raise UserError("--config is required, e.g. --config=configs/cxr.py:demo")
    setup_jax(config)
    import jax
    workdir_lib.prepare_workdir(FLAGS.workdir, config, FLAGS.allow_config_change,
                                write=jax.process_index() == 0)
    run_modes(config, FLAGS.workdir, FLAGS.mode, compare=FLAGS.compare)
  except UserError as e:
    print(f"pso_jax: error: {e}", file=sys.stderr)
    sys.exit(2)


def parse_flags(argv):
  """absl parsing with one clear line for a config typo instead of a traceback."""
  try:
    return FLAGS(argv)
  except (flags.Error, KeyError, AttributeError, ValueError) as e:
    cause = e.__cause__ or e.__context__ or e
    key = next((a.split("=")[0] for a in argv[1:] if a.startswith("--config.")), None)
    if isinstance(cause, (KeyError, AttributeError)) and key:
      print(f"pso_jax: error: {key} is not a field of the config (typo?). Fields are listed by "
            "configs/cxr.py; e.g. --config.train.batch_size=64", file=sys.stderr)
    else:
      print(f"pso_jax: error: {e}", file=sys.stderr)
    sys.exit(2)


def entry():
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  entry()

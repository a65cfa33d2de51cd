"""pso_jax entry point.

  python -m pso_jax.main --config=configs/cxr.py:demo --workdir=runs/demo --mode=pipeline
  python -m pso_jax.main --config=configs/cxr.py:demo --workdir=runs/demo --mode=train \
      --config.train.batch_size=128

Every process of a multi-host run executes this same program. Every stage's config checks run
before the first stage starts; config.json is written once a stage of this run has finished. The
libraries' INFO lines are hidden unless --verbosity is given (absl's flag: 0 shows them, 1 adds
debug lines). Compiled programs are cached in ~/.cache/pso_jax/xla (PSO_JAX_COMPILATION_CACHE
moves it).
"""

import errno
import json
import logging as std_logging
import os
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

from pso_jax import progress, stages, workdir as workdir_lib
from pso_jax.errors import UserError
from pso_jax.stages import checks

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


def modes_of(mode: str) -> list:
  """The stages `--mode` runs, in order."""
  return list(stages.PIPELINE) if mode == "pipeline" else [stages.stage(mode).mode]


def run_modes(config, workdir: str, modes: list, **options) -> dict:
  import jax
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
    if m == "compare":  # the comparison runs each method's stages through this same loop
      kwargs = {"run_modes": run_modes, "record_timing": record_timing}
    results[m] = run(config, workdir, **kwargs)
    timings[m] = time.time() - start
    if jax.process_index() == 0:
      if i == 0:  # outputs of this config now exist: from here on the workdir holds it
        workdir_lib.write_config(workdir, config)
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


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _quiet_libraries(record) -> bool:
  """Without --verbosity, the libraries' INFO lines (absl, tfds, orbax, the JAX backend probe)
  are hidden, and their warnings and errors show as one line each, without a traceback (orbax's
  threads log one per failed write; pso_jax's own error says what failed). pso_jax's own lines
  show as they are."""
  if record.pathname.startswith(_PACKAGE_DIR):
    return True
  record.exc_info = record.exc_text = record.stack_info = None
  return record.levelno >= std_logging.WARNING


def _inside(path, folder) -> bool:
  path, folder = os.path.realpath(os.fsdecode(path)), os.path.realpath(folder)
  return os.path.commonpath([path, folder]) == folder


def _fail(message: str, code: int):
  print(f"pso_jax: error: {message}", file=sys.stderr)
  sys.exit(code)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS["verbosity"].present:
    logging.get_absl_handler().addFilter(_quiet_libraries)
  config, workdir = FLAGS.config, FLAGS.workdir
  try:
    if config is None:
      raise UserError("--config is required, e.g. --config=configs/cxr.py:demo")
    modes = modes_of(FLAGS.mode)
    setup_jax(config)
    # every check of every stage to run, then the workdir's: nothing is written before they pass
    checks.check_config(config, modes)
    workdir_lib.check_workdir(workdir, config, FLAGS.allow_config_change)
    run_modes(config, workdir, modes, compare=FLAGS.compare)
  except UserError as e:
    _fail(str(e), 2)
  except OSError as e:  # the workdir's disk failed (full, read-only, gone): one line, no traceback
    if not (workdir and e.filename and _inside(e.filename, workdir)):
      raise
    name = errno.errorcode.get(e.errno, str(e.errno))
    _fail(f"{e.filename}: {e.strerror} ({name}). Free space or make the workdir writable, then "
          "rerun the same command: finished stages and checkpoints are kept", 1)


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

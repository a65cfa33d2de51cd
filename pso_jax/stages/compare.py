"""The `compare` stage: the paper's comparison in one command (not run by --mode=pipeline).

  python -m pso_jax.main --config=configs/cxr.py:demo --workdir=runs/compare --mode=compare

Runs the shared stages once (prepare, train_reid, train_classifier, and the audit's reid attacker)
in <workdir>/shared, then for every method of config.compare.methods (`report.comparison.METHODS`,
guides first) its own pipeline in <workdir>/methods/<name> with the shared folders linked in:
train, select, audit, evaluate, report. With config.compare.unselected each method's generator is
also released without selection (<workdir>/unselected/<name>: one sample per training image,
audited and evaluated); with config.compare.guidance, config.compare.sweep_method's model is
released unselected at each guidance value and evaluated (<workdir>/sweep/<name>/g<g>). Every
sub-run goes through main's `run_modes` (its timings.jsonl and config.json), and only the stages
without their COMPLETE marker run, so a killed comparison continues where it stopped. Writes
compare.json (the result, rewritten on every run like the report) and compare.html with its
figures in compare/ (`report.compare_page`).
"""

import os
import time

import jax

from pso_jax import stages, workdir as workdir_lib
from pso_jax.errors import UserError
from pso_jax.report import comparison, compare_page, results_page


def _sub_run(run_modes, config, workdir: str, modes) -> None:
  """The `modes` not finished in `workdir` (a sub-run refuses a config other than its own)."""
  workdir_lib.check_workdir(workdir, config)
  todo = [m for m in modes if stages.done(workdir, m) is None]
  if todo:
    run_modes(config, workdir, todo)


def _link(workdir: str, target: str, attacker, diffusion_of=None) -> None:
  """The shared folders linked into `target` by process 0, seen by every process."""
  comparison.link_shared(workdir, target, attacker, diffusion_of)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(f"pso_jax.compare:{target}")


def _timed(record_timing, workdir: str, name: str, work):
  start = time.time()
  out = work()
  if jax.process_index() == 0:
    record_timing(workdir, name, time.time() - start)
  return out


def _shared_attacker(config, shared: str, record_timing):
  """The audit's reid attacker, trained once in shared/audit/attacker_reid (None when the config
  has no reid attacker): every audit of the comparison finds it there through a link."""
  from pso_jax.io_utils import COMPLETE
  from pso_jax.privacy import attackers, audit, release_audit
  if "reid" not in tuple(config.audit.attackers) or config.audit.attacker_model:
    return None
  out_dir = stages.output_dir(shared, "audit")
  model_dir = os.path.join(out_dir, attackers.MODEL_SUBDIR)
  if not os.path.exists(os.path.join(model_dir, COMPLETE)):
    only_reid = config.copy_and_resolve_references()
    only_reid.audit.attackers = ("reid",)

    def train():  # attackers.build trains what the audit would, where the audit would
      attackers.build(only_reid, shared, out_dir, audit.load_real(shared, "train"),
                      audit.load_real(shared, "val"), release_audit.load_holdout(only_reid, shared))
    _timed(record_timing, shared, comparison.ATTACKER_TIMING, train)
  return model_dir


def _collect(release_workdir: str) -> dict:
  return results_page.collect(release_workdir, {
      section: stages.stage(mode).result_path for section, mode in results_page.SECTIONS.items()})


def run(config, workdir: str, *, run_modes=None, record_timing=None, **_) -> dict:
  if run_modes is None or record_timing is None:
    raise UserError("--mode=compare runs sub-pipelines through pso_jax.main: start it with "
                    "python -m pso_jax.main ... --mode=compare")
  methods = comparison.methods(config)
  swept = comparison.sweep_method(config)
  shared = comparison.shared_dir(workdir)
  base = comparison.pipeline_config(config)
  _sub_run(run_modes, base, shared, comparison.SHARED_MODES)
  attacker = _shared_attacker(base, shared, record_timing)

  rows, listed, shown = [], [], {}
  rel = lambda path: os.path.relpath(path, workdir)
  for m in methods:
    cfg = comparison.method_config(config, m, workdir)
    wd = comparison.method_dir(workdir, m.name)
    _link(workdir, wd, attacker)
    _sub_run(run_modes, cfg, wd, comparison.METHOD_MODES)
    rows.append(comparison.release_row(_collect(wd), m, "selected", rel(wd)))
    shown[f"{m.name} (selected)"] = wd
    dirs = {"selected": rel(wd)}
    if config.compare.unselected:
      uwd = comparison.unselected_dir(workdir, m.name)
      _release_unselected(record_timing, cfg, workdir, uwd, wd, attacker)
      _sub_run(run_modes, cfg, uwd, comparison.UNSELECTED_MODES)
      rows.append(comparison.release_row(_collect(uwd), m, "unselected", rel(uwd)))
      shown[f"{m.name} (unselected)"] = uwd
      dirs["unselected"] = rel(uwd)
    listed.append({"name": m.name, "title": m.title, "what": m.what,
                   "overrides": comparison.overrides(m, config, cfg), "workdirs": dirs})

  sweep = None
  if swept is not None:
    method_wd = comparison.method_dir(workdir, swept.name)
    points = []
    for g in tuple(config.compare.guidance):
      cfg = comparison.sweep_config(config, swept, workdir, g)
      pwd = comparison.sweep_dir(workdir, swept.name, g)
      _release_unselected(record_timing, cfg, workdir, pwd, method_wd, attacker)
      _sub_run(run_modes, cfg, pwd, comparison.SWEEP_MODES)
      points.append(comparison.sweep_point(_collect(pwd), g, rel(pwd)))
    sweep = {"method": swept.name, "title": swept.title, "selection": False, "points": points}

  shared_results = _collect(shared)
  result = {
      "workdir": os.path.abspath(workdir), "variant": config.variant,
      "generated": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
      "columns": list(comparison.COLUMNS), "methods": listed,
      "shared": {"workdir": rel(shared), "modes": list(comparison.SHARED_MODES),
                 "attacker_reid": None if attacker is None else rel(attacker),
                 "timings": shared_results["timings"],
                 "reid_auc": shared_results["headline"]["reid_auc"],
                 "reid_tau": shared_results["headline"]["reid_tau"]},
      "rows": rows, "sweep": sweep,
      "figures": {k: v for k, v in compare_page.FIG.items() if k != "sweep" or sweep},
  }
  if jax.process_index() == 0:
    compare_page.write(workdir, result, tuple(config.data.findings),
                       compare_page.released_rows(shown))
  stages.finish(workdir, "compare", result)  # compare.json (no marker: rewritten every run)
  return result


def _release_unselected(record_timing, config, workdir: str, release_dir: str,
                        generator_dir: str, attacker) -> None:
  """release_dir: the shared folders and generator_dir's model linked in, then its release
  without selection (once)."""
  _link(workdir, release_dir, attacker, diffusion_of=generator_dir)
  workdir_lib.check_workdir(release_dir, config)
  if stages.done(release_dir, "select") is None:
    summary = _timed(record_timing, release_dir, comparison.UNSELECTED_TIMING,
                     lambda: comparison.release_unselected(config, release_dir))
    if jax.process_index() == 0:
      workdir_lib.write_config(release_dir, config)
    stages.finish(release_dir, "select", summary)  # the select stage's marker, last

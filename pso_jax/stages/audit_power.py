"""The `audit_power` stage: the audit's own false-alarm rate and detection rate, measured.

  python -m pso_jax.main --config=configs/cxr.py:demo --workdir=runs/demo --mode=audit_power

Run after `audit` (not by --mode=pipeline: it audits hundreds of releases). Builds releases of the
release's size (config.audit.power_size): null ones from real images of patients in neither
training nor the holdout, and leaking ones with config.audit.power_shares of their images replaced
by near copies of training images, config.audit.power_draws of each (`privacy.power`); audits each
with the audit's independent attackers (the reid attacker's model is the one the audit trained).
Writes `audit_power/power.json` (result), `audit_power/audit_power.html` and `power.png`, adds the
table and figure to `audit/audit.html`, then `audit_power/COMPLETE`.
"""

import jax
from absl import logging

from pso_jax import stages
from pso_jax.data import dataset, release
from pso_jax.errors import UserError
from pso_jax.privacy import attackers, audit, power, release_audit
from pso_jax.report import audit_report


def run(config, workdir: str, **_) -> dict:
  finished = stages.done(workdir, "audit_power")
  if finished is not None:
    return finished
  attackers.check_config(config)
  missing = stages.missing_inputs(workdir, "audit_power")
  if missing:  # the audit's attackers (its reid model) and verdict are read: it must have run
    raise UserError(f"audit_power measures the audit of {workdir!r}; missing: "
                    + "; ".join(missing) + ". Run --mode=pipeline (or the missing --mode=...) first")
  size = int(config.audit.power_size)
  if size < 0:
    size = len(release.load_released(workdir)["paths"])
  # training images stream (embedded per batch, near copies decode their few rows)
  train = dataset.load_columns(workdir, "train", keys=("image", "patient_id", "labels", "feature"))
  val = audit.load_real(workdir, "val")
  # phantom null images come from patients numbered above every prepared one
  pool, holdout, source = power.null_pool(config, release_audit.load_holdout(config, workdir),
                                          int(config.data.phantom.num_patients), size,
                                          int(config.seed))
  audit_dir = stages.output_dir(workdir, "audit")
  independent = [a for a in attackers.build(config, workdir, audit_dir, train, val, holdout)
                 if a.independent]
  spaces = release_audit.spaces(config, independent, train, holdout, size)
  result = power.run(config, spaces, train, pool, size, seed=int(config.seed),
                     log=logging.info)
  if config.audit.power_unselected:
    images = power.unselected_release(config, workdir, train)
    found = release_audit.audit_release(config, spaces, images, clusters=train["patient_id"],
                                        evidence=False)["summary"]
    result["unselected"] = {k: found[k] for k in ("verdict", "decided_by", "tests", "attackers")}
    logging.info("audit_power: the generator with selection off: %s", found["verdict"])
  result.update(null_source=source, folder=stages.stage("audit_power").folder,
                release_verdict=stages.done(workdir, "audit")["summary"]["verdict"])
  out_dir = stages.output_dir(workdir, "audit_power")
  if jax.process_index() == 0:
    audit_report.write_power(out_dir, result, audit_dir)
  stages.finish(workdir, "audit_power", result)
  return result

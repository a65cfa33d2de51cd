"""The `audit` stage: the released set audited by attackers that selection never used, one verdict.

  python -m pso_jax.main --config=configs/cxr.py:demo --workdir=runs/demo --mode=audit \
      [--config.audit.canaries=16] [--config.audit.attackers='("reid","pixels")']

Reads the released set (`release/`, in source order through `synthetic/`'s index), the training,
val and holdout splits (`config.audit.holdout_split`, the rows under the training split's label
rule) and, for the reid attacker, the attacker split; trains that attacker's re-id model into
`audit/attacker_reid/` (kept for reruns and audit_power) unless `config.audit.attacker_model` names
one. Every attacker (`privacy.attackers`) plays the PSO game and the DCR test; the verdict comes
from the independent ones together (`privacy.release_audit`), selection's own model is a
self-check beside them. Writes `audit/audit.json`, `audit/audit.html` with its PNG figures, the
verdict into the release card (`release/card.*`), then `audit/COMPLETE`.
"""

import jax
import numpy as np

from pso_jax import stages
from pso_jax.data import release
from pso_jax.errors import UserError
from pso_jax.privacy import attackers, audit, release_audit
from pso_jax.report import audit_report


def run(config, workdir: str, **_) -> dict:
  finished = stages.done(workdir, "audit")
  if finished is not None:
    return finished["summary"]
  attackers.check_config(config)
  released = release.load_released(workdir, lazy=True)  # PNGs read per batch
  if len(released["images"]) == 0:
    raise UserError(f"the released synthetic set in {workdir}/{release.RELEASE_DIR} is empty; "
                    f"nothing to audit (check {release.SUBDIR}/summary.json of the select stage)")
  train = audit.load_real(workdir, "train")
  val = audit.load_real(workdir, "val")
  holdout = release_audit.load_holdout(config, workdir)
  images, source_index, names, planted = audit.with_canaries(config, released, train)
  out_dir = stages.output_dir(workdir, "audit")
  attacker_list = attackers.build(config, workdir, out_dir, train, val, holdout)
  spaces = release_audit.spaces(config, attacker_list, train, holdout, len(images))
  # a synthetic image (or canary) stands for the patient of the training image it came from
  clusters = np.asarray(train["patient_id"])[source_index]
  result = release_audit.audit_release(config, spaces, images, source_index=source_index,
                                       clusters=clusters, names=names, canaries=planted)
  if jax.process_index() == 0:
    audit_report.write(out_dir, result, images, train, holdout)
    release.add_audit(workdir, result["summary"], 0 if planted is None else len(planted.position))
  stages.finish(workdir, "audit", None)  # audit.json came with the report: COMPLETE only
  return result["summary"]

"""The `audit` stage: all-pairs predicate-singling-out audit of the released synthetic set.

  python -m pso_jax.main --config=configs/cxr.py:demo --workdir=runs/demo --mode=audit \
      [--config.audit.canaries=16]

Reads the released set (`release/`, in source order through `synthetic/`'s index), the training
split and a patient-disjoint holdout split (`config.audit.holdout_split`), embeds everything with
the re-identification model (`reid/`), and writes `audit/audit.json`, `audit/audit.html` with its
PNG figures, the verdict and figures into the release card (`release/card.*`), then
`audit/COMPLETE`.
The audit itself is `privacy.audit` (`audit_images` runs it on any image set: canaries, a holdout,
another release); its files are `report.audit_report`'s.
"""

import jax

from pso_jax import stages
from pso_jax.data import release
from pso_jax.errors import UserError
from pso_jax.privacy import audit
from pso_jax.report import audit_report


def run(config, workdir: str, **_) -> dict:
  finished = stages.done(workdir, "audit")
  if finished is not None:
    return finished["summary"]
  released = release.load_released(workdir)
  if len(released["images"]) == 0:
    raise UserError(f"the released synthetic set in {workdir}/{release.RELEASE_DIR} is empty; "
                    f"nothing to audit (check {release.SUBDIR}/summary.json of the select stage)")
  train = audit.load_real(workdir, "train")
  images, source_index, names, planted = audit.with_canaries(config, released, train)
  result = audit.audit_images(config, workdir, images, source_index=source_index, canaries=planted,
                              train=train, names=names)
  if jax.process_index() == 0:
    audit_report.write(stages.output_dir(workdir, "audit"), result, images, train["image"])
    release.add_audit(workdir, result["summary"], 0 if planted is None else len(planted.position))
  stages.finish(workdir, "audit", None)  # audit.json came with the report: COMPLETE only
  return result["summary"]

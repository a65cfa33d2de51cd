"""The audit of a release by every attacker, and its one verdict (docs/method.md §8).

`spaces` embeds the training and holdout images once per attacker (`privacy.attackers`) and runs
the release-independent part of the audit there (tau calibration, control; `audit.reference`);
`audit_release` then audits any image set in every space (PSO game and DCR test, `audit.attack`)
and decides: a release fails when one of the independent attackers' tests rejects after Holm's
correction (`privacy.verdict`). The self-check (selection's own model) is audited the same way and
reported apart. The audit stage runs this on the release, audit_power on many releases it builds.
"""

import dataclasses
import time

import numpy as np

from pso_jax.data import pipeline
from pso_jax.errors import UserError
from pso_jax.privacy import attackers as attackers_lib
from pso_jax.privacy import audit, verdict


@dataclasses.dataclass
class Space:
  attacker: attackers_lib.Attacker
  reference: audit.Reference
  train_embeddings: np.ndarray   # for the 1:1 similarity of an audited image to its source
  embed_seconds: float


def load_holdout(config, workdir: str) -> dict:
  """config.audit.holdout_split's rows that the training split's label rule keeps (single-label
  when config.data.single_label_train_val): released images carry one training image's labels,
  so holdout, training and released images are then alike."""
  from pso_jax.data import dataset, filelists
  split = str(config.audit.holdout_split)
  rows = dataset.load_columns(workdir, split, keys=("image", "patient_id", "labels"))
  keep = filelists.keep_rows(rows["labels"], "train", bool(config.data.single_label_train_val))
  return dataset.take_rows(rows, keep)  # the image column becomes a view: nothing is read


def spaces(config, attacker_list, train: dict, holdout: dict, n_audited: int, *, mesh=None):
  """One Space per attacker: its embeddings of training and holdout images, checked unit-norm,
  and the audit's reference side (tau raised to the chance-match rate, the control searched)."""
  out = []
  for atk in attacker_list:
    start = time.time()
    # every image once, the work split over the processes (lazy columns read per batch)
    emb = {k: attackers_lib.check_unit_norm(atk.name, pipeline.split_pass(
        atk.embedder.embed, x["image"], desc=f"audit {atk.name}: {k}"))
           for k, x in (("train", train), ("holdout", holdout))}
    seconds = time.time() - start
    ref = audit.reference(config, emb["train"], train["patient_id"], emb["holdout"],
                          holdout["patient_id"], atk.tau, n_audited, mesh=mesh)
    out.append(Space(atk, ref, emb["train"], seconds))
  return out


def _row(name: str, res: dict) -> dict:
  """An attacker's figures in one flat row (aggregates only: no patient ids)."""
  s, d = res["summary"], res["dcr"]
  return {"what": attackers_lib.WHAT[name], "tau": res["meta"]["tau"],
          "dcr_share": d["share"], "dcr_share_ci": d["share_ci"], "dcr_binomial_p": d["binomial_p"],
          "dcr_control_share": d["control_share"], "dcr_p": d["p"],
          "attack": s["attack"], "control": s["control"], "residual_risk": s["residual_risk"],
          "pso_p": s["p_excess"], "risk_below_bound": s["verdict"] == "pass"}


def audit_release(config, space_list, images, *, source_index=None, clusters=None, names=None,
                  canaries=None, evidence: bool = True) -> dict:
  """Audits uint8 images (an array or a lazy column) in every space. clusters: the patient behind each image where known
  (source_index: the training image each one was made from, for the 1:1 memorisation rate).
  Returns {summary (the verdict), attackers: {name: audit.attack's result}, meta, canaries}."""
  from pso_jax.data import dataset
  if not dataset.is_lazy(images):  # a lazy column (a streamed release) is embedded batch by batch
    images = np.asarray(images)
  if images.ndim != 4 or images.dtype != np.uint8 or len(images) == 0:
    raise UserError(f"audited images must be a non-empty uint8 array [N, H, W, C], got "
                    f"{images.dtype} {images.shape}")
  start = time.time()
  per = {}
  for sp in space_list:
    atk = sp.attacker
    t0 = time.time()
    emb = attackers_lib.check_unit_norm(atk.name, pipeline.split_pass(
        atk.embedder.embed, images, desc=f"audit {atk.name}: released"))
    source_sims = None
    if source_index is not None:
      source_sims = np.einsum("nd,nd->n", emb.astype(np.float64),
                              sp.train_embeddings[np.asarray(source_index)].astype(np.float64))
    res = audit.attack(config, sp.reference, emb, source_sims=source_sims, clusters=clusters,
                       evidence=evidence)
    res["meta"].update(attacker=atk.name, independent=atk.independent, tau_source=atk.tau_source,
                       provenance=atk.provenance, embed_seconds=sp.embed_seconds + time.time() - t0)
    if names is not None and evidence:
      for e, name in zip(res["evidence"], names):
        e["name"] = str(name)
    if canaries is not None and len(canaries.position):
      res["canaries"] = audit.check_canaries(res, canaries)
    per[atk.name] = res
  independent = [sp.attacker.name for sp in space_list if sp.attacker.independent]
  decision = verdict.decide({n: {"pso": per[n]["summary"]["p_excess"], "dcr": per[n]["dcr"]["p"]}
                             for n in independent}, float(config.audit.test_size))
  # the headline figures: the attacker that decided a fail, else the one whose residual risk
  # reaches highest (the worst case the release passed)
  head = (decision["decided_by"]["attacker"] if decision["decided_by"] else
          max(independent, key=lambda n: per[n]["summary"]["residual_risk"]["high"]))
  hs = per[head]["summary"]
  summary = {**decision, "headline_attacker": head,
             **{k: hs[k] for k in ("attack", "control", "residual_risk", "confidence",
                                   "weight_bound", "risk_bound", "baseline_at_weight_bound",
                                   "reidentified")},
             "dcr": {k: per[head]["dcr"][k] for k in ("share", "share_ci", "control_share", "p")},
             "attackers": {n: _row(n, per[n]) for n in independent},
             "self_check": {n: _row(n, per[n]) for n in per if n not in independent},
             "warnings": [f"{n}: {w}" for n in per for w in per[n]["summary"]["warnings"]]}
  own = per.get(attackers_lib.SELF_CHECK, {}).get("summary", {})
  if own.get("memorisation_1to1"):
    summary["memorisation_1to1"] = own["memorisation_1to1"]
  first = per[space_list[0].attacker.name]["meta"]
  meta = {k: first[k] for k in ("n_audited", "n_train", "n_holdout", "n_control",
                                "n_train_patients", "n_holdout_patients", "gallery")}
  meta.update(attackers=list(per), independent=independent, seconds=time.time() - start)
  out = {"summary": summary, "attackers": per, "meta": meta}
  if canaries is not None and len(canaries.position):
    out["canaries"] = {n: {k: r["canaries"][k] for k in ("n", "named", "singled_out",
                                                          "all_flagged")}
                       for n, r in per.items()}
  return out

"""The all-pairs predicate-singling-out (PSO) audit of an image set against the training patients.

`audit_embeddings` runs it on embeddings (attack: the audited images' predicates against training
and holdout patients; control: real holdout images, same procedure); `audit_images` embeds any
image set (a release, canaries, a holdout) with the re-identification model and audits it;
`check_canaries` says which planted copies were flagged. What the `audit` stage runs on the
released set; `report.audit_report` writes the result's files.
"""

import dataclasses
import os
import time
from typing import Optional

import jax
import numpy as np

from pso_jax import io_utils
from pso_jax.errors import UserError
from pso_jax.privacy import canaries as canaries_lib
from pso_jax.privacy import dcr, pso
from pso_jax.search import pairwise

SUBDIR = "audit"             # the audit stage's folder under the workdir
RESULT_FILE = "audit.json"   # its result, written by report.audit_report.write


# ----------------------------------------------------------------------------- checks

def _patient_ids(name: str, patients, n: int) -> np.ndarray:
  patients = np.asarray(patients).astype(str)
  if patients.shape != (n,):
    raise UserError(f"{name}: {patients.shape[0] if patients.ndim else 0} patient ids for {n} "
                    "images; every image needs its patient id (re-run --mode=prepare)")
  missing = np.char.str_len(np.char.strip(patients)) == 0
  if missing.any():
    raise UserError(f"{name}: {int(missing.sum())} images have no patient id (first: row "
                    f"{int(np.argmax(missing))}); fix the filelist/CSV patient column")
  return patients


def check_patients(train_patients, holdout_patients) -> None:
  shared = np.intersect1d(train_patients, holdout_patients)
  if len(shared):
    raise UserError(f"the holdout shares {len(shared)} patients with training (e.g. "
                    f"{str(shared[0])!r}); the control needs patient-disjoint splits: use another "
                    "config.audit.holdout_split or re-run --mode=prepare")
  if len(np.unique(holdout_patients)) < 2:
    raise UserError("the holdout has fewer than 2 patients; predicate weights cannot be estimated")


def check_tau(tau: float, top: float = 1.0) -> None:
  """Similarities of embeddings with norms <= sqrt(top) lie in [-top, top] (unit norm: top = 1)."""
  if not np.isfinite(tau) or not -top < tau <= top:
    raise UserError(f"tau={tau} is outside the similarity range (-{top:.3g}, {top:.3g}] of these "
                    "embeddings: it would flag everything or nothing. Use the re-id model's "
                    "calibrated tau (config.audit.tau=-1) or a value inside the range")


def _check_reference(train, train_patients, holdout, holdout_patients):
  for name, x in (("training set", train), ("holdout set", holdout)):
    if len(x) == 0:
      raise UserError(f"the {name} is empty; the audit needs images in it")
  train = pairwise.check_embeddings("training embeddings", train)
  holdout = pairwise.check_embeddings("holdout embeddings", holdout, train.shape[1])
  train_patients = _patient_ids("training set", train_patients, len(train))
  holdout_patients = _patient_ids("holdout set", holdout_patients, len(holdout))
  check_patients(train_patients, holdout_patients)
  return train, train_patients, holdout, holdout_patients


def _max_norm_sq(*arrays) -> float:
  return float(max(np.linalg.norm(x, axis=1).max() for x in arrays) ** 2)


# ----------------------------------------------------------------------------- the audit

def _search_options(config, mesh):
  a = config.audit
  return dict(query_block=int(a.query_block), ref_block=int(a.ref_block), dtype=str(a.dtype),
              mesh=mesh, ring=bool(a.ring))


def _nearest_other_patient(refs, ids, rows, opts) -> np.ndarray:
  """For the reference images `rows`: similarity to the nearest reference of another patient."""
  if len(rows) == 0 or len(np.unique(ids)) < 2:
    return np.zeros(0, np.float32)
  k = min(len(refs), int(np.bincount(ids).max()) + 1)
  sims, idx = pairwise.knn(refs[rows], refs, k, **opts)
  other = ids[idx] != ids[rows][:, None]
  return sims[np.arange(len(rows)), np.argmax(other, axis=1)]


@dataclasses.dataclass
class Reference:
  """The audit's side that does not depend on the audited set, in one embedding space: training
  and holdout embeddings with their patients, tau after the 1-vs-N calibration, and the control's
  searches (so that many audited sets, e.g. audit_power's releases, share one)."""
  train: np.ndarray
  train_ids: np.ndarray            # int patient of each training image
  train_names: np.ndarray          # patient id of each int
  holdout: np.ndarray
  hold_ids: np.ndarray
  hold_names: np.ndarray
  tau: float
  tau_given: float
  weight_bound: float
  opts: dict
  train_other: np.ndarray          # sampled training images: nearest other training patient
  control: np.ndarray              # holdout rows whose predicates form the control
  ctl_train: pairwise.PatientSearch
  ctl_hold_other: np.ndarray       # control images: nearest holdout image of another patient
  control_flags: dict              # pso.singling_out of the control
  seconds: float


def reference(config, train, train_patients, holdout, holdout_patients, tau: float, n_audited: int,
              *, mesh=None) -> Reference:
  """Checks the reference sets and tau, calibrates tau on training patients, runs the control."""
  train, train_patients, holdout, holdout_patients = _check_reference(
      train, train_patients, holdout, holdout_patients)
  check_tau(tau, _max_norm_sq(train, holdout))
  a = config.audit
  opts = _search_options(config, mesh)
  train_names, train_ids = np.unique(train_patients, return_inverse=True)
  hold_names, hold_ids = np.unique(holdout_patients, return_inverse=True)
  start = time.time()
  rng = np.random.default_rng(int(config.seed))
  sampled = np.sort(rng.choice(len(train), min(int(a.train_queries), len(train)), replace=False))
  train_other = _nearest_other_patient(train, train_ids, sampled, opts)
  tau_given = tau
  if a.chance_match_rate > 0 and len(train_other):
    # 1-vs-N calibration on training patients only: at most this share of training images match
    # another training patient's image (the control stays untouched by the calibration)
    tau = max(tau, float(np.quantile(train_other.astype(np.float64), 1 - a.chance_match_rate)))
    tau = float(np.nextafter(np.float32(tau), np.float32(np.inf)))

  # control: predicates from real holdout images (as many as audited), same procedure
  rng = np.random.default_rng(int(config.seed))
  ctrl = np.sort(rng.choice(len(holdout), min(len(holdout), n_audited), replace=False))
  ctl_train = pairwise.patient_search(holdout[ctrl], train, train_ids, tau, 1,
                                      count_k=int(a.count_k), **opts)
  ctl_hold = pairwise.patient_search(holdout[ctrl], holdout, hold_ids, tau, 1,
                                     count_k=int(a.count_k), **opts)
  own = np.einsum("nd,nd->n", holdout[ctrl].astype(np.float64), holdout[ctrl].astype(np.float64))
  weight_bound = pso.resolve_weight_bound(float(a.weight_bound), len(train_names))
  control_flags = pso.singling_out(ctl_train.n_patients_matched, ctl_hold.n_patients_matched,
                                   len(hold_names), weight_bound, own_holdout_matched=own >= tau)
  control_flags["search"] = ctl_hold
  return Reference(train, train_ids, train_names, holdout, hold_ids, hold_names, float(tau),
                   float(tau_given), weight_bound, opts, train_other, ctrl, ctl_train,
                   _nearest_other_patient(holdout, hold_ids, ctrl, opts), control_flags,
                   time.time() - start)


def attack(config, ref: Reference, audited, *, source_sims=None, clusters=None,
           evidence: bool = True) -> dict:
  """The PSO audit and the DCR test of `audited` embeddings against a Reference. Returns
  {summary, dcr, evidence (per image; [] unless `evidence`), meta, arrays (for figures)}.
  clusters: the patient behind each audited image where known (the DCR errors are clustered by
  it), else None."""
  if len(audited) == 0:
    raise UserError("the audited set is empty; the audit needs images in it")
  audited = pairwise.check_embeddings("audited embeddings", audited, ref.train.shape[1])
  check_tau(ref.tau_given, _max_norm_sq(audited, ref.train, ref.holdout))
  a = config.audit
  opts, start = ref.opts, time.time()
  k, count_k = min(int(a.top_k), len(ref.train)), int(a.count_k)
  n_hold_pat = len(ref.hold_names)
  syn_train = pairwise.patient_search(audited, ref.train, ref.train_ids, ref.tau, k,
                                      count_k=count_k, **opts)
  syn_hold = pairwise.patient_search(audited, ref.holdout, ref.hold_ids, ref.tau, 1,
                                     count_k=count_k, **opts)
  attack_flags = pso.singling_out(syn_train.n_patients_matched, syn_hold.n_patients_matched,
                                  n_hold_pat, ref.weight_bound)
  control, ctl_train, ctrl = ref.control_flags, ref.ctl_train, ref.control
  summary = pso.summarise(attack_flags["singles_out"], control["singles_out"],
                          n_train_patients=len(ref.train_names), weight_bound=ref.weight_bound,
                          risk_bound=float(a.risk_bound), attack_isolates=attack_flags["isolates"],
                          control_isolates=control["isolates"])
  if len(ctrl) < len(audited):
    summary["warnings"].append(
        f"the control has {len(ctrl)} holdout images, fewer than the {len(audited)} audited, so "
        "its interval is wider than the attack's; a holdout split at least as large as the "
        "release (config.audit.holdout_split, config.data.split_fractions) gives a same-size one")
  summary["reidentified"] = {
      "attack": pso.wilson(int((syn_train.n_patients_matched > 0).sum()), len(audited)).to_dict(),
      "control": pso.wilson(int((ctl_train.n_patients_matched > 0).sum()), len(ctrl)).to_dict()}
  summary["nn_similarity_percentiles"] = {
      name: {str(p): float(np.percentile(v, p)) for p in (50, 75, 90, 95, 99)}
      for name, v in (("synthetic_train", syn_train.best_sim), ("holdout_train", ctl_train.best_sim),
                      ("train_train_other_patient", ref.train_other)) if len(v)}
  if source_sims is not None:
    summary["memorisation_1to1"] = pso.memorisation_rate(source_sims, ref.tau)
  dcr_stats = dcr.statistics(syn_train.best_sim, syn_hold.best_sim, ctl_train.best_sim,
                             ref.ctl_hold_other, clusters=clusters,
                             control_clusters=ref.hold_ids[ctrl])

  names = ref.train_names
  rows = []
  for i in range(len(audited) if evidence else 0):
    matched = syn_train.matched_patients[i]
    rows.append({
        "index": i,
        "nearest_patient": str(names[syn_train.best_patient[i]]),
        "nearest_train_index": int(syn_train.topk_idx[i, 0]),
        "similarity": float(syn_train.best_sim[i]),
        "nearest_holdout_index": int(syn_hold.topk_idx[i, 0]),
        "holdout_similarity": float(syn_hold.best_sim[i]),
        "n_patients_matched": int(syn_train.n_patients_matched[i]),
        "matched_patients": [str(names[p]) for p in matched[matched >= 0]],
        "matched_patients_complete": bool(syn_train.matched_complete[i]),
        "holdout_patients_matched": int(syn_hold.n_patients_matched[i]),
        "weight_estimate": float(attack_flags["weight"][i]),
        "isolates": bool(attack_flags["isolates"][i]),
        "reidentified": bool(syn_train.n_patients_matched[i] > 0),
        "singles_out": bool(attack_flags["singles_out"][i]),
    })
    if source_sims is not None:
      rows[-1]["similarity_to_source"] = float(source_sims[i])
  meta = {
      "tau": ref.tau, "tau_given": ref.tau_given,
      "tau_rule": (f"max(given tau, tau at a {a.chance_match_rate:g} chance match rate between "
                   "training patients)") if a.chance_match_rate > 0 else "given tau",
      "n_audited": len(audited), "n_train": len(ref.train),
      "n_holdout": len(ref.holdout), "n_control": len(ctrl),
      "n_train_patients": len(names), "n_holdout_patients": n_hold_pat,
      "d": int(audited.shape[1]), "dtype": opts["dtype"],
      "ring": opts["ring"], "top_k": k, "count_k": count_k, "gallery": int(a.gallery),
      "devices": jax.device_count(), "processes": jax.process_count(),
      "exactness": "exact: candidates re-scored in float64, top-k and patient counts certified "
                   "against the GEMM error bound, uncertified queries re-searched (fp32, then "
                   "float64 brute force)",
      "kernel": {"synthetic_train": syn_train.stats, "synthetic_holdout": syn_hold.stats,
                 "control_train": ctl_train.stats, "control_holdout": control["search"].stats},
      "search_seconds": ref.seconds + time.time() - start,
  }
  arrays = {"synthetic_nn": syn_train.best_sim, "holdout_nn": ctl_train.best_sim,
            "train_other_nn": ref.train_other, "nearest_train_index": syn_train.topk_idx[:, 0],
            "synthetic_holdout_nn": syn_hold.best_sim,
            "nearest_holdout_index": syn_hold.topk_idx[:, 0],
            "control_holdout_nn": ref.ctl_hold_other, "singles_out": attack_flags["singles_out"],
            "control_singles_out": control["singles_out"]}
  return {"summary": summary, "dcr": dcr_stats, "evidence": rows, "meta": meta, "arrays": arrays}


def audit_embeddings(config, audited, train, train_patients, holdout, holdout_patients, tau: float,
                     *, mesh=None, source_sims=None, clusters=None) -> dict:
  """The PSO audit and DCR test on embeddings (`reference`, then `attack`)."""
  if len(audited) == 0:
    raise UserError("the audited set is empty; the audit needs images in it")
  ref = reference(config, train, train_patients, holdout, holdout_patients, tau, len(audited),
                  mesh=mesh)
  return attack(config, ref, audited, source_sims=source_sims, clusters=clusters)


def check_canaries(result: dict, canaries: canaries_lib.Canaries) -> dict:
  """Which planted copies were flagged: re-identified (linked to a training patient at tau) with
  their own patient nearest. Singling out is counted too but is not required: a copy of a patient
  who chance-matches another training patient matches two patients, so it cannot isolate one,
  yet the audit still links it to its patient."""
  ev = result["evidence"]
  rows = []
  for pos, patient, kind in zip(canaries.position, canaries.patient, canaries.kind):
    e = ev[int(pos)]
    rows.append({"position": int(pos), "patient": str(patient), "kind": str(kind),
                 "named": e["nearest_patient"] == str(patient) and e["reidentified"],
                 "singled_out": e["singles_out"], "similarity": e["similarity"]})
  n = len(rows)
  by_kind = {k: {"n": sum(r["kind"] == k for r in rows),
                 "named": sum(r["named"] for r in rows if r["kind"] == k),
                 "singled_out": sum(r["singled_out"] for r in rows if r["kind"] == k)}
             for k in canaries_lib.KINDS}
  return {"n": n, "named": sum(r["named"] for r in rows), "by_kind": by_kind,
          "singled_out": sum(r["singled_out"] for r in rows),
          "all_flagged": n > 0 and all(r["named"] for r in rows),
          "rows": rows}


# ----------------------------------------------------------------------------- images

def load_real(workdir: str, split: str) -> dict:
  from pso_jax.data import dataset
  return dataset.load_columns(workdir, split, keys=("image", "patient_id"))


def _multiple_comparisons(reid_info: dict, n_train: int, summary: dict) -> dict:
  """One query meets n_train pairs: a per-pair FPR that is small for verification can still give
  chance matches in a 1-vs-N search. The control's re-identification rate measures it directly."""
  pair_fpr = (reid_info.get("test") or {}).get("fpr", reid_info.get("fpr"))
  expected = None if pair_fpr is None else float(pair_fpr) * n_train
  out = {"pair_fpr": pair_fpr, "n_train_images": n_train,
         "expected_chance_matches_per_query": expected,
         "control_reidentified": summary["reidentified"]["control"]["value"]}
  if out["control_reidentified"] > 0.05:
    summary["warnings"].append(
        f"{out['control_reidentified']:.1%} of real holdout images match some training patient "
        f"by chance at this tau (1-vs-{n_train} search); calibrate tau at a pair FPR well below "
        f"1/{n_train} (config.reid.target_fpr) for a sharper audit")
  return out


def audit_images(config, workdir: str, images_uint8, *, embedder=None, source_index=None,
                 canaries: Optional[canaries_lib.Canaries] = None, train: Optional[dict] = None,
                 holdout: Optional[dict] = None, mesh=None, names=None) -> dict:
  """Audits any image set against the workdir's training patients (`report.audit_report.write`
  writes its files).

  embedder: object with `.embed(uint8 NHWC) -> unit-norm [N, d]` and `.tau` (default: the
  workdir's re-id model). train/holdout: {"image", "patient_id"} arrays (default: the workdir's
  training split and config.audit.holdout_split).
  """
  images_uint8 = np.asarray(images_uint8)
  if images_uint8.ndim != 4 or images_uint8.dtype != np.uint8 or len(images_uint8) == 0:
    raise UserError(f"audited images must be a non-empty uint8 array [N, H, W, C], got "
                    f"{images_uint8.dtype} {images_uint8.shape}")
  provenance = {}
  if embedder is None:
    from pso_jax.privacy import reid
    embedder = reid.load_reid(workdir)
    provenance = {"model_checkpoint": os.path.join(workdir, reid.SUBDIR, "checkpoint"),
                  "reid": io_utils.read_json(os.path.join(workdir, reid.SUBDIR, reid.RESULT_FILE))}
  tau = float(config.audit.tau) if config.audit.tau >= 0 else float(embedder.tau)
  provenance["tau_source"] = "config.audit.tau" if config.audit.tau >= 0 else "re-id calibration"
  train = train if train is not None else load_real(workdir, "train")
  holdout = holdout if holdout is not None else load_real(workdir, str(config.audit.holdout_split))
  if images_uint8.shape[1:] != train["image"].shape[1:]:
    raise UserError(f"audited images {images_uint8.shape[1:]} differ in shape from the training "
                    f"images {train['image'].shape[1:]}; audit images of the dataset's format")
  # the checks that need no embedding run before the embedder does (unit-norm: sims in [-1, 1])
  for name, x in (("training set", train), ("holdout set", holdout)):
    if len(x["image"]) == 0:
      raise UserError(f"the {name} is empty; the audit needs images in it")
  check_patients(_patient_ids("training set", train["patient_id"], len(train["image"])),
                 _patient_ids("holdout set", holdout["patient_id"], len(holdout["image"])))
  check_tau(tau)
  start = time.time()
  emb = {name: embedder.embed(x) for name, x in
         (("audited", images_uint8), ("train", train["image"]), ("holdout", holdout["image"]))}
  embed_seconds = time.time() - start
  source_sims = None
  if source_index is not None:
    src = np.asarray(source_index, np.int64)
    source_sims = np.einsum("nd,nd->n", emb["audited"].astype(np.float64),
                            emb["train"][src].astype(np.float64))
  result = audit_embeddings(config, emb["audited"], emb["train"], train["patient_id"],
                            emb["holdout"], holdout["patient_id"], tau, mesh=mesh,
                            source_sims=source_sims)
  result["meta"].update(provenance, embed_seconds=embed_seconds,
                        runtime_seconds=time.time() - start)
  result["summary"]["multiple_comparisons"] = _multiple_comparisons(
      provenance.get("reid", {}), len(train["image"]), result["summary"])
  if names is not None:
    for e, name in zip(result["evidence"], names):
      e["name"] = str(name)
  if canaries is not None and len(canaries.position):
    result["canaries"] = check_canaries(result, canaries)
  return result


def with_canaries(config, released: dict, train: dict):
  """(images, source_index, names, planted) of the released set with config.audit.canaries
  near copies of training images planted in it (planted None when there are none)."""
  images, source_index, planted = released["images"], released["source_index"], None
  names = list(released["paths"])
  a = config.audit
  if a.canaries > 0:
    images, planted = canaries_lib.plant(
        images, train["image"], train["patient_id"], int(a.canaries), int(config.seed),
        noise=float(a.canary_noise), shift=int(a.canary_shift), contrast=float(a.canary_contrast))
    # canaries copy their training image: their "source" is that image
    keep = np.ones(len(images), bool)
    keep[planted.position] = False
    src = np.empty(len(images), np.int64)
    src[keep], src[planted.position] = source_index, planted.train_index
    source_index = src
    for pos, kind, t in zip(planted.position, planted.kind, planted.train_index):
      names.insert(int(pos), f"canary:{kind}:train[{int(t)}]")  # positions ascend: inserts line up
  return images, source_index, names, planted

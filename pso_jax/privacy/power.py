"""The audit audits itself: how often it fails releases that do not leak, and ones that do.

- null releases: real images of patients in neither training nor the holdout, released as if
  synthetic. On phantom data these are freshly drawn patients (numbers beyond every prepared
  patient, under the training split's label rule), so the audit keeps its holdout; on other data
  half the holdout's patients are set aside for them and the audit uses the other half.
- leaking releases: a null release with a share q of its images replaced by near copies of distinct
  training images (`canaries.leaking_copies`: 1-2 px shifts, noise, contrast, blends).

Each release is audited like the real one (`release_audit.audit_release` in the same spaces); the
rate of failed releases, with Wilson intervals, is the false-alarm rate (null) and the detection
rate (leaking), for the verdict and for each attacker alone (its own tests, Holm within them).
"""

import time

import numpy as np

from pso_jax.errors import UserError
from pso_jax.privacy import canaries, pso, release_audit, verdict

SUBDIR = "audit_power"
RESULT_FILE = "power.json"
UNSELECTED_STREAM = 3  # its own noise stream (sampling's preview and selection use 1 and 2)


def null_pool(config, holdout: dict, prepared_patients: int, needed: int, seed: int):
  """(pool {"image", "patient_id"}, the holdout the audit keeps, a description)."""
  from pso_jax.data import filelists, phantom
  d = config.data
  if d.source == "phantom":
    # fresh patients: the phantom is a deterministic function of the patient number
    grown = d.phantom.copy_and_resolve_references()
    per_patient = max(int(d.phantom.scans_per_patient), 1)
    grown.num_patients = prepared_patients + 4 * needed // per_patient + 8  # draws vary
    idx = phantom.index(grown)
    rows = np.flatnonzero((idx.patient >= prepared_patients)
                          & filelists.keep_rows(idx.labels, "train", d.single_label_train_val))
    images = phantom.render(grown, idx, d.image_size, d.channels, rows)
    return ({"image": images, "patient_id": idx.patient_ids[rows], "labels": idx.labels[rows]},
            holdout,
            f"{len(rows)} images of freshly drawn phantom patients (numbers above "
            f"{prepared_patients})")
  patients = np.unique(holdout["patient_id"])
  rng = np.random.default_rng(seed)
  kept = rng.permutation(patients)[:len(patients) // 2]
  keep = np.isin(holdout["patient_id"], kept)
  half = lambda mask: {k: v[mask] for k, v in holdout.items()}
  return (half(~keep), half(keep),
          f"half of the holdout's patients ({len(patients) - len(kept)}; the audit kept the other "
          "half as its holdout)")


def unselected_release(config, workdir: str, train: dict) -> np.ndarray:
  """The workdir's generator with selection off: one sample per training image, conditioned as
  selection conditions its first round, released whatever a re-id model says of it."""
  from pso_jax.diffusion import sampling
  from pso_jax.privacy import selection_workdir
  guidance = float(config.sample.guidance)
  loaded = sampling.load_sampler(config, workdir, stream=UNSELECTED_STREAM, guided=guidance != 1)
  n = len(train["labels"])
  # config.select.cond_k > 0: the k-anonymous conditions selection samples with
  patients = np.unique(np.asarray(train["patient_id"]).astype(str), return_inverse=True)[1]
  return loaded.generate(np.arange(n, dtype=np.uint32),
                         selection_workdir.release_conditions(config, train, patients),
                         np.full(n, guidance, np.float32))


def _rejections(config, spaces, images, clusters) -> dict:
  """Whether the verdict and each attacker alone fail this release, and the reference tests."""
  res = release_audit.audit_release(config, spaces, images, clusters=clusters, evidence=False)
  size = float(config.audit.test_size)
  out = {"verdict": res["summary"]["verdict"] == "fail"}
  for t in {t["attacker"] for t in res["summary"]["tests"]}:
    alone = {t: {r["test"]: r["p"] for r in res["summary"]["tests"] if r["attacker"] == t}}
    out[t] = verdict.decide(alone, size)["verdict"] == "fail"
    out[f"{t}: DCR binomial vs 0.5"] = res["attackers"][t]["dcr"]["binomial_p"] <= size
  return out


def run(config, spaces, train: dict, pool: dict, size: int, *, seed: int, log=print) -> dict:
  """Audits power_draws null releases and as many leaking ones per share; returns the rates."""
  a = config.audit
  draws, shares = int(a.power_draws), [float(q) for q in a.power_shares]
  if draws < 1 or not all(0 < q <= 1 for q in shares):
    raise UserError(f"config.audit.power_draws={a.power_draws} must be >= 1 and "
                    f"config.audit.power_shares={tuple(a.power_shares)} shares in (0, 1]")
  if size > len(pool["image"]):
    raise UserError(f"null releases of {size} images need as many unseen real images; there are "
                    f"{len(pool['image'])} (config.audit.power_size)")
  who = [sp.attacker.name for sp in spaces if sp.attacker.independent] + ["verdict"]
  start = time.time()

  def arm(share: float, arm_seed: int) -> dict:
    copies = int(round(share * size))
    counts = {}
    for d in range(draws):
      rng = np.random.default_rng([seed, arm_seed, d])
      pick = rng.choice(len(pool["image"]), size, replace=False)
      images = pool["image"][pick].copy()
      clusters = pool["patient_id"][pick].astype(object)
      if copies:
        where = rng.choice(size, copies, replace=False)
        images[where], src = canaries.leaking_copies(
            train["image"], copies, rng, noise=float(a.canary_noise),
            contrast=float(a.canary_contrast))
        clusters[where] = np.asarray(train["patient_id"])[src]
      for k, v in _rejections(config, spaces, images, clusters.astype(str)).items():
        counts[k] = counts.get(k, 0) + int(v)
    log(f"audit_power: {share:.1%} near copies ({copies}): verdict failed "
        f"{counts['verdict']}/{draws} releases ({time.time() - start:.0f} s)")
    return {"share": share, "copies": copies,
            "rejected": {w: pso.wilson(counts[w], draws).to_dict() for w in who},
            "descriptive": {k: pso.wilson(v, draws).to_dict() for k, v in counts.items()
                            if k not in who}}

  null = arm(0.0, 0)
  leaking = [arm(q, i + 1) for i, q in enumerate(shares)]
  return {"size": int(size), "draws": draws, "test_size": float(a.test_size), "who": who,
          "interval": "Wilson", "kinds": list(canaries.LEAK_KINDS), "null": null,
          "leaking": leaking, "seconds": time.time() - start}

"""Distance to closest record (DCR): is each audited image nearer the training set than a holdout?

For every audited image s: t_s, its similarity to the nearest training image, and h_s, to the
nearest holdout image (holdout patients are patient-disjoint from training and, in the audit,
restricted to the rows the training split's label rule keeps). Without leakage s is no nearer the
images the generator learnt from than to others of the same population, so the share with
t_s > h_s is what real unseen images get.

That share is not 0.5 exactly: it depends on which patients landed in training and in the holdout
(and, in the feature space, on the whitening fitted on training), and scans of one patient move
together, so a binomial test against 0.5 fires on releases that do not leak (`audit_power` measures
how often). The share is therefore judged against a **control** built the same way from real
holdout images (their own patient left out of the holdout), in a two-proportion z-test with
standard errors clustered by patient, one-sided. The binomial test against 0.5 (with its
Clopper-Pearson interval) and a Mann-Whitney test of the t and h distributions are reported beside
it, outside the verdict.
"""

import numpy as np
from scipy import stats

from pso_jax.errors import UserError


def clustered_share(flags, clusters=None) -> tuple[float, float]:
  """(share, standard error) of 0/1 flags; with cluster labels, the cluster-robust (sandwich)
  error: flags of one patient's images count as one draw, not as many."""
  y = np.asarray(flags, np.float64)
  n = len(y)
  if n == 0:
    raise UserError("a DCR share needs at least one image")
  p = float(y.mean())
  if clusters is None:
    return p, float(np.sqrt(p * (1 - p) / n))
  _, inverse = np.unique(np.asarray(clusters).astype(str), return_inverse=True)
  sums = np.bincount(inverse, y - p)
  c = len(sums)
  return p, float(np.sqrt((sums ** 2).sum() * c / max(c - 1, 1)) / n)


def check_similarities(name: str, *arrays) -> None:
  for x in arrays:
    x = np.asarray(x, np.float64)
    if not np.isfinite(x).all():
      raise UserError(f"{name}: {int((~np.isfinite(x)).sum())} nearest-neighbour similarities are "
                      "NaN/Inf; the embeddings must be finite and unit-norm (re-embed the images)")


def statistics(train_sim, holdout_sim, control_train_sim, control_holdout_sim, *,
               clusters=None, control_clusters=None, confidence: float = 0.95) -> dict:
  """The DCR figures of one attacker (JSON-ready).

  train_sim, holdout_sim [N]: each audited image's nearest training / holdout similarity;
  control_*: the same for the control images (holdout images, own patient left out);
  clusters / control_clusters: patient of each image (None: independent images).
  """
  t, h = np.asarray(train_sim, np.float64), np.asarray(holdout_sim, np.float64)
  ct, ch = np.asarray(control_train_sim, np.float64), np.asarray(control_holdout_sim, np.float64)
  check_similarities("DCR", t, h, ct, ch)
  if t.shape != h.shape or ct.shape != ch.shape or not len(t) or not len(ct):
    raise UserError(f"DCR needs one training and one holdout similarity per image, got "
                    f"{t.shape}, {h.shape} (audited) and {ct.shape}, {ch.shape} (control)")
  closer = t > h
  k, n = int(closer.sum()), len(t)
  binom = stats.binomtest(k, n, 0.5, alternative="greater")
  ci = stats.binomtest(k, n).proportion_ci(confidence, method="exact")  # two-sided, to show
  share, se = clustered_share(closer, clusters)
  c_share, c_se = clustered_share(ct > ch, control_clusters)
  z = (share - c_share) / max(np.hypot(se, c_se), 1e-12)
  two_sample = stats.mannwhitneyu(t, h, alternative="greater")
  return {
      "n": n, "closer_to_train": k, "ties": int((t == h).sum()), "share": share,
      "share_ci": [float(ci.low), float(ci.high)], "share_se": se,
      "binomial_p": float(binom.pvalue),
      "control_n": len(ct), "control_share": c_share, "control_se": c_se,
      "z": float(z), "p": float(stats.norm.sf(z)),
      "train_vs_holdout_similarity_p": float(two_sample.pvalue),
      "median_train_similarity": float(np.median(t)),
      "median_holdout_similarity": float(np.median(h)),
      "rule": "share closer to training vs the control's, two-proportion z-test with errors "
              "clustered by patient, one-sided",
  }

"""ROC AUC, bootstrap confidence intervals and the real-vs-synthetic utility comparison.

AUC is the Mann-Whitney statistic (ties count one half), identical to scikit-learn's
`roc_auc_score`. Bootstrap resamples are expressed as integer weights (how often each item was
drawn), so the scores are sorted once and every resample costs O(n): the same code serves the
re-id pair AUC (pairs resampled) and the per-finding AUROC (test images resampled, paired between
the real- and the synthetic-trained classifier).
"""

import json
from typing import Optional, Sequence

import numpy as np

UNDEFINED = "undefined"


def _rank(scores, labels):
  """(order, tie-group starts, labels in score order): the one sort every resample shares."""
  scores = np.asarray(scores, np.float64).ravel()
  labels = np.asarray(labels).ravel().astype(bool)
  order = np.argsort(scores, kind="stable")
  s = scores[order]
  starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]]) if s.size else np.zeros(0, int)
  return order, starts, labels[order]


def _auc_ranked(starts, pos, w) -> np.ndarray:
  """AUC per row of weights `w` [R, n] given in score order (ties count one half)."""
  pos_g = np.add.reduceat(w * pos, starts, axis=1)
  neg_g = np.add.reduceat(w * ~pos, starts, axis=1)
  neg_below = np.cumsum(neg_g, axis=1) - neg_g
  n_pos, n_neg = pos_g.sum(1), neg_g.sum(1)
  with np.errstate(invalid="ignore", divide="ignore"):
    auc = (pos_g * (neg_below + 0.5 * neg_g)).sum(1) / (n_pos * n_neg)
  return np.where((n_pos > 0) & (n_neg > 0), auc, np.nan)


def weighted_auc(scores, labels, weights=None) -> np.ndarray:
  """AUC of `scores` for binary `labels` under item weights [R, n] (one row per resample).

  Returns [R] (NaN where a resample has no positive or no negative weight); a 1-d result of
  length 1 when `weights` is None.
  """
  order, starts, pos = _rank(scores, labels)
  if pos.size == 0:
    return np.full(1 if weights is None else len(np.atleast_2d(weights)), np.nan)
  w = np.ones((1, pos.size)) if weights is None else np.atleast_2d(weights)[:, order]
  return _auc_ranked(starts, pos, w.astype(np.float64))


def roc_auc(scores, labels) -> Optional[float]:
  """ROC AUC, or None when labels hold only one class (AUC undefined)."""
  value = weighted_auc(scores, labels)[0]
  return None if np.isnan(value) else float(value)


def bootstrap_weights(n: int, resamples: int, seed: int, strata=None) -> np.ndarray:
  """[R, n] draw counts of `resamples` bootstrap resamples of n items (within each stratum)."""
  rng = np.random.default_rng(seed)
  strata = np.zeros(n, int) if strata is None else np.asarray(strata)
  weights = np.zeros((resamples, n))
  for value in np.unique(strata):
    members = np.flatnonzero(strata == value)
    for r in range(resamples):  # draw |members| items with replacement, count the draws
      weights[r, members] = np.bincount(rng.integers(0, members.size, members.size),
                                        minlength=members.size)
  return weights


def percentile_ci(values, level: float = 0.95) -> Optional[list]:
  values = np.asarray(values, np.float64)
  values = values[~np.isnan(values)]
  if values.size == 0:
    return None
  half = (1 - level) / 2 * 100
  return [float(np.percentile(values, half)), float(np.percentile(values, 100 - half))]


def _chunk_rows(n: int, cap: int = 100, budget: int = 5_000_000) -> int:
  """Resamples per chunk so a chunk's [R, n] float64 arrays stay near `budget` elements."""
  return max(1, min(cap, budget // max(n, 1)))


def auc_with_ci(scores, labels, resamples: int, seed: int) -> dict:
  """AUC and its stratified bootstrap 95% CI (positives and negatives resampled separately)."""
  labels = np.asarray(labels).astype(bool)
  _, starts, pos = _rank(scores, labels)
  # resampling is exchangeable within each class, so weights are drawn directly in score order
  boots = [_auc_ranked(starts, pos, bootstrap_weights(pos.size, r, seed + i, pos))
           for i, r in enumerate(_chunks(resamples, _chunk_rows(pos.size)))]
  return {"auc": roc_auc(scores, labels), "auc_ci": percentile_ci(np.concatenate(boots or [[]])),
          "bootstrap": int(resamples)}


def _chunks(total: int, size: int):
  return [min(size, total - i) for i in range(0, total, size)]


def _class_aucs(probs, labels, weights) -> np.ndarray:
  """[R, C] AUROC per class for each weight row."""
  return np.stack([weighted_auc(probs[:, c], labels[:, c], weights)
                   for c in range(labels.shape[1])], axis=1)


def _check_inputs(probs, labels, findings):
  probs, labels = np.asarray(probs, np.float64), np.asarray(labels)
  if probs.shape != labels.shape or probs.ndim != 2 or probs.shape[1] != len(findings):
    raise ValueError(f"predictions {probs.shape} and labels {labels.shape} must both be "
                     f"[N, {len(findings)}]")
  return probs, labels.astype(bool)


def utility_report(probs_by_model: dict, labels, findings: Sequence[str], *, resamples: int,
                   seed: int = 0) -> dict:
  """Per-finding and mean AUROC with bootstrap 95% CIs for each model, on the same test images.

  `probs_by_model`: {"real": [N, C], "synthetic": [N, C], ...}. A finding whose test labels have
  no positive or no negative has no AUROC: it is reported as "undefined" and left out of every
  mean (with a note). The resamples are shared by all models (paired bootstrap), so with both
  "real" and "synthetic" present the difference synthetic - real gets its own CI. Resamples in
  which a defined finding loses all its positives or negatives are dropped and counted.
  """
  checked = {name: _check_inputs(p, labels, findings) for name, p in probs_by_model.items()}
  labels = next(iter(checked.values()))[1]
  n = labels.shape[0]
  chunk = _chunk_rows(n)
  defined = np.array([0 < labels[:, c].sum() < n for c in range(labels.shape[1])])
  notes = [f"{f}: AUROC undefined (test set has {'no positives' if labels[:, c].sum() == 0 else 'no negatives'}); "
           "excluded from the mean" for c, f in enumerate(findings) if not defined[c]]
  point = {name: _class_aucs(p, labels, None)[0] for name, (p, _) in checked.items()}
  boot = {name: [] for name in checked}
  for i, r in enumerate(_chunks(resamples, chunk)):
    weights = bootstrap_weights(n, r, seed + i)
    for name, (p, _) in checked.items():
      boot[name].append(_class_aucs(p, labels, weights))
  boot = {name: np.concatenate(v) if v else np.zeros((0, len(findings))) for name, v in boot.items()}
  valid = np.all(~np.isnan(next(iter(boot.values()))[:, defined]), axis=1)
  for v in boot.values():
    valid &= np.all(~np.isnan(v[:, defined]), axis=1)

  def mean_over_defined(a):
    return a[..., defined].mean(-1) if defined.any() else np.full(a.shape[:-1], np.nan)

  report = {"findings": list(findings), "n_test": int(n), "bootstrap": int(resamples),
            "bootstrap_valid": int(valid.sum()), "defined": [bool(d) for d in defined],
            "notes": notes, "models": {}}
  for name in checked:
    per_class = {}
    for c, finding in enumerate(findings):
      per_class[finding] = ({"auroc": float(point[name][c]),
                             "ci": percentile_ci(boot[name][valid, c]),
                             "positives": int(labels[:, c].sum())}
                            if defined[c] else {"auroc": UNDEFINED, "ci": None,
                                                "positives": int(labels[:, c].sum())})
    mean = mean_over_defined(point[name])
    report["models"][name] = {
        "mean_auroc": None if np.isnan(mean) else float(mean),
        "mean_auroc_ci": percentile_ci(mean_over_defined(boot[name][valid])),
        "per_class": per_class}
  if "real" in checked and "synthetic" in checked:
    diff = mean_over_defined(point["synthetic"]) - mean_over_defined(point["real"])
    boot_diff = mean_over_defined(boot["synthetic"][valid]) - mean_over_defined(boot["real"][valid])
    report["difference"] = {"what": "mean AUROC synthetic - real (paired bootstrap)",
                            "value": None if np.isnan(diff) else float(diff),
                            "ci": percentile_ci(boot_diff)}
  return report


def as_json(obj):
  """`obj` as it reads back from JSON (tuples -> lists, numpy scalars -> Python numbers), so a
  stage returns the same value on its first run and on a rerun that reads its file."""
  def default(o):
    if isinstance(o, np.generic):
      return o.item()
    if isinstance(o, np.ndarray):
      return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o)}")
  return json.loads(json.dumps(obj, default=default))

"""Predicate singling-out (Cohen & Nissim 2020) statistics for an image release.

One predicate per audited image s: p_s(z) = [sim(s, z) >= tau] in the re-identification embedding.
- k_s: distinct training patients p_s matches; p_s *isolates* iff k_s == 1.
- weight estimate w_s: the share of holdout patients (patient-disjoint from training, drawn from
  the same population) that p_s matches, i.e. an estimate of Pr_{z~D}[p_s(z)].
- s *singles out* iff p_s isolates and w_s < weight bound (negligible weight).

Attack rate: share of released images that single out. Control rate: the same procedure with
predicates built from real holdout images instead of released ones. Those images are drawn from the
population independently of the training set, so the control rate is what isolation with a small
estimated weight gives by chance, for predicates of this very form and threshold. A control image's
weight is estimated on the holdout patients other than its own (leave-own-patient-out: its own
patient matches trivially, through the image itself), so the control predicate sees no data about
itself or the training set. Residual risk = (attack - control) / (1 - control), as in anonymeter.
"""

import dataclasses
import math
from typing import Optional

import numpy as np
from scipy import stats as scipy_stats

from pso_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Rate:
  """A binomial rate with its Wilson score interval."""
  successes: int
  n: int
  value: float        # successes / n
  center: float       # Wilson centre (the interval's midpoint)
  error: float        # Wilson half-width
  low: float
  high: float

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def wilson(successes: int, n: int, confidence: float = 0.95) -> Rate:
  """Wilson score interval: the p whose normal test at `confidence` does not reject successes/n."""
  if n <= 0:
    raise UserError("a rate needs at least one trial; the audited set is empty")
  if not 0 <= successes <= n:
    raise ValueError(f"successes={successes} outside [0, {n}]")
  z = scipy_stats.norm.ppf(0.5 + confidence / 2)
  p = successes / n
  denom = 1 + z * z / n
  center = (p + z * z / (2 * n)) / denom
  error = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
  low = 0.0 if successes == 0 else max(0.0, center - error)   # exact ends, not rounded ones
  high = 1.0 if successes == n else min(1.0, center + error)
  return Rate(int(successes), int(n), p, float(center), float(error), float(low), float(high))


def residual_risk(attack: Rate, control: Rate) -> dict:
  """(attack - control) / (1 - control) on the Wilson centres, error by first-order propagation,
  value and interval clipped to [0, 1] (anonymeter's convention)."""
  if control.center >= 1:
    return {"value": 1.0, "low": 0.0, "high": 1.0, "raw": float("nan"), "error": float("inf"),
            "warning": "control rate is 100%: the predicates match everyone, risk undefined"}
  raw = (attack.center - control.center) / (1 - control.center)
  d_attack = 1 / (1 - control.center)
  d_control = (1 - attack.center) / (1 - control.center) ** 2
  error = math.hypot(attack.error * d_attack, control.error * d_control)
  clip = lambda x: float(min(1.0, max(0.0, x)))
  return {"value": clip(raw), "low": clip(raw - error), "high": clip(raw + error), "raw": raw,
          "error": error}


def excess_p_value(attack: Rate, control: Rate) -> float:
  """One-sided p-value of "the attack rate exceeds the control's": Fisher's exact test on the two
  counts (exact when attack and control predicates are exchangeable, as without leakage)."""
  table = [[attack.successes, attack.n - attack.successes],
           [control.successes, control.n - control.successes]]
  return float(scipy_stats.fisher_exact(table, alternative="greater")[1])


def cohen_nissim_baseline(n: int, w) -> np.ndarray:
  """Probability that a fixed predicate of weight w isolates one of n i.i.d. rows."""
  w = np.asarray(w, np.float64)
  return n * w * np.exp((n - 1) * np.log1p(-np.minimum(w, 1 - 1e-300)))


def resolve_weight_bound(weight_bound: float, n_train_patients: int) -> float:
  return 1.0 / n_train_patients if weight_bound < 0 else float(weight_bound)


def singling_out(n_train_matched, n_holdout_matched, n_holdout_patients: int, weight_bound: float,
                 own_holdout_matched=None) -> dict:
  """Per-predicate isolation, weight estimate and singling-out flag.

  own_holdout_matched: for control predicates built from holdout images, whether the predicate
  matches its own patient (excluded from the weight estimate, leave-own-patient-out).
  """
  k = np.asarray(n_train_matched, np.int64)
  h = np.asarray(n_holdout_matched, np.int64)
  population = np.full(k.shape, float(n_holdout_patients))
  if own_holdout_matched is not None:
    own = np.asarray(own_holdout_matched, bool)
    h = h - own
    population -= 1
  if (population <= 0).any():
    raise UserError("the holdout needs at least two patients to estimate predicate weights")
  weight = h / population
  isolates = k == 1
  return {"isolates": isolates, "weight": weight,
          "singles_out": isolates & (weight < weight_bound)}


def summarise(attack_flags, control_flags, *, n_train_patients: int, weight_bound: float,
              risk_bound: float, confidence: float = 0.95,
              attack_isolates=None, control_isolates=None) -> dict:
  """Rates with Wilson intervals, residual risk, baseline and verdict (JSON-ready)."""
  attack_flags = np.asarray(attack_flags, bool)
  control_flags = np.asarray(control_flags, bool)
  attack = wilson(int(attack_flags.sum()), attack_flags.size, confidence)
  control = wilson(int(control_flags.sum()), control_flags.size, confidence)
  risk = residual_risk(attack, control)
  warnings = [risk["warning"]] if "warning" in risk else []
  if attack.value <= control.value:
    warnings.append("attack rate not above control: the release singles out no more often than "
                    "chance (read the intervals)")
  out = {
      "attack": attack.to_dict(), "control": control.to_dict(), "residual_risk": risk,
      "confidence": confidence, "weight_bound": weight_bound, "risk_bound": risk_bound,
      "n_train_patients": int(n_train_patients),
      "baseline_at_weight_bound": float(cohen_nissim_baseline(n_train_patients, weight_bound)),
      "verdict": "pass" if risk["high"] < risk_bound else "fail",
      "verdict_rule": f"residual-risk upper {confidence:.0%} bound < {risk_bound}",
      "p_excess": excess_p_value(attack, control),
      "warnings": warnings,
  }
  if attack_isolates is not None:
    out["attack_isolation"] = wilson(int(np.sum(attack_isolates)), attack_flags.size,
                                     confidence).to_dict()
  if control_isolates is not None:
    out["control_isolation"] = wilson(int(np.sum(control_isolates)), control_flags.size,
                                      confidence).to_dict()
  return out


def memorisation_rate(sims_to_source, tau: float, confidence: float = 0.95) -> Optional[dict]:
  """The reference's 1:1 check: each candidate against the one real image that conditioned it."""
  sims = np.asarray(sims_to_source, np.float64)
  if sims.size == 0:
    return None
  return wilson(int((sims >= tau).sum()), sims.size, confidence).to_dict()

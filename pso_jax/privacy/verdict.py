"""One verdict from several attackers, its false-alarm rate held at config.audit.test_size.

Each independent attacker contributes two one-sided tests of "the release leaks": its PSO game
(attack rate above the control's, Fisher's exact test) and its DCR test (share closer to training
above the control's, `privacy.dcr`). A release fails when any test rejects after Holm's step-down
correction over all of them: the chance that a release which does not leak fails is at most
test_size whatever the tests' dependence (Holm 1979), and the test that rejected first (the smallest
p-value) names the attacker that decided it.
"""

import numpy as np

TESTS = {"pso": "PSO attack rate above control (Fisher exact, one-sided)",
         "dcr": "DCR share closer to training above control (clustered z-test, one-sided)"}


def holm(p_values) -> np.ndarray:
  """Holm-adjusted p-values: reject H_i at level a iff adjusted p_i <= a."""
  p = np.asarray(p_values, np.float64)
  m = len(p)
  order = np.argsort(p, kind="stable")
  adjusted = np.maximum.accumulate((m - np.arange(m)) * p[order])
  out = np.empty(m)
  out[order] = np.minimum(adjusted, 1.0)
  return out


def decide(p_values: dict, test_size: float) -> dict:
  """p_values: {attacker: {test: p}} -> verdict, the tests with raw and adjusted p, decided_by."""
  rows = [{"attacker": a, "test": t, "p": float(p)}
          for a, tests in p_values.items() for t, p in tests.items()]
  adjusted = holm([r["p"] for r in rows]) if rows else np.zeros(0)
  for r, q in zip(rows, adjusted):
    r["p_holm"] = float(q)
    r["rejected"] = bool(q <= test_size)
  rejected = sorted((r for r in rows if r["rejected"]), key=lambda r: r["p"])
  return {
      "verdict": "fail" if rejected else "pass",
      "verdict_rule": (f"fail when any of {len(rows)} tests ({len(p_values)} independent "
                       f"attackers x {', '.join(TESTS)}) rejects at {test_size:g} after Holm's "
                       "correction"),
      "test_size": float(test_size), "correction": "holm", "tests": rows,
      "decided_by": dict(rejected[0]) if rejected else None,
  }

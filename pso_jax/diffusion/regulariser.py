"""In-graph diversity regulariser on the conditions of a training batch (docs/method.md §2.6).

Applied inside the jitted train step, from that step's PRNG key, to the whole global batch before
it is split into micro-batches (so the draws do not depend on device count or accumulation):
  (c) k-anonymous conditioning: with probability kanon_prob a condition is replaced by the
      normalised mean of the conditions of its k nearest training images from k distinct other
      patients (neighbours found once, before training, by `kanon_neighbours`; with
      kanon_match="findings" among the images with the same findings, as selection's cond_k);
  (b) jitter: c <- normalise(c + s * n / sqrt(d)), n ~ N(0, I_d), so s is the size of the noise
      relative to the unit-norm condition whatever the dimension d (an angle of about s rad);
  (a) dropout: with probability p the condition becomes the null condition (all zeros), so the
      same network is also its own unconditional guide at sampling time.
Each part is off when its number is 0; `enabled=False` turns all of them off.
"""

import jax
import jax.numpy as jnp
import numpy as np

from pso_jax.errors import require
from pso_jax.search import pairwise


def _normalise(x, eps=1e-12):
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def drop_conditions(cond, key, p):
  """Each row replaced by zeros with probability p."""
  keep = ~jax.random.bernoulli(key, p, cond.shape[:1])
  return jnp.where(keep[:, None], cond, jnp.zeros_like(cond))


def jitter_conditions(cond, key, scale):
  """Unit-norm rows moved by relative Gaussian noise of size `scale`, renormalised; null rows stay."""
  noise = jax.random.normal(key, cond.shape, cond.dtype) * (scale / np.sqrt(cond.shape[-1]))
  is_null = jnp.all(cond == 0, axis=-1, keepdims=True)
  return jnp.where(is_null, cond, _normalise(cond + noise))


def share_conditions(cond, kanon_cond, key, prob):
  """Each row replaced by its k-anonymous condition with probability `prob`."""
  use = jax.random.bernoulli(key, prob, cond.shape[:1])
  return jnp.where(use[:, None], kanon_cond.astype(cond.dtype), cond)


def uses_kanon(reg_config) -> bool:
  return bool(reg_config.enabled) and int(reg_config.kanon_k) > 0 and float(reg_config.kanon_prob) > 0


def regularise(cond, key, reg_config, kanon_cond=None):
  """The regularised conditions [B, d] of one global batch; `cond` None (unconditional) passes."""
  if cond is None or not reg_config.enabled:
    return cond
  k_share, k_jitter, k_drop = jax.random.split(key, 3)
  if uses_kanon(reg_config):
    require(kanon_cond is not None,
            "k-anonymous conditioning is on (config.regulariser.kanon_k > 0) but the batch has no "
            "'kanon_cond'; build it with kanon_conditions() before training")
    cond = share_conditions(cond, kanon_cond, k_share, float(reg_config.kanon_prob))
  if float(reg_config.jitter) > 0:
    cond = jitter_conditions(cond, k_jitter, float(reg_config.jitter))
  if float(reg_config.cond_dropout) > 0:
    cond = drop_conditions(cond, k_drop, float(reg_config.cond_dropout))
  return cond


# ------------------------------------------------------------------ neighbours (host, once)

def kanon_neighbours(features, patient_ids, k: int, *, block: int = 1024) -> np.ndarray:
  """[N, k] indices: per image, its nearest images from k distinct patients other than its own.

  Patients are ranked by their most similar image (inner product of the unit-norm features); the
  image's own patient never counts.
  """
  features = np.asarray(features, np.float32)
  _, pid = np.unique(np.asarray(patient_ids), return_inverse=True)
  n_patients = pid.max() + 1 if len(pid) else 0
  require(n_patients > k, f"k-anonymous conditioning needs more than k={k} patients in the train "
          f"split, which has {n_patients}; lower config.regulariser.kanon_k")
  per_patient = np.bincount(pid).max()
  # among the (k + 1) * per_patient nearest images there are always k other patients
  n_cand = int(min(len(features), (k + 1) * per_patient))
  _, cand = pairwise.knn(features, features, n_cand, query_block=block,
                         ref_block=max(block, 1024))  # exact, certified
  cand = np.asarray(cand, np.int64)
  cand_pid = pid[cand]
  order = np.argsort(cand_pid, axis=1, kind="stable")
  sorted_pid = np.take_along_axis(cand_pid, order, axis=1)
  first_sorted = np.ones_like(sorted_pid, bool)
  first_sorted[:, 1:] = sorted_pid[:, 1:] != sorted_pid[:, :-1]
  first = np.empty_like(first_sorted)
  np.put_along_axis(first, order, first_sorted, axis=1)  # first time a patient appears, by rank
  valid = first & (cand_pid != pid[:, None])
  pick = valid & (np.cumsum(valid, axis=1) <= k)
  assert (pick.sum(1) == k).all()
  return cand[pick].reshape(len(features), k)


def kanon_neighbours_by_findings(features, labels, patient_ids, k: int) -> np.ndarray:
  """[N, k] indices as `kanon_neighbours`, searched among the images with the same findings (any
  findings for a finding set fewer than k + 1 patients share): the mean then keeps the findings
  of the image it stands for while naming none of its patients."""
  features = np.asarray(features, np.float32)
  patients = np.asarray(patient_ids)
  _, group = np.unique(np.asarray(labels) > 0.5, axis=0, return_inverse=True)
  group = group.reshape(-1)
  neighbours = np.empty((len(features), k), np.int64)
  anyone = None
  for g in np.unique(group):
    rows = np.flatnonzero(group == g)
    if len(np.unique(patients[rows])) > k:
      neighbours[rows] = rows[kanon_neighbours(features[rows], patients[rows], k)]
    else:
      if anyone is None:
        anyone = kanon_neighbours(features, patients, k)
      neighbours[rows] = anyone[rows]
  return neighbours


def kanon_conditions(features, neighbours) -> np.ndarray:
  """[N, d] normalised means of the neighbours' conditions."""
  mean = np.asarray(features, np.float32)[neighbours].mean(axis=1)
  return mean / np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12)

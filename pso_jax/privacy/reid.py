"""Re-identification embedder: loss, threshold calibration, and the trained model for inference.

Embeddings are unit-norm, so the similarity of two images is their dot product and "same
patient" is the predicate sim >= tau. tau is calibrated on patient-disjoint validation pairs:
  - "fpr": the lowest threshold whose false-positive rate over the different-patient pairs is at
    most config.reid.target_fpr;
  - "prob05": the reference's rule: a logistic calibration p(same | sim) fitted on class-balanced
    validation pairs (the reference's pairs are balanced 1:1), tau where p = 0.5.
"""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from pso_jax import io_utils
from pso_jax.errors import UserError
from pso_jax.models import cnn
from pso_jax.models.batched_apply import FrozenNetwork, check_images
from pso_jax.training import augment, supervised

TAU_MODES = ("fpr", "prob05")
SUBDIR = "reid"
RESULT_FILE = "reid.json"
PATIENTS_FILE = "patients.txt"  # the patients a model was trained on, one per line


def supcon_loss(z, labels, temperature: float):
  """Supervised contrastive loss (Khosla et al. 2020) over unit-norm embeddings z [B, d].

  Every image is an anchor; the other scans of its patient in the batch are its positives, all
  other images the contrast set. Anchors without a positive are left out of the mean.
  """
  b = z.shape[0]
  logits = (z @ z.T) / temperature
  self_mask = jnp.eye(b, dtype=bool)
  logits = jnp.where(self_mask, -jnp.inf, logits)
  log_prob = logits - jax.nn.logsumexp(logits, axis=1, keepdims=True)
  positive = (labels[:, None] == labels[None, :]) & ~self_mask
  n_pos = positive.sum(1)
  per_anchor = -jnp.where(positive, log_prob, 0.0).sum(1) / jnp.maximum(n_pos, 1)
  has_pos = n_pos > 0
  loss = jnp.sum(jnp.where(has_pos, per_anchor, 0.0)) / jnp.maximum(has_pos.sum(), 1)
  # share of anchors whose most similar other image is a scan of the same patient
  nearest = jnp.argmax(jnp.where(self_mask, -jnp.inf, z @ z.T), axis=1)
  top1 = jnp.mean((labels[nearest] == labels).astype(jnp.float32))
  return loss, {"top1": top1}


# ------------------------------------------------------------------ pairs and calibration

PAIR_CHUNK = 1 << 18  # pairs whose indices and gathered embeddings are held at a time


def _all_pairs(n: int, chunk: int):
  """Every (i < j) of n items in np.triu_indices' order, as blocks of whole rows of about `chunk`
  pairs (one row more when a single row is longer)."""
  r = 0
  while r < n - 1:
    counts = n - 1 - np.arange(r, n - 1)
    rows = max(1, int(np.searchsorted(np.cumsum(counts), chunk, side="right")))
    counts = counts[:rows]
    i = np.repeat(np.arange(r, r + rows), counts)
    j = i + 1 + np.arange(i.size) - np.repeat(np.cumsum(counts) - counts, counts)
    yield i, j
    r += rows


def _negative_keys(inverse, n_neg: int, rng, block: int = PAIR_CHUNK) -> np.ndarray:
  """n_neg different-patient pairs drawn uniformly (2 n_neg draws, the same-patient ones and the
  repeats dropped), each as one int64 key min * n + max. Sorted, the keys are in the order of the
  (min, max) columns np.unique(axis=1) gives; kept a block of draws at a time, the pairs'
  temporaries stay a few blocks instead of four arrays of all draws."""
  n = len(inverse)
  draws = rng.integers(0, n, (2, 2 * n_neg))
  keys = []
  for s in range(0, draws.shape[1], block):
    a, b = draws[:, s:s + block]
    keep = inverse[a] != inverse[b]
    a, b = a[keep], b[keep]
    keys.append(np.minimum(a, b) * n + np.maximum(a, b))
  del draws, a, b
  key = np.concatenate(keys)
  del keys
  key.sort()
  key = key[np.r_[True, key[1:] != key[:-1]]]  # np.unique's values, without its copy
  return key[rng.permutation(key.size)[:n_neg]]


def _sampled_pairs(inverse, max_pairs: int, seed: int, chunk: int):
  """Every same-patient pair, then uniformly drawn different-patient pairs up to max_pairs, as
  blocks (i, j) of about `chunk` pairs."""
  n = len(inverse)
  order = np.argsort(inverse, kind="stable")
  bounds = np.flatnonzero(np.r_[True, inverse[order][1:] != inverse[order][:-1], True])
  pos_i, pos_j = [], []
  for lo, hi in zip(bounds[:-1], bounds[1:]):  # every pair within each patient's scans
    a, b = np.triu_indices(hi - lo, 1)
    pos_i.append(order[lo:hi][a])
    pos_j.append(order[lo:hi][b])
  pos_i, pos_j = np.concatenate(pos_i), np.concatenate(pos_j)
  key = _negative_keys(inverse, max(max_pairs - len(pos_i), 1), np.random.default_rng(seed))
  for s in range(0, len(pos_i), chunk):
    yield pos_i[s:s + chunk], pos_j[s:s + chunk]
  for s in range(0, len(key), chunk):
    yield key[s:s + chunk] // n, key[s:s + chunk] % n


def pair_chunks(patients, max_pairs: int, seed: int = 0, chunk: int = PAIR_CHUNK):
  """make_pairs' (i, j, same), in its order, as blocks of about `chunk` pairs: when every pair is
  taken (the pairs grow as n^2 up to max_pairs) no index array of all pairs is ever built."""
  patients = np.asarray(patients)
  n = len(patients)
  # compared as int codes: string ids gathered for up to max_pairs pairs would take 2 x 32 B each
  _, inverse = np.unique(patients, return_inverse=True)
  if n * (n - 1) // 2 <= max_pairs:
    blocks = _all_pairs(n, chunk)
  else:  # at most max_pairs plus the positives: bounded whatever n is
    blocks = _sampled_pairs(inverse, max_pairs, seed, chunk)
  for i, j in blocks:
    yield i, j, inverse[i] == inverse[j]


def make_pairs(patients, max_pairs: int, seed: int = 0):
  """(i, j, same) index pairs over one split: every pair when there are at most `max_pairs`,
  else every same-patient pair plus uniformly drawn different-patient pairs up to `max_pairs`."""
  blocks = list(pair_chunks(patients, max_pairs, seed))
  if not blocks:
    return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, bool)
  return tuple(np.concatenate(parts) for parts in zip(*blocks))


def pair_similarities(embeddings, i, j, chunk: int = PAIR_CHUNK) -> np.ndarray:
  e = np.asarray(embeddings, np.float32)
  return np.concatenate([np.einsum("nd,nd->n", e[i[s:s + chunk]], e[j[s:s + chunk]])
                         for s in range(0, len(i), chunk)] or [np.zeros(0, np.float32)])


def pair_table(embeddings, patients, max_pairs: int, seed: int = 0, chunk: int = PAIR_CHUNK):
  """(sims float32, same bool) of make_pairs' pairs, the same values in the same order, computed a
  block of pairs at a time: what is held for the split is 5 bytes per pair (at most max_pairs
  plus the positives), not the 16 more of two int64 indices per pair."""
  e = np.asarray(embeddings, np.float32)
  sims, same = [], []
  for i, j, s in pair_chunks(patients, max_pairs, seed, chunk):
    sims.append(pair_similarities(e, i, j, chunk))
    same.append(s)
  if not sims:
    return np.zeros(0, np.float32), np.zeros(0, bool)
  return np.concatenate(sims), np.concatenate(same)


TAU_MARGIN = 1e-5  # above float32 summation-order noise of a d <= 2048 dot product


def tau_at_fpr(negative_sims, target_fpr: float) -> float:
  """Threshold t with mean(negative_sims >= t) <= target_fpr, just above the highest negative
  similarity it must reject: by TAU_MARGIN (or half-way to the next higher negative when that is
  closer), so that a similarity recomputed in another summation order (the audit's kernel)
  does not cross it."""
  neg = np.sort(np.asarray(negative_sims, np.float32))[::-1]
  if neg.size == 0:
    raise UserError("no different-patient pairs to calibrate tau on; the validation split needs "
                    "at least two patients")
  allowed = int(np.floor(target_fpr * neg.size + 1e-9))
  if allowed >= neg.size:
    return float(neg[-1])
  rejected = float(neg[allowed])
  higher = neg[:allowed][neg[:allowed] > neg[allowed]]
  tau = rejected + TAU_MARGIN
  if higher.size:
    tau = min(tau, (rejected + float(higher[-1])) / 2)
  tau = np.float32(tau)
  return float(max(tau, np.nextafter(np.float32(rejected), np.float32(np.inf))))


def tau_prob05(sims, same) -> float:
  """Similarity where a class-balanced logistic fit of p(same | sim) crosses 0.5."""
  from sklearn.linear_model import LogisticRegression
  same = np.asarray(same, bool)
  if same.all() or not same.any():
    raise UserError("prob05 calibration needs both same- and different-patient validation pairs")
  fit = LogisticRegression(C=1e6, class_weight="balanced", max_iter=1000)
  fit.fit(np.asarray(sims, np.float64)[:, None], same)
  slope, intercept = float(fit.coef_[0, 0]), float(fit.intercept_[0])
  if slope <= 0:
    raise UserError("the re-id model does not separate patients on the validation pairs (similarity "
                    "falls with same-patient probability); train it longer (config.reid.steps)")
  return float(np.float32(-intercept / slope))


def rates_at(sims, same, tau: float) -> dict:
  """TPR and FPR of the predicate sim >= tau."""
  sims, same = np.asarray(sims, np.float32), np.asarray(same, bool)
  hit = sims >= np.float32(tau)
  return {"tpr": float(hit[same].mean()) if same.any() else None,
          "fpr": float(hit[~same].mean()) if (~same).any() else None}


def calibrate_tau(sims, same, mode: str, target_fpr: float) -> float:
  if mode == "fpr":
    return tau_at_fpr(np.asarray(sims)[~np.asarray(same, bool)], target_fpr)
  if mode == "prob05":
    return tau_prob05(sims, same)
  raise UserError(f"config.reid.tau_mode must be one of {TAU_MODES}, got {mode!r}")


# ------------------------------------------------------------------ the trained model

def shift_stack(x, shifts: int):
  """[N, H, W, C] -> [(2 shifts + 1)^2, N, H, W, C]: x moved by every whole-pixel (dy, dx) in
  [-shifts, shifts]^2, the gap filled by repeating the border (as augment.random_translate)."""
  if shifts <= 0:
    return x[None]
  side = range(2 * shifts + 1)
  offsets = np.array([(oy, ox) for oy in side for ox in side], np.int32)  # [K, 2]
  return augment.shifted_windows(x, shifts, "edge",
                                 np.broadcast_to(offsets[:, None], (len(offsets), x.shape[0], 2)))


def embed_images(model, variables, images, spec: cnn.CnnSpec, shifts: int = 0):
  """Unit-norm embeddings of uint8 images; with shifts > 0, the normalised mean of the embeddings
  of every whole-pixel shift of the image up to `shifts` data pixels. The net sees images
  downsampled and strided, so a 1-px shift is a sub-pixel phase change it is not invariant to;
  averaging over the phases makes a shifted copy share most of its terms with the original."""
  stack = shift_stack(images, shifts)
  n = stack.shape[0] * stack.shape[1]
  z = model.apply(variables, cnn.preprocess(stack.reshape((n,) + stack.shape[2:]), spec),
                  train=False)
  if shifts <= 0:
    return z
  z = jnp.mean(z.reshape(stack.shape[:2] + z.shape[1:]), axis=0)
  return cnn.unit_norm(z)


@dataclasses.dataclass
class ReidModel:
  """A trained embedder: `.embed(images_uint8 NHWC) -> [N, d] unit-norm float32`, `.tau`.
  embed_shifts > 0: embeddings averaged over whole-pixel shifts (`embed_images`)."""
  spec: cnn.CnnSpec
  variables: dict
  tau: float
  batch_size: int = 256
  embed_shifts: int = 0

  def __post_init__(self):
    model, spec, shifts = cnn.build_cnn(self.spec), self.spec, int(self.embed_shifts)
    # weights as an argument, not a closure: big nets would otherwise be baked into the program
    self._embed = FrozenNetwork(lambda v, x: embed_images(model, v, x, spec, shifts),
                                self.variables, batch_size=self.batch_size)

  @property
  def embed_dim(self) -> int:
    return self.spec.out_dim

  def embed(self, images) -> np.ndarray:
    return self._embed(check_images(images, self.spec.channels, "re-id model")).astype(np.float32)


def checkpoint_dir(out_dir: str) -> str:
  return os.path.join(out_dir, "checkpoint")


def load_reid(workdir: str, subdir: str = SUBDIR) -> ReidModel:
  out_dir = os.path.join(workdir, subdir)
  path = os.path.join(out_dir, RESULT_FILE)
  if not os.path.exists(os.path.join(out_dir, "COMPLETE")) or not os.path.exists(path):
    raise UserError(f"no trained re-identification model in {out_dir!r}; run "
                    "--mode=train_reid first")
  result = io_utils.read_json(path)
  spec = cnn.CnnSpec.from_dict(result["model"])
  abstract = jax.eval_shape(lambda: cnn.init_cnn(spec, jax.random.key(0)))
  variables = supervised.restore_variables(checkpoint_dir(out_dir), abstract)
  return ReidModel(spec=spec, variables=variables, tau=float(result["tau"]),
                   embed_shifts=int(result.get("embed_shifts", 0)))

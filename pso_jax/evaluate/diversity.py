"""Diversity of a synthetic set in a feature space: image retrieval score and Fréchet distance.

Image retrieval score: every query image retrieves its nearest training image (cosine similarity,
the exact all-pairs kernel with k = 1); the score is the share of distinct training images
retrieved. A set that covers the data retrieves many distinct images; a collapsed or memorising set
retrieves the same few. Real held-out images of the same count give the reference score, so the
ratio synthetic / real reads as "share of the real data's diversity reached".
"""

from typing import Optional

import numpy as np

from pso_jax.search import pairwise
from pso_jax.errors import UserError


def _unit(x: np.ndarray) -> np.ndarray:
  n = np.linalg.norm(x, axis=1, keepdims=True)
  if (n == 0).any():
    raise UserError("a feature vector is all zeros; cosine retrieval needs non-zero features")
  return (x / n).astype(np.float32)


def retrieved_share(queries, train, *, mesh=None, query_block: int = 1024,
                    ref_block: int = 16384) -> dict:
  """Share of distinct training images that are some query's nearest neighbour."""
  queries = _unit(pairwise.check_embeddings("query features", queries))
  train = _unit(pairwise.check_embeddings("training features", train, queries.shape[1]))
  _, idx = pairwise.knn(queries, train, 1, mesh=mesh, query_block=query_block, ref_block=ref_block)
  distinct = len(np.unique(idx[:, 0]))
  n, m = len(queries), len(train)
  return {"distinct": distinct, "n_queries": n, "n_train": m, "share": distinct / m,
          # distinct images that n uniformly random retrievals would hit (context, not a target)
          "uniform_share": float(1 - np.exp(n * np.log1p(-1 / m))) if m > 1 else 1.0}


def image_retrieval_score(synthetic, train, real=None, *, seed: int = 0, mesh=None,
                          query_block: int = 1024, ref_block: int = 16384) -> dict:
  """Retrieval shares of the synthetic set and (optionally) of real held-out images, with their
  ratio. Both query sets are subsampled to the same size so the shares compare."""
  synthetic, train = np.asarray(synthetic), np.asarray(train)
  out = {}
  if real is not None:
    real = np.asarray(real)
    n = min(len(synthetic), len(real))
    if n == 0:
      raise UserError("image retrieval score: the synthetic or real query set is empty")
    rng = np.random.default_rng(seed)
    pick = lambda x: x[np.sort(rng.choice(len(x), n, replace=False))]
    synthetic, real = pick(synthetic), pick(real)
  kw = dict(mesh=mesh, query_block=query_block, ref_block=ref_block)
  out["synthetic"] = retrieved_share(synthetic, train, **kw)
  if real is not None:
    out["real"] = retrieved_share(real, train, **kw)
    out["ratio"] = out["synthetic"]["share"] / max(out["real"]["share"], 1e-12)
  return out


def _mean_cov(x: np.ndarray):
  x = np.asarray(x, np.float64)
  if x.ndim != 2 or len(x) < 2:
    raise UserError(f"Fréchet distance needs at least 2 feature vectors [n, d], got {x.shape}")
  if not np.isfinite(x).all():
    raise UserError("Fréchet distance: features contain NaN/Inf")
  mu = x.mean(0)
  xc = x - mu
  return mu, xc.T @ xc / (len(x) - 1)


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
  w, v = np.linalg.eigh(s)
  return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(a, b) -> float:
  """|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) of Gaussians fitted to two feature sets.

  Tr((S_a S_b)^(1/2)) = Tr((S_a^(1/2) S_b S_a^(1/2))^(1/2)): the second matrix is symmetric PSD,
  so both roots come from eigendecompositions (no complex parts, no failing sqrtm).
  """
  mu_a, s_a = _mean_cov(a)
  mu_b, s_b = _mean_cov(b)
  if mu_a.shape != mu_b.shape:
    raise UserError(f"Fréchet distance: feature dimensions differ ({mu_a.size} vs {mu_b.size})")
  root_a = _psd_sqrt(s_a)
  cross = np.linalg.eigvalsh(root_a @ s_b @ root_a)
  trace_root = float(np.sqrt(np.clip(cross, 0, None)).sum())
  return float(np.sum((mu_a - mu_b) ** 2) + np.trace(s_a) + np.trace(s_b) - 2 * trace_root)


def diversity_report(synthetic, train, real: Optional[np.ndarray] = None, *, seed: int = 0,
                     mesh=None, query_block: int = 1024, ref_block: int = 16384) -> dict:
  """IRS (synthetic, real, ratio) and Fréchet distances to the training features."""
  out = {"image_retrieval": image_retrieval_score(synthetic, train, real, seed=seed, mesh=mesh,
                                                  query_block=query_block, ref_block=ref_block),
         "frechet_synthetic_train": frechet_distance(synthetic, train)}
  if real is not None:
    out["frechet_real_train"] = frechet_distance(real, train)
  return out

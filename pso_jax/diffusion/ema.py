"""Power-function EMA (EDM2, Karras et al. 2024) and its post-hoc reconstruction.

An EMA with exponent gamma averages the training trajectory with the profile
p_t(tau) = (gamma+1) tau^gamma / t^(gamma+1) on [0, t] (tau = images seen). Its relative width
std = sqrt((gamma+1) / ((gamma+2)^2 (gamma+3))) is what configs name (0.05, 0.10). Snapshots of a
few tracked EMAs at a few times can be linearly combined into an EMA of any other width: the
least-squares fit of profiles, solved in closed form since profiles are powers of tau.

`phema_init` / `phema_update` are pure pytree functions for the jitted train step; the post-hoc
functions are numpy on host.
"""

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def std_to_gamma(std: float) -> float:
  """Exponent whose profile has relative width `std` (the positive root of EDM2's cubic)."""
  std = float(std)
  inv2 = std ** -2 if std > 0 else np.inf
  roots = np.roots([1.0, 7.0, 16.0 - inv2, 12.0 - inv2]) if std > 0 else np.zeros(1)
  gamma = float(roots[np.abs(roots.imag) < 1e-8].real.max())
  if not gamma > -1:
    raise ValueError(f"EMA width std={std} has no power-function profile; use 0 < std < 0.28")
  return gamma


def gamma_to_std(gamma: float) -> float:
  gamma = float(gamma)
  return float(np.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))))


def phema_init(params, stds: Sequence[float]) -> tuple:
  """One fp32 copy of `params` per width, in the order of `stds`."""
  return tuple(jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), params) for _ in stds)


def phema_update(ema: tuple, params, cur_nimg, batch_size, stds: Sequence[float]) -> tuple:
  """One EMA step after the optimizer update; `cur_nimg` counts images seen including this batch.

  beta = (1 - batch/cur_nimg)^(gamma+1), ema <- ema + (1 - beta) (params - ema); the first step
  (cur_nimg == batch) copies the params. `cur_nimg` may be traced.
  """
  ratio = jnp.asarray(batch_size, jnp.float32) / jnp.asarray(cur_nimg, jnp.float32)
  out = []
  for tree, std in zip(ema, stds):
    # 1 - beta via log1p/expm1: stays accurate when batch << cur_nimg
    rate = -jnp.expm1((std_to_gamma(std) + 1) * jnp.log1p(-ratio))
    out.append(jax.tree.map(lambda e, p, r=rate: e + r * (p.astype(jnp.float32) - e), tree, params))
  return tuple(out)


def profile_inner_products(a_nimg, a_std, b_nimg, b_std) -> np.ndarray:
  """<p_a, p_b> = integral of the two profiles' product, for all pairs (broadcast a over rows).

  For exponents ga, gb and ends ta, tb:
  (ga+1)(gb+1) min(ta,tb)^(ga+gb+1) / ((ga+gb+1) ta^(ga+1) tb^(gb+1)).
  """
  ta = np.asarray(a_nimg, np.float64).reshape(-1, 1)
  tb = np.asarray(b_nimg, np.float64).reshape(1, -1)
  ga = np.asarray([std_to_gamma(s) for s in np.ravel(a_std)]).reshape(-1, 1)
  gb = np.asarray([std_to_gamma(s) for s in np.ravel(b_std)]).reshape(1, -1)
  t_min = np.minimum(ta, tb)
  # computed in logs: the powers overflow for long runs
  log = (np.log(ga + 1) + np.log(gb + 1) - np.log(ga + gb + 1) + (ga + gb + 1) * np.log(t_min)
         - (ga + 1) * np.log(ta) - (gb + 1) * np.log(tb))
  return np.exp(log)


def solve_posthoc_coefficients(in_nimg, in_std, out_nimg, out_std) -> np.ndarray:
  """Weights [n_in, n_out]: column j combines the snapshot profiles (in_nimg[i], in_std[i]) into
  the least-squares best approximation of profile (out_nimg[j], out_std[j]); columns sum to 1."""
  in_nimg, in_std = np.broadcast_arrays(np.ravel(in_nimg), np.ravel(in_std))
  out_nimg, out_std = np.broadcast_arrays(np.ravel(out_nimg), np.ravel(out_std))
  gram = profile_inner_products(in_nimg, in_std, in_nimg, in_std)
  cross = profile_inner_products(in_nimg, in_std, out_nimg, out_std)
  # rescale rows/cols to unit diagonal: the Gram matrix spans many orders of magnitude
  scale = 1 / np.sqrt(np.diag(gram))
  x = np.linalg.lstsq(gram * scale[:, None] * scale[None, :], cross * scale[:, None], rcond=None)[0]
  x = x * scale[:, None]
  return x / np.sum(x, axis=0, keepdims=True)


def reconstruct_posthoc(snapshots: Sequence[tuple], target_std: float, target_nimg=None):
  """EMA of width `target_std` at `target_nimg` (default: the last snapshot's) from snapshots.

  `snapshots`: sequence of (nimg, std, params pytree). Returns the weighted sum (fp32 pytree).
  """
  if not snapshots:
    raise ValueError("post-hoc EMA needs at least one snapshot")
  nimg = np.array([s[0] for s in snapshots], np.float64)
  stds = np.array([s[1] for s in snapshots], np.float64)
  target_nimg = nimg.max() if target_nimg is None else float(target_nimg)
  weights = solve_posthoc_coefficients(nimg, stds, target_nimg, target_std)[:, 0]
  trees = [s[2] for s in snapshots]
  return jax.tree.map(
      lambda *leaves: sum(float(w) * np.asarray(l, np.float64) for w, l in zip(weights, leaves))
      .astype(np.float32), *trees)

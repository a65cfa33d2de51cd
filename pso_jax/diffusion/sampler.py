"""EDM Heun sampler with guidance, jitted over a whole batch and all steps.

`heun_sample` is the pure ODE solver over any denoise function. `GuidedSampler` binds it to network
variables: one compiled function per (guided or not) at a fixed batch size, the batch split over
the mesh's 'data' (and 'fsdp') axes, noise drawn per candidate from `fold_in(key, seed)` so that a
candidate's image depends only on its seed, never on the batch it shares or on the device count.
"""

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from pso_jax import parallel
from pso_jax.models.batched_apply import bucket_size

DenoiseFn = Callable[[jax.Array, jax.Array, Any], jax.Array]  # (x, sigma [B], cond) -> D(x)


def edm_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float) -> np.ndarray:
  """Karras et al. (2022) noise levels, `steps` of them from sigma_max to sigma_min, then 0."""
  if steps < 1:
    raise ValueError(f"steps must be >= 1, got {steps}")
  ramp = np.arange(steps, dtype=np.float64) / max(steps - 1, 1)
  inv = 1.0 / rho
  sigmas = (sigma_max ** inv + ramp * (sigma_min ** inv - sigma_max ** inv)) ** rho
  return np.append(sigmas, 0.0).astype(np.float32)


def evaluations_per_candidate(steps: int, guided: bool) -> int:
  """Network evaluations for one image: Heun has 2 per step except the last (Euler to sigma 0)."""
  return (2 * steps - 1) * (2 if guided else 1)


def guided_denoiser(denoise_fn: DenoiseFn, ref_denoise_fn: Optional[DenoiseFn],
                    guidance) -> DenoiseFn:
  """D = D_ref + g (D_cond - D_ref); without a reference network it is D_cond itself."""
  if ref_denoise_fn is None:
    return denoise_fn

  def denoise(x, sigma, cond):
    d_cond = denoise_fn(x, sigma, cond)
    d_ref = ref_denoise_fn(x, sigma, cond)
    g = jnp.reshape(jnp.asarray(guidance, d_cond.dtype), (-1,) + (1,) * (d_cond.ndim - 1))
    return d_ref + g * (d_cond - d_ref)

  return denoise


def heun_sample(denoise_fn: DenoiseFn, noise: jax.Array, cond, *, steps: int, sigma_min: float,
                sigma_max: float, rho: float, guidance=1.0,
                ref_denoise_fn: Optional[DenoiseFn] = None) -> jax.Array:
  """Solves the probability-flow ODE from `noise * sigma_max` to sigma 0 (deterministic Heun).

  noise: standard normal [B, H, W, C]; cond: whatever denoise_fn takes; guidance: scalar or [B].
  A python guidance of exactly 1 skips the reference network (no extra evaluations).
  """
  if isinstance(guidance, (int, float)) and guidance == 1.0:
    ref_denoise_fn = None
  denoise = guided_denoiser(denoise_fn, ref_denoise_fn, guidance)
  sigmas = jnp.asarray(edm_sigmas(steps, sigma_min, sigma_max, rho))
  batch = noise.shape[0]

  def d_dt(x, t):  # dx/dsigma of the probability-flow ODE
    return (x - denoise(x, jnp.full((batch,), t, x.dtype), cond)) / t

  def heun_step(i, x):
    t_cur, t_next = sigmas[i], sigmas[i + 1]
    slope = d_dt(x, t_cur)
    x_euler = x + (t_next - t_cur) * slope
    return x + (t_next - t_cur) * 0.5 * (slope + d_dt(x_euler, t_next))

  x = noise.astype(jnp.float32) * sigmas[0]
  x = jax.lax.fori_loop(0, steps - 1, heun_step, x)
  # Last step: an Euler step to sigma 0 is exactly the denoiser output (no 2nd-order correction).
  return denoise(x, jnp.full((batch,), sigmas[steps - 1], x.dtype), cond)


def candidate_noise(key: jax.Array, seeds: jax.Array, shape) -> jax.Array:
  """Standard normal noise [B, *shape]; row i is a function of (key, seeds[i]) only."""
  return jax.vmap(lambda s: jax.random.normal(jax.random.fold_in(key, s), tuple(shape)))(seeds)


@dataclasses.dataclass(frozen=True)
class Denoiser:
  """A network bound to its variables: apply(variables, x, sigma, cond) -> D(x)."""
  apply: Callable[[Any, jax.Array, jax.Array, Any], jax.Array]
  variables: Any


def flax_denoiser(model, variables) -> Denoiser:
  """Wraps a `Precond` module: an empty condition ([B, 0]) means an unconditional network."""
  def apply(v, x, sigma, cond):
    cond = None if cond is None or cond.shape[-1] == 0 else cond
    return model.apply(v, x, sigma, cond, train=False)[0].astype(jnp.float32)
  return Denoiser(apply, variables)


def null_condition_guide(net: Denoiser) -> Denoiser:
  """The same network with the null (all-zero) condition: guide of a condition-dropout model."""
  def apply(v, x, sigma, cond):
    return net.apply(v, x, sigma, jnp.zeros_like(cond))
  return Denoiser(apply, net.variables)


def unconditional_guide(net: Denoiser) -> Denoiser:
  """A separately trained unconditional network: it never sees the condition."""
  def apply(v, x, sigma, cond):
    return net.apply(v, x, sigma, None)
  return Denoiser(apply, net.variables)


class GuidedSampler:
  """Samples candidates for (seed, condition, guidance) triples in fixed-size batches (a short
  last batch padded to a power-of-two size, `padded_size`).

  Usage: `GuidedSampler(net, ref, key=..., shape=(H, W, C), ...)(seeds, cond, guidance)` -> float32
  [B, H, W, C] in model space. A batch whose guidance is all exactly 1 skips the reference network.
  """

  def __init__(self, net: Denoiser, ref: Optional[Denoiser], *, key: jax.Array, shape, steps: int,
               sigma_min: float, sigma_max: float, rho: float, batch_size: int,
               mesh: Optional[jax.sharding.Mesh] = None):
    self.net, self.ref, self.key, self.shape = net, ref, key, tuple(shape)
    self.steps = steps
    self.mesh = mesh if mesh is not None else parallel.data_mesh()
    shards = parallel.batch_shards(self.mesh)
    self.batch_size = -(-max(batch_size, 1) // shards) * shards  # a multiple of the batch shards
    self._schedule = dict(steps=steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho)
    self._compiled = {}
    self.evaluations = 0  # network evaluations per image actually run (for throughput figures)

  def _function(self, guided: bool):
    if guided not in self._compiled:
      net, ref, shape, schedule = self.net, self.ref, self.shape, self._schedule
      out_sharding = parallel.batch_sharding(self.mesh)

      def sample(variables, ref_variables, key, seeds, cond, guidance):
        noise = jax.lax.with_sharding_constraint(candidate_noise(key, seeds, shape), out_sharding)
        denoise = lambda x, s, c: net.apply(variables, x, s, c)
        ref_denoise = (lambda x, s, c: ref.apply(ref_variables, x, s, c)) if guided else None
        return heun_sample(denoise, noise, cond, guidance=guidance, ref_denoise_fn=ref_denoise,
                           **schedule)

      self._compiled[guided] = jax.jit(sample, out_shardings=out_sharding,
                                       compiler_options=parallel.compiler_options(self.mesh))
    return self._compiled[guided]

  def padded_size(self, rows: int) -> int:
    """The batch `rows` candidates run at (`batched_apply.bucket_size`): selection's later rounds
    retry a few images each, and padding those to the full batch ran the demo's select stage
    at ~40% useful slots."""
    return bucket_size(rows, parallel.batch_shards(self.mesh), self.batch_size)

  def _arguments(self, seeds, cond, guidance):
    ref_variables = self.ref.variables if self.ref is not None else None
    batch = parallel.host_to_global((seeds, cond, guidance), parallel.batch_sharding(self.mesh))
    return (self.net.variables, ref_variables, self.key, *batch)

  def __call__(self, seeds, cond, guidance) -> np.ndarray:
    seeds = np.asarray(seeds, np.uint32)
    n = len(seeds)
    cond = np.asarray(cond, np.float32)
    cond = cond.reshape(n, -1) if cond.size else np.zeros((n, 0), np.float32)
    guidance = np.broadcast_to(np.asarray(guidance, np.float32), (n,))
    guided = self.ref is not None and bool(np.any(guidance != 1.0))
    if not guided and np.any(guidance != 1.0):
      raise ValueError("guidance != 1 needs a reference (guide) network")
    out = []
    for start in range(0, n, self.batch_size):
      stop = min(start + self.batch_size, n)
      pad = self.padded_size(stop - start) - (stop - start)
      padded = [np.concatenate([a[start:stop], np.repeat(a[stop - 1:stop], pad, axis=0)])
                for a in (seeds, cond, guidance)]
      result = self._function(guided)(*self._arguments(*padded))
      out.append(parallel.to_host(result)[:stop - start])
      self.evaluations += (stop - start) * evaluations_per_candidate(self.steps, guided)
    if not out:
      return np.zeros((0,) + self.shape, np.float32)
    return np.concatenate(out)

"""SD-VAE encode/decode throughput at the reference size, against this machine's matmul rate.

  python -m pso_jax.bench vae [--size=512] [--batch=1] [--reps=2]

Random weights in the real SD KL-f8 configuration (128/256/512/512 channels, 2 layers per block,
32 groups, 4 latent channels). Prints images/s, the FLOP rate XLA's cost model implies, and that
rate as a share of an n x n matmul measured in the same run.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from pso_jax.training.matmul_rate import matmul_gflops
from pso_jax.models import sd_vae, weights

SD_CONFIG = sd_vae.VAEConfig()  # the defaults are stabilityai/stable-diffusion-2 vae/config.json


def random_variables(model, seed: int = 0):
  rng = np.random.default_rng(seed)
  flat = {k: jnp.asarray(rng.standard_normal(v.shape, np.float32) * (0.02 if len(v.shape) > 1 else 1.0))
          for k, v in weights.flatten(sd_vae.abstract_variables(model)).items()}
  return weights.unflatten(flat)


def time_fn(fn, args, reps: int) -> tuple[float, float]:
  """(best seconds per call, XLA-estimated FLOPs per call)."""
  compiled = jax.jit(fn).lower(*args).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float((cost or {}).get("flops", float("nan")))
  jax.block_until_ready(compiled(*args))
  best = float("inf")
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    best = min(best, time.perf_counter() - t)
  return best, flops


def main(argv):
  parser = argparse.ArgumentParser(prog="python -m pso_jax.bench vae")
  parser.add_argument("--size", type=int, default=512)
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--reps", type=int, default=2)
  parser.add_argument("--matmul_n", type=int, default=2048)
  args = parser.parse_args(argv[1:])
  model = sd_vae.AutoencoderKL(SD_CONFIG)
  variables = random_variables(model)
  x = jax.random.uniform(jax.random.key(1), (args.batch, args.size, args.size, 3))
  f = SD_CONFIG.downsample_factor
  z = jax.random.normal(jax.random.key(2), (args.batch, args.size // f, args.size // f, 4))
  enc_s, enc_flops = time_fn(lambda v, x: model.apply(v, x, method=model.encode), (variables, x), args.reps)
  dec_s, dec_flops = time_fn(lambda v, z: model.apply(v, z, method=model.decode), (variables, z), args.reps)
  ref = matmul_gflops(args.matmul_n)
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, SD VAE {args.size}x{args.size}, "
        f"batch {args.batch}, best of {args.reps}")
  print(f"matmul reference: {ref:.1f} GFLOP/s ({args.matmul_n}^3 fp32)")
  for name, sec, flops in (("encode", enc_s, enc_flops), ("decode", dec_s, dec_flops)):
    rate = flops / sec / 1e9
    print(f"{name}: {args.batch / sec:.3f} images/s ({sec:.2f} s/batch), {flops / args.batch / 1e9:.0f} "
          f"GFLOP/image, {rate:.1f} GFLOP/s = {rate / ref:.2f} x matmul")

"""Sampling throughput: `python -m pso_jax.bench sample [--presets=demo,xs] [--steps=...] [--batch=...]`.

For each preset (random-init weights, null-condition guidance as in selection) prints candidates/s,
network evaluations/s and achieved GFLOP/s (XLA cost analysis of one denoiser call times the
evaluations run), and that rate as a share of the matmul rate measured in the same run.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from pso_jax import parallel
from pso_jax.bench import cxr_config
from pso_jax.training.matmul_rate import reference_gflops
from pso_jax.diffusion import sampler as S

# (config variant, preset, latent kind) of each benchmarked model: xs on SD-VAE latents 64x64x4
SETUPS = {"demo": ("demo", "demo", "identity"), "tiny": ("tiny", "tiny", "identity"),
          "xs": ("", "xs", "sd_vae")}


def _config(name: str):
  variant, preset, latent = SETUPS[name]
  config = cxr_config(variant)
  config.model.preset, config.data.latent.kind = preset, latent
  return config


def _forward_flops(model, variables, shape, cond_dim: int, batch: int) -> float:
  x = jnp.zeros((batch,) + tuple(shape), jnp.float32)
  sigma = jnp.ones((batch,), jnp.float32)
  cond = jnp.zeros((batch, cond_dim), jnp.float32) if cond_dim else None
  f = jax.jit(lambda v, x, s, c: model.apply(v, x, s, c, train=False)[0])
  cost = f.lower(variables, x, sigma, cond).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0))


def bench_preset(name: str, steps: int, batch: int, guidance: float, repeats: int) -> dict:
  from pso_jax.models.presets import build_model, cond_dim, init_variables, model_input_shape
  config = _config(name)
  model = build_model(config)
  variables = jax.jit(lambda k: init_variables(model, k, config))(jax.random.key(0))
  shape, dim = model_input_shape(config), cond_dim(config)
  net = S.flax_denoiser(model, variables)
  guided = guidance != 1.0
  sampler = S.GuidedSampler(net, S.null_condition_guide(net) if guided else None,
                            key=jax.random.key(1), shape=shape, steps=steps, sigma_min=0.002,
                            sigma_max=80.0, rho=7.0, batch_size=batch, mesh=parallel.data_mesh())
  b = sampler.batch_size
  cond = np.random.default_rng(0).normal(size=(b, dim)).astype(np.float32)
  cond /= np.maximum(np.linalg.norm(cond, axis=1, keepdims=True), 1e-12)
  sampler(np.arange(b), cond, guidance)  # compile
  best = float("inf")
  for r in range(repeats):
    start = time.perf_counter()
    sampler(np.arange(b) + (r + 1) * b, cond, guidance)
    best = min(best, time.perf_counter() - start)
  evals = b * S.evaluations_per_candidate(steps, guided)
  flops = _forward_flops(model, variables, shape, dim, b) / b * evals
  return dict(preset=name, shape=shape, batch=b, steps=steps, guided=guided,
              candidates_per_s=b / best, evaluations_per_s=evals / best,
              gflops=flops / best / 1e9, gflop_per_eval=flops / evals / 1e9)


def main(argv):
  parser = argparse.ArgumentParser(prog="python -m pso_jax.bench sample")
  parser.add_argument("--presets", default="demo,xs")
  parser.add_argument("--steps", default="demo=16,xs=2,tiny=4",
                      help="Heun steps per preset (the reference samples with 32)")
  parser.add_argument("--batch", default="demo=64,xs=1,tiny=16")
  parser.add_argument("--guidance", type=float, default=1.2)
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--matmul_n", type=int, default=2048)
  args = parser.parse_args(argv[1:])
  per = lambda spec: {k: int(v) for k, v in (p.split("=") for p in spec.split(","))}
  steps, batch = per(args.steps), per(args.batch)
  sampler_options = parallel.compiler_options(parallel.data_mesh())
  matmul = reference_gflops(args.matmul_n, compiler_options=sampler_options)
  print(f"devices: {jax.device_count()} x {jax.devices()[0].platform}; matmul {args.matmul_n}^3: "
        f"{matmul:.1f} GFLOP/s (reference, same run)")
  for name in args.presets.split(","):
    r = bench_preset(name, steps.get(name, 4), batch.get(name, 8), args.guidance, args.repeats)
    print(f"{name:5s} {str(r['shape']):13s} batch {r['batch']:3d} steps {r['steps']:2d} "
          f"guided={r['guided']}: {r['candidates_per_s']:.3g} candidates/s, "
          f"{r['evaluations_per_s']:.3g} network evals/s, {r['gflop_per_eval']:.3g} GFLOP/eval, "
          f"{r['gflops']:.1f} GFLOP/s = {r['gflops'] / matmul:.2f} x matmul", flush=True)
    if name in ("demo", "xs"):
      full = r["evaluations_per_s"] / S.evaluations_per_candidate(32, r["guided"])
      print(f"      at the reference's 32 steps: {full:.3g} candidates/s")


if __name__ == "__main__":
  import sys
  main(sys.argv)

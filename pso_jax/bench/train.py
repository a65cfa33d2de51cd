"""Train-step throughput: `python -m pso_jax.bench train --preset=xs --batch=2`.

Prints images/s and the achieved GFLOP/s of the jitted train step (FLOPs from XLA's cost analysis
of the compiled step / measured time) next to the same machine's matmul GFLOP/s measured in the
same run, and their ratio. Presets: xs/s/m run at the reference 64x64x4 latents with 2048-d
pseudo-conditions; demo (32x32x1) and tiny at the phantom's pixel sizes; --channels overrides the
base width (the "tiny preset" target, 32x32 with 32 channels: --preset=demo --channels=32).

Then (--no-breakdown skips it) where the time goes: a profiler trace of a few steps, per kind of
op, and every convolution of the step rebuilt and run alone, set against the step time that 80%
and 90% of the matmul rate allow; on CPU the convolutions alone already exceed that time.
"""

import argparse
import time

import jax
import numpy as np

from pso_jax.bench import cxr_config


def _config(preset: str, batch: int, dtype: str, accum: int, channels: int = 0):
  config = cxr_config({"demo": "demo", "tiny": "tiny"}.get(preset, ""))
  config.model.preset = preset
  config.model.dtype = dtype
  config.train.batch_size = batch
  config.train.grad_accum = accum
  if channels:
    config.model.channels = channels
  return config


def compile_step(config, devices=None):
  """(run_one_step() -> seconds, info): the compiled train step on a fixed batch."""
  from pso_jax.models.presets import build_model, model_input_shape
  from pso_jax import parallel
  from pso_jax.training import metrics
  from pso_jax.diffusion import train_step as step_lib
  model = build_model(config)
  mesh = parallel.make_mesh(config.mesh, devices)
  b = int(config.train.batch_size)
  parallel.micro_batch_size(b, int(config.train.grad_accum), mesh)
  state, shardings = parallel.create_sharded(lambda k: step_lib.init_state(model, config, k), mesh,
                                             int(config.mesh.fsdp_min_size), jax.random.key(0))
  rng = np.random.default_rng(0)
  batch = {"x": rng.normal(size=(b, *model_input_shape(config))).astype(np.float32) * 0.5}
  if model.cond_dim:
    c = rng.normal(size=(b, model.cond_dim)).astype(np.float32)
    batch["cond"] = c / np.linalg.norm(c, axis=1, keepdims=True)
  batch = jax.device_put(batch, parallel.batch_sharding(mesh))
  key = jax.random.key(1)
  start = time.perf_counter()
  with jax.set_mesh(mesh):
    step = step_lib.jit_train_step(step_lib.make_train_step(model, config), shardings, mesh) \
        .lower(state, batch, key).compile()
  info = dict(compile_s=time.perf_counter() - start, gflop_per_step=metrics.compiled_flops(step, mesh.size) / 1e9,
              devices=mesh.size, batch=b, compiled=step)
  holder = [state]

  def run_one() -> float:
    start = time.perf_counter()
    holder[0], m = step(holder[0], batch, key)
    jax.block_until_ready(m)
    return time.perf_counter() - start
  run_one()  # warm-up
  return run_one, info


def main(argv):
  parser = argparse.ArgumentParser(prog="python -m pso_jax.bench train", description=__doc__)
  parser.add_argument("--preset", default="xs")
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--channels", type=int, default=0, help="override the preset's base channels")
  parser.add_argument("--grad_accum", type=int, default=1)
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--matmul_n", type=int, default=2048)
  parser.add_argument("--breakdown", action=argparse.BooleanOptionalAction, default=True,
                      help="trace a few steps and show the time per kind of op")
  args = parser.parse_args(argv[1:])

  from pso_jax.training.matmul_rate import reference_gflops
  from pso_jax.training import metrics
  from pso_jax.parallel import compiler_options, data_mesh
  config = _config(args.preset, args.batch, args.dtype, args.grad_accum, args.channels)
  device = jax.devices()[0]
  print(f"train bench: preset={args.preset} channels={config.model.channels or 'preset'} "
        f"batch={args.batch} grad_accum={args.grad_accum} "
        f"dtype={args.dtype} on {jax.device_count()} x {device.device_kind}", flush=True)
  run_one, r = compile_step(config)
  step_options = compiler_options(data_mesh(jax.devices()[:1]))
  # alternate the two measurements and keep the best of each: on a shared machine the load
  # changes from second to second, and the ratio should compare like with like
  step_s, mm = float("inf"), 0.0
  for _ in range(args.steps):
    step_s = min(step_s, run_one())
    mm = max(mm, reference_gflops(args.matmul_n, 2, step_options) * r["devices"])
  r.update(step_s=step_s, images_per_s=r["batch"] / step_s, gflops=r["gflop_per_step"] / step_s)
  print(f"  step: {r['step_s'] * 1e3:.1f} ms, {r['images_per_s']:.2f} images/s "
        f"({r['images_per_s'] / r['devices']:.2f} per device), {r['gflop_per_step']:.2f} GFLOP/step, "
        f"compile {r['compile_s']:.1f} s")
  print(f"  achieved: {r['gflops']:.1f} GFLOP/s")
  print(f"  matmul ({args.matmul_n}^3, same run): {mm:.1f} GFLOP/s")
  print(f"  ratio train/matmul: {r['gflops'] / mm:.1%}")
  peak = metrics.peak_flops_per_device(device, args.dtype)
  if peak:
    print(f"  MFU vs {device.device_kind} table peak: {r['gflops'] * 1e9 / (peak * r['devices']):.1%}")
  if args.breakdown:
    r["breakdown"] = _print_breakdown(r, run_one, mm, step_options)
  r.pop("compiled")
  return r


def _print_breakdown(r: dict, run_one, matmul_gflops: float, options) -> dict:
  """Where the step's time goes: per kind of op, the wall time with some op of the kind in
  flight (a profiler trace); then every convolution of the step run alone, against the step time
  each target ratio allows."""
  from pso_jax.bench import op_profile
  b = op_profile.breakdown(r["compiled"], run_one)
  if b["traced_ops"]:
    print(f"  wall time per step with some op of a kind in flight ({b['traced_ops']} ops traced, "
          f"{b['busy_seconds'] * 1e3:.1f} ms with any; kinds overlap):")
    for kind, row in b["kinds"].items():
      rate = (f", {row['gflops']:.1f} GFLOP/s = {row['gflops'] / matmul_gflops:.0%} of matmul"
              if row["gflops"] else "")
      print(f"    {kind:28s} {row['seconds'] * 1e3:8.1f} ms {row['share']:6.1%}{rate}")
  else:
    print("  breakdown: the profiler recorded no per-op events on this backend")
  alone = op_profile.time_convolutions(r["compiled"].as_text(), options)
  b["convolutions_alone"] = alone
  if alone["convolutions"]:
    print(f"  the step's {alone['convolutions']} convolutions ({alone['shapes']} shapes) run alone: "
          f"{alone['seconds'] * 1e3:.1f} ms, {alone['gflops']:.1f} GFLOP/s = "
          f"{alone['gflops'] / matmul_gflops:.0%} of matmul (padded taps counted)")
    for target in (0.8, 0.9):
      budget = r["gflop_per_step"] / (target * matmul_gflops)
      print(f"  at {target:.0%} of matmul the whole step may take {budget * 1e3:.1f} ms; its "
            f"convolutions alone take {alone['seconds'] / budget:.0%} of that")
  return b

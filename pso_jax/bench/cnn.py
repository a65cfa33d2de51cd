"""`python -m pso_jax.bench cnn [--variant=demo] [--steps=20]`: train-step and inference
throughput of the re-id embedder and the finding classifier, with achieved GFLOP/s against the
machine's matmul rate measured in the same run."""

import argparse
import time

import jax
import numpy as np

from pso_jax import parallel
from pso_jax.privacy import reid
from pso_jax.privacy import reid_training
from pso_jax.bench import cxr_config
from pso_jax.training.matmul_rate import matmul_gflops
from pso_jax.evaluate import classifier as classifier_lib
from pso_jax.models import cnn
from pso_jax.training import supervised


def _flops(fn, args) -> float:
  """XLA's FLOP count of one call of a jitted fn."""
  cost = fn.lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0))


def _time(fn, args, steps: int):
  """(seconds per call, flops per call) of a jitted fn, after a warm-up call."""
  out = fn(*args)
  jax.block_until_ready(out)
  start = time.perf_counter()
  for _ in range(steps):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / steps, _flops(fn, args)


def bench_one(name, section, spec, inputs_fn, loss_fn, batch, mesh, steps, ref_gflops):
  model = cnn.build_cnn(spec)
  optimizer = supervised.make_supervised_optimizer(float(section.lr))
  step = supervised.make_supervised_step(model, optimizer, inputs_fn, loss_fn, mesh)
  state = jax.device_put(supervised.create_state(cnn.init_cnn(spec, jax.random.key(0)), optimizer),
                         parallel.replicated(mesh))
  batch = parallel.host_to_global(batch, parallel.batch_sharding(mesh))
  key = jax.device_put(jax.random.key(1), parallel.replicated(mesh))
  # the step donates its state: time it on a loop that feeds the new state back
  compiled_flops = _flops(step, (state, batch, key))
  state, _ = step(state, batch, key)
  jax.block_until_ready(state)
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = step(state, batch, key)
  jax.block_until_ready(state)
  train_s = (time.perf_counter() - start) / steps
  infer = jax.jit(lambda v, x: model.apply(v, cnn.preprocess(x, spec), train=False))
  infer_s, infer_flops = _time(infer, (state.variables, batch["image"]), steps)
  n = batch["image"].shape[0]
  train_gf, infer_gf = compiled_flops / train_s / 1e9, infer_flops / infer_s / 1e9
  print(f"{name:<11} batch {n:>4} {spec.image_size:>3}px width {spec.width:>3}: "
        f"train {n / train_s:8.0f} img/s {train_gf:7.1f} GFLOP/s ({train_gf / ref_gflops:.2f}x matmul)"
        f" | embed/predict {n / infer_s:8.0f} img/s {infer_gf:7.1f} GFLOP/s "
        f"({infer_gf / ref_gflops:.2f}x matmul)")


def main(argv):
  parser = argparse.ArgumentParser(prog="python -m pso_jax.bench cnn")
  parser.add_argument("--variant", default="demo")
  parser.add_argument("--steps", type=int, default=20)
  args = parser.parse_args(argv[1:])
  config = cxr_config(args.variant)
  mesh = parallel.make_mesh(config.mesh)
  ref = matmul_gflops()
  print(f"devices: {jax.device_count()} x {jax.devices()[0].platform}; matmul reference "
        f"{ref:.1f} GFLOP/s (same run)")
  size, channels = int(config.data.image_size), int(config.data.channels)
  rng = np.random.default_rng(0)

  section = config.reid
  spec = cnn.spec_from_config(section, head="embed", out_dim=section.embed_dim, channels=channels)
  b = int(section.batch_size)
  batch = {"image": rng.integers(0, 256, (b, size, size, channels), np.uint8),
           "label": np.repeat(np.arange(b // section.scans_per_patient),
                              section.scans_per_patient).astype(np.int32)}
  bench_one("re-id", section, spec, reid_training.make_inputs_fn(section, spec),
            lambda z, bt: reid.supcon_loss(z, bt["label"], section.temperature), batch, mesh,
            args.steps, ref)

  section = config.classifier
  spec = cnn.spec_from_config(section, head="logits", out_dim=8, channels=channels)
  b = int(section.batch_size)
  batch = {"image": rng.integers(0, 256, (b, size, size, channels), np.uint8),
           "labels": (rng.random((b, 8)) < 0.2).astype(np.float32)}
  bench_one("classifier", section, spec, classifier_lib.make_inputs_fn(section, spec),
            classifier_lib.bce_loss, batch, mesh, args.steps, ref)


if __name__ == "__main__":
  import sys
  main(sys.argv)

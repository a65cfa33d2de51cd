"""One process of a 2-process jax.distributed run on 127.0.0.1 (the tests start two of these).

argv: process_id port out_json steps (tests/test_diffusion_train_step.py): each process has 4 CPU devices;
together they form one 2 x 4 mesh (data x fsdp) and train the tiny model on the same fixed global
batch as the 1-device reference.

argv: loop process_id port cache_dir workdir (tests/test_stages_train.py): each process has 2 CPU
devices (a 2 x 2 mesh, FSDP 2); the train loop resumes `workdir` (a 1-process run's checkpoint)
for 3 steps and checkpoints.
"""

import importlib.util
import json
import os
import sys
import time

LOOP = sys.argv[1:2] == ["loop"]
DEVICES = 2 if LOOP else 4
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={DEVICES}"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", DEVICES)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _tiny_config():
  spec = importlib.util.spec_from_file_location("cxr", os.path.join(ROOT, "configs", "cxr.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config("tiny")


def loop_main(process_id: int, port: int, cache: str, workdir: str) -> None:
  jax.config.update("jax_compilation_cache_dir", cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                             process_id=process_id)
  from absl import flags
  flags.FLAGS.mark_as_parsed()  # grain reads absl flags
  from pso_jax.stages import train as loop
  config = _tiny_config()
  config.train.total_images = config.train.batch_size * 12
  config.mesh.update(data=-1, fsdp=2, fsdp_min_size=64)
  assert jax.device_count() == 4 and jax.local_device_count() == 2
  start = time.time()
  summary = loop.run(config, workdir, stop_after_steps=3)  # resumes a 1-process checkpoint
  print(f"process {process_id}: steps up to {summary['steps']} in {time.time() - start:.1f} s",
        flush=True)
  jax.distributed.shutdown()


def main(process_id: int, port: int, out: str, steps: int) -> None:
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                             process_id=process_id)
  import numpy as np
  from pso_jax.models.presets import build_model, model_input_shape
  from pso_jax import parallel
  from pso_jax.diffusion import train_step as step_lib

  config = _tiny_config()
  config.mesh.update(data=2, fsdp=4, fsdp_min_size=64)
  assert jax.device_count() == 8 and jax.local_device_count() == 4

  rng = np.random.default_rng(0)  # the same global batch as tests/test_diffusion_train_step.py::_batch
  b = config.train.batch_size
  x = rng.normal(size=(b, *model_input_shape(config))).astype(np.float32) * 0.5
  cond = rng.normal(size=(b, config.data.features.dim)).astype(np.float32)
  cond /= np.linalg.norm(cond, axis=1, keepdims=True)

  model = build_model(config)
  mesh = parallel.make_mesh(config.mesh)
  state, shardings = parallel.create_sharded(lambda k: step_lib.init_state(model, config, k), mesh,
                                             config.mesh.fsdp_min_size, jax.random.key(0))
  batch = parallel.host_to_global(dict(x=x, cond=cond), parallel.batch_sharding(mesh))
  step = step_lib.jit_train_step(step_lib.make_train_step(model, config), shardings, mesh)
  losses = []
  with jax.set_mesh(mesh):
    for _ in range(steps):
      state, metrics = step(state, batch, jax.random.key(1))
      losses.append(float(metrics["loss"]))
  params = parallel.to_host(state.params)
  if process_id == 0:
    with open(out, "w") as f:
      json.dump({"losses": losses,
                 "params": [np.asarray(p).ravel().tolist() for p in jax.tree.leaves(params)]}, f)
  jax.distributed.shutdown()


if __name__ == "__main__":
  if LOOP:
    loop_main(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
  else:
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4]))

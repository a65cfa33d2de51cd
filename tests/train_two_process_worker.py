"""One process of the 2-process train-step test (tests/test_train_step.py runs two of these).

argv: process_id port out_json. Each process has 4 CPU devices; together they form one 2 x 4 mesh
(data x fsdp) and train the tiny model on the same fixed global batch as the 1-device reference.
"""

import importlib.util
import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 4)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main(process_id: int, port: int, out: str, steps: int) -> None:
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                             process_id=process_id)
  import numpy as np
  from jax.experimental import multihost_utils
  from pso_jax.models.presets import build_model, model_input_shape
  from pso_jax.training import mesh as mesh_lib, sharding, step as step_lib

  spec = importlib.util.spec_from_file_location("cxr", os.path.join(ROOT, "configs", "cxr.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("tiny")
  config.mesh.update(data=2, fsdp=4, fsdp_min_size=64)
  assert jax.device_count() == 8 and jax.local_device_count() == 4

  rng = np.random.default_rng(0)  # the same global batch as tests/test_train_step.py::_batch
  b = config.train.batch_size
  x = rng.normal(size=(b, *model_input_shape(config))).astype(np.float32) * 0.5
  cond = rng.normal(size=(b, config.data.features.dim)).astype(np.float32)
  cond /= np.linalg.norm(cond, axis=1, keepdims=True)

  model = build_model(config)
  mesh = mesh_lib.make_mesh(config.mesh)
  state, shardings = sharding.create_sharded(lambda k: step_lib.init_state(model, config, k), mesh,
                                             config.mesh.fsdp_min_size, jax.random.key(0))
  batch_sharding = mesh_lib.batch_sharding(mesh)
  batch = {k: jax.make_array_from_callback(v.shape, batch_sharding, lambda idx, v=v: v[idx])
           for k, v in dict(x=x, cond=cond).items()}
  step = step_lib.jit_train_step(step_lib.make_train_step(model, config), shardings, mesh)
  losses = []
  with jax.set_mesh(mesh):
    for _ in range(steps):
      state, metrics = step(state, batch, jax.random.key(1))
      losses.append(float(metrics["loss"]))
  params = multihost_utils.process_allgather(state.params, tiled=True)
  if process_id == 0:
    with open(out, "w") as f:
      json.dump({"losses": losses,
                 "params": [np.asarray(p).ravel().tolist() for p in jax.tree.leaves(params)]}, f)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4]))

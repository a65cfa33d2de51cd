"""The jitted train step: the same losses and weights on 1 device, 8 data-parallel devices, FSDP
and with gradient accumulation; the optimizer, forced weight normalisation and EMA against numpy."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import tolerances as T
from conftest import load_config
from pso_jax.diffusion import ema as ema_lib
from pso_jax.errors import UserError
from pso_jax.models.mp_layers import is_mp_weight
from pso_jax.models.presets import build_model, model_input_shape
from pso_jax import parallel
from pso_jax.diffusion import optim, train_step as step_lib

STEPS = 3


def _batch(config):
  rng = np.random.default_rng(0)
  b = config.train.batch_size
  x = rng.normal(size=(b, *model_input_shape(config))).astype(np.float32) * 0.5
  cond = rng.normal(size=(b, config.data.features.dim)).astype(np.float32)
  return {"x": x, "cond": cond / np.linalg.norm(cond, axis=1, keepdims=True)}


def _train(config, devices, init=None, steps=STEPS):
  """Losses of `steps` steps and the final state (host numpy) on a mesh over `devices`, from
  `init` (host state) or a state created directly sharded."""
  model = build_model(config)
  mesh = parallel.make_mesh(config.mesh, devices)
  if init is None:
    state, shardings = parallel.create_sharded(lambda k: step_lib.init_state(model, config, k),
                                               mesh, config.mesh.fsdp_min_size, jax.random.key(0))
    init = jax.device_get(state)
  else:  # one init compilation for the whole module
    shardings = parallel.state_shardings(init, mesh, config.mesh.fsdp_min_size)
    state = jax.device_put(init, shardings)
  step = step_lib.jit_train_step(step_lib.make_train_step(model, config), shardings, mesh)
  batch = jax.device_put(_batch(config), parallel.batch_sharding(mesh))
  losses, history = [], []
  with jax.set_mesh(mesh):
    for _ in range(steps):
      state, metrics = step(state, batch, jax.random.key(1))
      losses.append(float(metrics["loss"]))
      history.append(jax.device_get(state.params))
  return np.array(losses), jax.device_get(state), history, shardings, init


@pytest.fixture(scope="module")
def reference():
  config = load_config("tiny")
  config.mesh.data = 1
  return _train(config, jax.devices()[:1])


def run_rtol(config, steps=STEPS):
  """A gradient sums the batch's pixels (tolerances.training_rtol)."""
  return T.training_rtol(steps, config.train.batch_size * int(np.prod(model_input_shape(config))))


def _assert_same_run(a, b):
  """Losses to the run's rounding; weights and EMA norm-wise per leaf (after Adam single weights
  may differ by more, see assert_close_normwise)."""
  rtol = run_rtol(load_config("tiny"))
  T.assert_close(a[0], b[0], rtol)
  T.assert_close_normwise(a[1].params, b[1].params, rtol)
  T.assert_close_normwise(a[1].ema, b[1].ema, rtol)


# Each run below compiles the step once more (the slow part on CPU), so one run checks two
# layouts: FSDP on a data x fsdp = 2 x 4 mesh is also data parallel over all 8 devices, and the
# loop tests (test_stages_train.py) run plain data parallelism on 8 devices.

def test_fsdp_and_data_parallel_match_one_device(reference):
  config = load_config("tiny")
  config.mesh.update(data=2, fsdp=4, fsdp_min_size=64)
  run = _train(config, None, init=reference[4])
  specs = [s.spec for s in jax.tree.leaves(run[3].params)]
  assert any("fsdp" in spec for spec in specs)
  assert any(all(a is None for a in spec) for spec in specs)  # small leaves stay replicated
  _assert_same_run(reference, run)


def test_grad_accumulation_matches_one_device(reference):
  config = load_config("tiny")
  config.train.grad_accum = 2
  config.mesh.data = 4  # 4 devices x 2 micro-batches of 4 images
  _assert_same_run(reference, _train(config, jax.devices()[:4], init=reference[4]))


def test_step_invariants(reference):
  losses, state, history = reference[:3]
  assert np.all(np.isfinite(losses)) and int(state.step) == STEPS
  # forced weight normalisation: every stored MP weight row (output unit) has RMS 1
  for path, w in jax.tree_util.tree_leaves_with_path(state.params):
    if is_mp_weight(path):
      rms = np.sqrt(np.mean(np.square(w.reshape(-1, w.shape[-1])), axis=0))
      np.testing.assert_allclose(rms, 1, rtol=2e-3)
  # power-function EMA, recomputed in numpy from the weights after each step
  config = load_config("tiny")
  b = config.train.batch_size
  for i, std in enumerate(config.train.ema_stds):
    gamma = ema_lib.std_to_gamma(std)
    ema = jax.tree.map(np.asarray, history[0])  # beta = 0 at the first step: a copy
    for t in range(1, STEPS):
      beta = (1 - b / ((t + 1) * b)) ** (gamma + 1)
      ema = jax.tree.map(lambda e, p: beta * e + (1 - beta) * p, ema, history[t])
    for x, y in zip(jax.tree.leaves(state.ema[i]), jax.tree.leaves(ema)):
      # float32 vs float64: each update rounds its two terms
      T.assert_close(x, y, T.sequential_rtol(STEPS, T.reduction_rtol(2)))


def test_adam_schedule_and_force_finite_match_numpy():
  t = ml_collections.ConfigDict(dict(lr_ref=0.01, batch_size=4, t_ref_batches=3, warmup_images=10,
                                     adam_b1=0.9, adam_b2=0.99, adam_eps=1e-8))
  lr = optim.learning_rate(t)
  for step in range(8):
    seen = (step + 1) * 4
    want = 0.01 / np.sqrt(max(seen / 12, 1)) * min(seen / 10, 1)
    np.testing.assert_allclose(float(lr(step)), want, rtol=T.sequential_rtol(8, T.EPS32))  # 8 float32 ops
  tx = optim.make_optimizer(t)
  rng = np.random.default_rng(0)
  p = rng.normal(size=5).astype(np.float32)
  params, opt = jnp.asarray(p), tx.init(jnp.asarray(p))
  m = v = np.zeros(5)
  for step in range(6):
    g = rng.normal(size=5)
    g[step % 5] = np.nan if step % 2 else np.inf
    updates, opt = tx.update(jnp.asarray(g, jnp.float32), opt, params)
    params = params + updates
    g = np.where(np.isfinite(g), g, 0)
    m, v = 0.9 * m + 0.1 * g, 0.99 * v + 0.01 * g * g
    mh, vh = m / (1 - 0.9 ** (step + 1)), v / (1 - 0.99 ** (step + 1))
    p = p - float(lr(step)) * mh / (np.sqrt(vh) + 1e-8)
    T.assert_close(params, p, T.sequential_rtol(step + 1, T.reduction_rtol(2)))  # float32 vs float64


def test_mesh_and_batch_errors():
  mesh_cfg = ml_collections.ConfigDict(dict(data=4, fsdp=4))
  with pytest.raises(UserError, match="needs 16 devices but only 8"):
    parallel.make_mesh(mesh_cfg)
  mesh = parallel.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=2)))
  assert dict(mesh.shape) == {"data": 4, "fsdp": 2}
  with pytest.raises(UserError, match="not divisible by the 8 devices"):
    parallel.micro_batch_size(12, 1, mesh)
  with pytest.raises(UserError, match="grad_accum"):
    parallel.micro_batch_size(16, 3, mesh)
  assert parallel.micro_batch_size(32, 2, mesh) == 16


def test_sharding_rule():
  assert parallel.leaf_spec((3, 3, 64, 128), 4, 1000) == jax.P(None, None, None, "fsdp")
  assert parallel.leaf_spec((3, 3, 6, 7), 4, 10) == jax.P()          # no axis divisible
  assert parallel.leaf_spec((128, 64), 4, 10 ** 6) == jax.P()          # small: replicated
  assert parallel.leaf_spec((6, 8), 4, 1) == jax.P(None, "fsdp")


@pytest.mark.multiprocess
def test_two_processes_match_one_device(reference, tmp_path):
  """A real 2-process jax.distributed run on 127.0.0.1 (4 CPU devices each, FSDP 2 x 4)."""
  import json
  import os
  import socket
  import subprocess
  import sys
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  worker = os.path.join(os.path.dirname(__file__), "train_two_process_worker.py")
  out = tmp_path / "two_process.json"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  procs = [subprocess.Popen([sys.executable, worker, str(i), str(port), str(out), str(STEPS)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
           for i in range(2)]
  logs = [p.communicate(timeout=900)[0].decode() for p in procs]
  assert all(p.returncode == 0 for p in procs), "\n".join(l[-3000:] for l in logs)
  result = json.loads(out.read_text())
  rtol = run_rtol(load_config("tiny"))
  T.assert_close(result["losses"], reference[0], rtol)
  want = reference[1].params
  got = [np.asarray(g).reshape(w.shape) for g, w in zip(result["params"], jax.tree.leaves(want))]
  T.assert_close_normwise(jax.tree.unflatten(jax.tree.structure(want), got), want, rtol)

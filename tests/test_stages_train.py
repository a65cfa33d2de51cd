"""The train stage on a real tiny workdir: checkpoints, a kill and resume that continues
bit-identically, resumes on another number of processes (2 -> 1 and 1 -> 2, real jax.distributed
runs) that continue the uninterrupted run, refusal of a checkpoint from another model shape or of
a layout that cannot continue it, NaN patience, a failing disk, and load_denoiser's EMA choices."""

import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import tolerances as T
from conftest import ROOT, load_config
from pso_jax.errors import UserError
from pso_jax.training import checkpoint as ckpt_lib, metrics as metrics_lib
from pso_jax.diffusion import denoiser
from pso_jax.stages import train as loop

COMPARED = ("loss", "grad_norm", "lr", "denoise_loss")


def _config(total_steps=12):
  config = load_config("tiny")
  config.train.total_images = config.train.batch_size * total_steps
  return config


@pytest.fixture(scope="module")
def data_workdir(tmp_path_factory):
  """A prepared tiny dataset, plus a persistent compilation cache shared by this module's runs
  (and its subprocess), so each distinct train step compiles once."""
  from pso_jax.stages import prepare
  root = tmp_path_factory.mktemp("train_loop")
  prepare.run(_config(), str(root / "base"))
  cache = str(root / "xla_cache")
  old = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
  jax.config.update("jax_compilation_cache_dir", cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  yield root, cache
  jax.config.update("jax_compilation_cache_dir", old[0])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", old[1])


def _new_workdir(data_workdir, name):
  root, _ = data_workdir
  path = root / name
  shutil.copytree(root / "base" / "data", path / "data")
  return str(path)


def _compared(workdir):
  return [{k: m[k] for k in ("step",) + COMPARED} for m in
          metrics_lib.read_metrics(os.path.join(workdir, "diffusion"))]


@pytest.fixture(scope="module")
def uninterrupted(data_workdir):
  workdir = _new_workdir(data_workdir, "uninterrupted")
  summary = loop.run(_config(), workdir)
  return workdir, summary


def test_uninterrupted_run_writes_its_outputs(uninterrupted):
  workdir, summary = uninterrupted
  out = os.path.join(workdir, "diffusion")
  assert summary["steps"] == 12 and np.isfinite(summary["final_loss"])
  assert sorted(ckpt_lib.Checkpointer(os.path.join(out, "checkpoints"), keep=3).all_steps()) == [6, 9, 12]
  snaps = ckpt_lib.list_ema_snapshots(os.path.join(out, "ema_snapshots"))
  assert [(n, s) for n, s, _ in snaps] == [(n * 8, s) for n in (3, 6, 9, 12) for s in (0.05, 0.1)]
  lines = metrics_lib.read_metrics(out)
  assert [m["step"] for m in lines] == [2, 4, 6, 8, 10, 12]
  # FLOPs of the step on all 8 devices: about 3 forward passes (forward + backward) per image
  from pso_jax.models.flops import forward_flops
  from pso_jax.models.presets import build_model, init_variables, model_input_shape
  config = _config()
  model = build_model(config)
  shapes = jax.eval_shape(lambda k: init_variables(model, k, config), jax.random.key(0))
  forward = forward_flops(model, shapes, model_input_shape(config), config.train.batch_size)
  assert 2.5 < summary["gflop_per_step"] * 1e9 / forward < 5
  assert all(m["images_per_s"] > 0 and m["tflops"] > 0 for m in lines)
  assert os.listdir(os.path.join(out, "tensorboard"))
  # a rerun returns at once with the stored summary
  start = time.time()
  assert loop.run(_config(), workdir) == json.loads(json.dumps(summary))
  assert time.time() - start < 1


def test_kill_resume_is_bit_identical(data_workdir, uninterrupted):
  root, cache = data_workdir
  workdir = _new_workdir(data_workdir, "killed")
  env = dict(os.environ, PSO_JAX_COMPILATION_CACHE=cache, PSO_JAX_NO_PROGRESS="1")
  cmd = [sys.executable, "-m", "pso_jax.main", "--config=configs/cxr.py:tiny", f"--workdir={workdir}",
         "--mode=train", f"--config.train.total_images={8 * 12}"]
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  ckpt_dir = os.path.join(workdir, "diffusion", "checkpoints")
  deadline = time.time() + 600
  while time.time() < deadline and proc.poll() is None:  # SIGKILL right after the first checkpoint
    if os.path.exists(os.path.join(ckpt_dir, "3", "commit_success.txt")):
      proc.send_signal(signal.SIGKILL)
      break
    time.sleep(0.02)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-3000:]
  assert not os.path.exists(os.path.join(workdir, "diffusion", "COMPLETE"))
  killed_at = ckpt_lib.Checkpointer(ckpt_dir, keep=3).latest_step()
  assert killed_at is not None and killed_at < 12

  # a config with another model shape is refused, naming the leaves
  other = _config()
  other.model.preset = "demo"
  with pytest.raises(UserError, match=r"another shape.*\n.*params/"):
    loop.run(other, workdir)

  loop.run(_config(), workdir)
  assert _compared(workdir) == _compared(uninterrupted[0])  # exact: bit-identical losses
  _, resumed = denoiser.load_denoiser(_config(), workdir, ema_std=0)
  _, straight = denoiser.load_denoiser(_config(), uninterrupted[0], ema_std=0)
  for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(straight)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _resumable_copy(data_workdir, src, name, step):
  """A copy of workdir `src` as a kill right after its checkpoint of `step` would leave it (later
  metrics lines stay: the resume drops them)."""
  workdir = _new_workdir(data_workdir, name)
  shutil.copytree(os.path.join(src, "diffusion"), os.path.join(workdir, "diffusion"))
  os.remove(os.path.join(workdir, "diffusion", "COMPLETE"))
  ckpt_dir = os.path.join(workdir, "diffusion", "checkpoints")
  for later in [s for s in ckpt_lib.Checkpointer(ckpt_dir, keep=3).all_steps() if s > step]:
    shutil.rmtree(os.path.join(ckpt_dir, str(later)))
  return workdir


def _assert_same_run(workdir, reference):
  """Losses, gradient norms, learning rates at the steps both logged, and the final weights, to
  the rounding of 12 steps on another layout (a gradient sums the batch's pixels)."""
  config = _config()
  rtol = T.training_rtol(12, config.train.batch_size * config.data.image_size ** 2 * config.data.channels)
  got = {m["step"]: m for m in _compared(workdir)}
  want = {m["step"]: m for m in _compared(reference)}
  assert set(want) == {2, 4, 6, 8, 10, 12} <= set(got)
  for key in COMPARED:
    T.assert_close([got[s][key] for s in sorted(want)], np.array([want[s][key] for s in sorted(want)]),
                   rtol, err_msg=key)
  _, a = denoiser.load_denoiser(config, workdir, ema_std=0)
  _, b = denoiser.load_denoiser(config, reference, ema_std=0)
  T.assert_close_normwise(jax.device_get(a), jax.device_get(b), rtol)


@pytest.mark.multiprocess
def test_resume_on_another_process_count(data_workdir, uninterrupted):
  """1 -> 2 -> 1 processes: a real jax.distributed run on 127.0.0.1 (2 processes x 2 CPU devices,
  FSDP 2) resumes the uninterrupted 1-process run's checkpoint of step 6 and checkpoints step 9;
  this 1-process, 8-device run (replicated weights, the uninterrupted run's compiled step) resumes
  that to step 12. Every step matches the uninterrupted run: the same global batches in the same
  rows (so the same noise per image), the weights, optimizer state and EMA resharded onto each
  new mesh."""
  _, cache = data_workdir
  workdir = _resumable_copy(data_workdir, uninterrupted[0], "procs_1_2_1", 6)
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  worker = os.path.join(os.path.dirname(__file__), "train_two_process_worker.py")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(PSO_JAX_NO_PROGRESS="1")
  procs = [subprocess.Popen([sys.executable, worker, "loop", str(i), str(port), cache, workdir],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
           for i in range(2)]
  logs = [p.communicate(timeout=900)[0].decode() for p in procs]
  assert all(p.returncode == 0 for p in procs), "\n".join(l[-3000:] for l in logs)

  ckpt_dir = os.path.join(workdir, "diffusion", "checkpoints")
  meta = ckpt_lib.Checkpointer(ckpt_dir, keep=3).read_meta(9)
  assert meta["data"]["start_batch"] == 6  # the 2-process loaders started at global batch 6
  assert meta["data"]["layout"]["process_count"] == 2
  assert meta["data"]["layout"]["rows"] == [[[0, 4]], [[4, 8]]]
  saved_iterators = os.listdir(os.path.join(ckpt_dir, "9", "data_iter"))
  assert sorted(f for f in saved_iterators if f.endswith(".json")) == [
      "process_0-of-2.json", "process_1-of-2.json"]
  loop.run(_config(), workdir)  # FSDP-sharded arrays of 2 processes, read replicated on 8 devices
  assert [m["step"] for m in _compared(workdir)] == [2, 4, 6, 8, 9, 10, 12]  # 9: where 2 stopped
  _assert_same_run(workdir, uninterrupted[0])


def test_resume_refuses_a_layout_that_cannot_continue(data_workdir, uninterrupted, monkeypatch):
  """3 processes cannot split the saved global batch of 8, and the global batch cannot change: one
  message each, from the checks that run before the model, the data and compilation."""
  workdir = _resumable_copy(data_workdir, uninterrupted[0], "three_procs", 9)
  monkeypatch.setattr(loop, "_process_count", lambda: 3)  # what 3 processes would report
  with pytest.raises(UserError, match=r"cannot resume on 3 processes: the checkpoint of step 9 was "
                     r"trained on 1 process\(es\), and its global batch 8 does not split .* "
                     r"process count that divides 8 \(e\.g\. 1, 2, 4, 8\)"):
    loop.run(_config(), workdir)
  monkeypatch.undo()
  config = _config()
  config.train.batch_size = 16
  with pytest.raises(UserError, match=r"global batch 8, this config has 16.*batch_size=8"):
    loop.run(config, workdir)


def test_load_denoiser_ema_choices(uninterrupted):
  workdir = uninterrupted[0]
  config = _config()
  model, ema10 = denoiser.load_denoiser(config, workdir, ema_std=0.10)
  _, raw = denoiser.load_denoiser(config, workdir, ema_std=0)
  snaps = {(n, s): p for n, s, p in ckpt_lib.list_ema_snapshots(os.path.join(workdir, "diffusion", "ema_snapshots"))}
  stored = ckpt_lib.load_ema_snapshot(snaps[(96, 0.1)], jax.device_get(raw["params"]))
  for a, b in zip(jax.tree.leaves(ema10["params"]), jax.tree.leaves(stored)):
    np.testing.assert_array_equal(np.asarray(a), b)
  assert not all(np.array_equal(np.asarray(a), np.asarray(b))
                 for a, b in zip(jax.tree.leaves(ema10["params"]), jax.tree.leaves(raw["params"])))
  # an untracked width comes from the snapshots; reconstructing a tracked one gives it back
  _, mid = denoiser.load_denoiser(config, workdir, ema_std=0.07)
  from pso_jax.diffusion import ema as ema_lib
  found = [(n, s, ckpt_lib.load_ema_snapshot(p, stored))
           for n, s, p in ckpt_lib.list_ema_snapshots(os.path.join(workdir, "diffusion", "ema_snapshots"))]
  want = ema_lib.reconstruct_posthoc(found, 0.07, target_nimg=96)
  T.assert_identical(jax.device_get(mid["params"]), want)  # the same numpy sum of the same snapshots
  # the denoiser runs
  x = np.zeros((2, 16, 16, 1), np.float32)
  d, _ = model.apply(ema10, x, np.ones(2, np.float32), np.zeros((2, 16), np.float32), train=False)
  assert d.shape == x.shape and np.all(np.isfinite(d))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(data_workdir, uninterrupted):
  workdir = _new_workdir(data_workdir, "nan")
  shutil.copytree(os.path.join(uninterrupted[0], "diffusion"), os.path.join(workdir, "diffusion"))
  os.remove(os.path.join(workdir, "diffusion", "COMPLETE"))
  ckpt_dir = os.path.join(workdir, "diffusion", "checkpoints")
  shutil.rmtree(os.path.join(ckpt_dir, "12"))
  config = _config()
  config.diffusion.p_mean = 1e4  # sigma = inf: every loss is NaN
  config.train.nan_patience = 2
  with pytest.raises(UserError, match=r"not finite for 2 consecutive steps.*step 9\)"):
    loop.run(config, workdir)
  assert ckpt_lib.Checkpointer(ckpt_dir, keep=3).latest_step() == 9


def test_full_disk_keeps_the_last_checkpoint(tmp_path):
  """A real OS write error (a file-size limit, EFBIG) in the middle of an async save."""
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), keep=3)
  state = {"w": jax.numpy.arange(100_000, dtype=jax.numpy.float32)}
  ckpt.save(1, state, None, {"step": 1})
  ckpt.wait()
  old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
  soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
  resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, hard))
  try:
    with pytest.raises(UserError, match=r"file-size limit.*step 1\) is kept"):
      ckpt.save(2, {"w": state["w"] + 1}, None, {"step": 2})
      ckpt.wait()
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    signal.signal(signal.SIGXFSZ, old_handler)
  ckpt.close()
  again = ckpt_lib.Checkpointer(str(tmp_path), keep=3)
  assert again.latest_step() == 1
  restored, meta = again.restore(1, jax.eval_shape(lambda: state))
  np.testing.assert_array_equal(restored["w"], state["w"]) and meta == {"step": 1}


def test_bad_settings_stop_before_work(data_workdir):
  workdir = _new_workdir(data_workdir, "bad")
  config = _config()
  config.mesh.data, config.mesh.fsdp = 4, 4
  with pytest.raises(UserError, match="needs 16 devices"):
    loop.run(config, workdir)
  config = _config()
  config.train.batch_size = 12
  with pytest.raises(UserError, match="not divisible by the 8 devices"):
    loop.run(config, workdir)
  config = _config()
  config.regulariser.cond_dropout = 1.5
  with pytest.raises(UserError, match="cond_dropout"):
    loop.run(config, workdir)
  with pytest.raises(UserError, match="prepare"):
    loop.run(_config(), str(data_workdir[0] / "no_data"))


def test_a_failed_compile_closes_the_checkpointer_and_metrics(data_workdir, monkeypatch):
  """Whatever fails after the checkpoint manager opens (here the step's compilation), its
  threads and the metrics files are closed, so the process can go on or retry."""
  from pso_jax.training import checkpoint as ckpt_lib
  from pso_jax.diffusion import train_step as step_lib
  closed = []
  for cls, name in ((ckpt_lib.Checkpointer, "checkpointer"), (metrics_lib.MetricsWriter, "metrics")):
    original = cls.close
    monkeypatch.setattr(cls, "close", lambda self, _o=original, _n=name: (closed.append(_n), _o(self)))

  def broken_jit(*args, **kwargs):
    raise RuntimeError("compilation failed")
  monkeypatch.setattr(step_lib, "jit_train_step", broken_jit)
  with pytest.raises(RuntimeError, match="compilation failed"):
    loop.run(_config(), _new_workdir(data_workdir, "failed_compile"))
  assert closed == ["metrics", "checkpointer"]

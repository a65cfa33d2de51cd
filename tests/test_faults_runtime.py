"""Faults at run time of issue 12 (items 7, 8 and 9): a corrupt latest checkpoint, a full or
read-only disk, a malformed weight file, a patient id that matplotlib would read as math, and the
libraries' log lines. Each test plants the fault and checks the one clear message, or the right
result, that it now gets."""

import errno
import json
import logging
import os
import re
import struct
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import ROOT, clone_workdir
from pso_jax import stages
from pso_jax.diffusion import denoiser
from pso_jax.errors import UserError
from pso_jax.training import checkpoint as ckpt_lib

# ---------------------------------------------------------------- item 7: corrupt checkpoints


def _truncate_array_data(step_dir: str) -> None:
  """Cuts the largest tensorstore data file of a checkpoint's state to 1000 bytes."""
  files = [os.path.join(base, f) for base, _, names in os.walk(os.path.join(step_dir, "state"))
           for f in names if os.sep + "d" + os.sep in os.path.join(base, f)]
  with open(max(files, key=os.path.getsize), "r+b") as f:
    f.truncate(1000)


def _break_iterator_json(step_dir: str) -> None:
  path = os.path.join(step_dir, "data_iter", "process_0-of-1.json")
  with open(path, "w") as f:
    f.write('{"version": 2, "last_seen')


CORRUPTIONS = {"truncated array data": _truncate_array_data,
               "bad iterator-state JSON": _break_iterator_json}


def _corrupt_copy(tiny_trained_workdir, tmp_path, corrupt, steps=(6,)):
  config, src = tiny_trained_workdir
  workdir = clone_workdir(src, tmp_path / "run")
  ckpt_dir = denoiser.checkpoint_dir(workdir)
  assert sorted(int(s) for s in os.listdir(ckpt_dir) if s.isdigit()) == [3, 6]
  for step in steps:
    corrupt(os.path.join(ckpt_dir, str(step)))
  return config, src, workdir, ckpt_dir


def _params(config, workdir, step=None):
  _, variables = denoiser.load_denoiser(config, workdir, ema_std=0, step=step)
  return jax.tree.leaves(jax.device_get(variables["params"]))


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_7_train_resumes_from_the_newest_checkpoint_that_restores(tiny_trained_workdir, tmp_path,
                                                                  caplog, kind):
  config, src, workdir, ckpt_dir = _corrupt_copy(tiny_trained_workdir, tmp_path, CORRUPTIONS[kind])
  os.remove(os.path.join(workdir, "diffusion", "COMPLETE"))  # train again from the checkpoints
  with caplog.at_level(logging.WARNING):
    summary = stages.get_stage("train")(config, workdir)
  warned = [r.getMessage() for r in caplog.records if "does not restore" in r.getMessage()]
  assert len(warned) == 1 and f"checkpoint 6 in {ckpt_dir}" in warned[0], warned
  assert "resumes from step 3" in warned[0]
  # the corrupt checkpoint is kept aside, step 6 written again, and the resumed run continues
  # exactly as the uninterrupted one did (bit-identical weights)
  aside = os.path.join(workdir, "diffusion", "corrupt_checkpoints")
  assert os.listdir(aside) == ["6"] and summary["steps"] == 6
  assert sorted(int(s) for s in os.listdir(ckpt_dir) if s.isdigit()) == [3, 6]
  for got, want in zip(_params(config, workdir), _params(config, src)):
    np.testing.assert_array_equal(got, want)


def test_7_sample_uses_the_newest_checkpoint_that_restores(tiny_trained_workdir, tmp_path, caplog):
  config, src, workdir, ckpt_dir = _corrupt_copy(tiny_trained_workdir, tmp_path, _truncate_array_data)
  with caplog.at_level(logging.WARNING):
    summary = stages.get_stage("sample")(config, workdir)
  warned = [r.getMessage() for r in caplog.records if "does not restore" in r.getMessage()]
  assert len(warned) == 1 and f"checkpoint 6 in {ckpt_dir}" in warned[0], warned
  assert "OUT_OF_RANGE" in warned[0] and "step 3" in warned[0]
  assert summary["fingerprint"]["checkpoint_step"] == 3
  for got, want in zip(_params(config, workdir), _params(config, src, step=3)):
    np.testing.assert_array_equal(got, want)
  assert os.path.isdir(os.path.join(ckpt_dir, "6"))  # sample reads; it moves nothing


def test_7_no_checkpoint_restores_is_one_clear_error(tiny_trained_workdir, tmp_path):
  config, _, workdir, ckpt_dir = _corrupt_copy(tiny_trained_workdir, tmp_path,
                                               _truncate_array_data, steps=(3, 6))
  with pytest.raises(UserError, match=f"no checkpoint in {ckpt_dir} restores: step 6: .*; step 3: "):
    denoiser.load_denoiser(config, workdir)
  os.remove(os.path.join(workdir, "diffusion", "COMPLETE"))
  with pytest.raises(UserError, match="no checkpoint in .* restores"):
    stages.get_stage("train")(config, workdir)


# ---------------------------------------------------------------- item 8: errors


def test_8_a_full_disk_error_is_not_replaced_by_cleanup(tiny_trained_workdir, tmp_path, monkeypatch):
  """The disk fills at the first checkpoint: every later write fails too, the metrics' closing
  flush included. The error shown is the checkpoint's, not the cleanup's."""
  from tensorboardX import record_writer
  config, src = tiny_trained_workdir
  workdir = str(tmp_path / "run")
  clone_workdir(os.path.join(src, "data"), os.path.join(workdir, "data"))
  full = []

  def no_space(*_, **__):
    full.append(True)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  def write_unless_full(original):
    def write(self, *args):
      if full:
        no_space()
      return original(self, *args)
    return write
  monkeypatch.setattr(ocp.CheckpointManager, "save", no_space)
  for name in ("write", "flush"):
    monkeypatch.setattr(record_writer.RecordWriter, name,
                        write_unless_full(getattr(record_writer.RecordWriter, name)))
  with pytest.raises(UserError, match="saving the checkpoint of step 3 .* the disk is full"):
    stages.get_stage("train")(config, workdir)


RO_DRIVER = r"""
import builtins, errno, os, sys
workdir = os.path.realpath(sys.argv[1])

def read_only(path):  # every file of the workdir but main's own write probe
  path = os.path.realpath(os.fsdecode(path))
  return path.startswith(workdir + os.sep) and ".write_probe" not in path

def refuse(path):
  raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))

real_open, real_os_open = builtins.open, os.open
def fake_open(file, mode="r", *args, **kwargs):
  if isinstance(file, (str, bytes, os.PathLike)) and set(mode) & set("wax+") and read_only(file):
    refuse(file)
  return real_open(file, mode, *args, **kwargs)
def fake_os_open(path, flags, *args, **kwargs):
  if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and read_only(path):
    refuse(path)
  return real_os_open(path, flags, *args, **kwargs)
builtins.open, os.open = fake_open, fake_os_open

from pso_jax import main
sys.argv = ["pso_jax.main", "--config=configs/cxr.py:tiny", "--workdir=" + sys.argv[1], sys.argv[2]]
main.entry()
"""


@pytest.mark.parametrize("mode", ["prepare", "train_reid"])
def test_8_a_read_only_workdir_is_one_line(tiny_trained_workdir, tmp_path, mode):
  """The workdir turns read-only after main's check (as when it is remounted mid-run). The re-id
  checkpoint's writes fail in orbax's threads too, which logged a traceback each."""
  if mode != "prepare":
    clone_workdir(os.path.join(tiny_trained_workdir[1], "data"), tmp_path / "run" / "data")
  r = subprocess.run([sys.executable, "-c", RO_DRIVER, str(tmp_path / "run"), f"--mode={mode}"],
                     cwd=ROOT, capture_output=True, text=True, timeout=300)
  errors = [line for line in r.stderr.splitlines() if line.startswith("pso_jax: error:")]
  assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
  assert len(errors) == 1 and str(tmp_path / "run") in errors[0], r.stderr[-3000:]
  assert "Read-only file system (EROFS)" in errors[0]


def _safetensors(path, header, data=b"\0" * 16) -> str:
  blob = json.dumps(header).encode()
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)) + blob + data)
  return str(path)


@pytest.mark.parametrize("header", [
    {"w": {"dtype": "F32", "shape": [2]}},                                  # no data_offsets
    {"w": {"shape": [2], "data_offsets": [0, 8]}},                          # no dtype
    {"w": {"dtype": "F32", "data_offsets": [0, 8]}},                        # no shape
    {"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}},          # shape vs bytes
    {"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}},          # reversed range
    {"w": {"dtype": "F32", "shape": [2], "data_offsets": "0-8"}},           # not a pair
    {"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}},         # negative size
    {"w": [0, 8]},                                                          # not an object
    {"__metadata__": ["arch"], "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}},
], ids=["offsets", "dtype", "shape", "size", "reversed", "pair", "negative", "entry", "metadata"])
def test_8_malformed_safetensors_header_is_one_error_naming_the_file(tmp_path, header):
  from pso_jax.models import weights
  path = _safetensors(tmp_path / "net.safetensors", header)
  with pytest.raises(UserError, match=f"{path}: .*download it again"):
    weights.read_safetensors(path)


def test_8_a_dollar_in_a_patient_id_is_drawn_as_text(tmp_path):
  """matplotlib reads text between two $ as math: these raised ValueError (and $x$ came out as
  an italic x)."""
  from pso_jax.report import audit_report
  ids = ["P$1_$", "$$", "id$\\x$"]
  evidence = [dict(similarity=0.9 - 0.1 * i, holdout_similarity=0.5, nearest_train_index=i,
                   nearest_holdout_index=i, singles_out=i == 0, nearest_patient=p)
              for i, p in enumerate(ids)]
  images = np.zeros((3, 8, 8, 1), np.uint8)
  path = str(tmp_path / "pairs.png")
  assert audit_report.closest_pairs(images, images, images, {"evidence": evidence}, 3, path) == [0, 1, 2]
  assert os.path.getsize(path) > 0


# ---------------------------------------------------------------- item 9: logging


def _prepare(workdir, *flags):
  return subprocess.run([sys.executable, "-m", "pso_jax.main", "--config=configs/cxr.py:tiny",
                         f"--workdir={workdir}", "--mode=prepare", *flags], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)


def _library_log_sources(stderr: str) -> set:
  """The source files of absl/glog-style log lines (`I1130 10:26:02.22 123 file.py:849] ...`)
  that are not pso_jax's own modules: what jax, tfds, orbax and grain log."""
  ours = {f for _, _, files in os.walk(os.path.join(ROOT, "pso_jax")) for f in files}
  found = re.findall(r"^[IWEF]\d{4} [\d:.]+\s+\d+ ([\w.]+\.py):\d+\]", stderr, re.M)
  return set(found) - ours


def test_9_libraries_are_quiet_unless_asked(tmp_path):
  quiet = _prepare(tmp_path / "quiet")
  assert quiet.returncode == 0, quiet.stderr[-3000:]
  assert "[pso_jax] prepare: done" in quiet.stdout
  assert not _library_log_sources(quiet.stderr), quiet.stderr[-3000:]
  assert "Unable to initialize backend" not in quiet.stderr, quiet.stderr[-3000:]
  assert "prepared phantom" in quiet.stderr  # pso_jax's own one-line summary still shows
  verbose = _prepare(tmp_path / "verbose", "--verbosity=0")
  # jax's backend probe (xla_bridge.py) at least logs at INFO: the libraries speak when asked
  assert verbose.returncode == 0 and _library_log_sources(verbose.stderr), verbose.stderr[-3000:]


def test_9_readme_says_where_the_compilation_cache_goes():
  readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
  assert "~/.cache/pso_jax/xla" in readme and "PSO_JAX_COMPILATION_CACHE" in readme

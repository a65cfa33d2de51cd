"""Entry point, config variants and the workdir guard."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, load_config
from pso_jax import workdir as workdir_lib
from pso_jax.errors import UserError


def _main(*args, cwd=ROOT):
  return subprocess.run([sys.executable, "-m", "pso_jax.main", *args], cwd=cwd,
                        capture_output=True, text=True, timeout=300)


def test_variants_share_structure():
  keys = lambda d, p="": sum(([p + k] if not isinstance(v, dict) else keys(v, p + k + ".")
                              for k, v in d.items()), [])
  full, demo, tiny = (load_config(v).to_dict() for v in ("", "demo", "tiny"))
  assert keys(full) == keys(demo) == keys(tiny)
  assert full["data"]["image_size"] == 512 and full["train"]["batch_size"] == 2048
  assert full["model"]["preset"] == "xs" and full["data"]["latent"]["kind"] == "sd_vae"
  assert demo["data"]["source"] == "phantom"


def test_workdir_refuses_other_config(tmp_path):
  cfg = load_config("tiny")
  workdir_lib.prepare_workdir(str(tmp_path), cfg)
  stored = json.load(open(tmp_path / "config.json"))
  assert stored["train"]["batch_size"] == cfg.train.batch_size
  workdir_lib.prepare_workdir(str(tmp_path), cfg)  # same config: fine
  cfg.mesh.data = 4                                # how-to-run field: fine
  workdir_lib.prepare_workdir(str(tmp_path), cfg)
  cfg.train.batch_size = 3
  with pytest.raises(UserError, match="train.batch_size: 8 -> 3"):
    workdir_lib.prepare_workdir(str(tmp_path), cfg)
  workdir_lib.prepare_workdir(str(tmp_path), cfg, allow_config_change=True)
  assert json.load(open(tmp_path / "config.json"))["train"]["batch_size"] == 3


def test_unwritable_workdir(tmp_path):
  target = tmp_path / "file"
  target.write_text("x")
  with pytest.raises(UserError, match="not writable"):
    workdir_lib.prepare_workdir(str(target / "sub"), load_config("tiny"))


def test_cli_config_typo_is_one_clear_line(tmp_path):
  r = _main("--config=configs/cxr.py:tiny", f"--workdir={tmp_path}", "--config.train.bogus=1")
  assert r.returncode != 0
  assert "--config.train.bogus is not a field of the config" in r.stderr
  assert "Traceback" not in r.stderr


def test_cli_refuses_changed_config(tmp_path):
  first = _main("--config=configs/cxr.py:tiny", f"--workdir={tmp_path}", "--mode=prepare")
  assert os.path.exists(tmp_path / "config.json"), first.stderr
  r = _main("--config=configs/cxr.py:tiny", f"--workdir={tmp_path}", "--mode=prepare",
            "--config.train.batch_size=4")
  assert r.returncode == 2 and "different config" in r.stderr

"""Every pso_jax command the README shows runs as written, on the `tiny` variant.

The README's commands name `configs/cxr.py:demo` (or the full recipe); here each one runs with
`:tiny` in a scratch folder that sees the repository's configs, in the order the README gives
them, so a command that depends on an earlier one's workdir finds it. Commands that read data a
user brings (absolute paths such as /data/...) must stop at once with one clear error line.
"""

import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")


def bash_blocks(text: str) -> list[str]:
  return re.findall(r"```bash\n(.*?)```", text, re.S)


def commands(text: str) -> list[str]:
  """Shell commands of the README's bash blocks: continuation lines joined, comments dropped;
  a line of several `&&` parts yields its pso_jax / pytest parts."""
  out = []
  for block in bash_blocks(text):
    joined = re.sub(r"\\\n\s*", " ", block)
    for line in joined.splitlines():
      line = line.split(" #")[0].strip()
      if not line or line.startswith("#"):
        continue
      out += [p.strip() for p in line.split("&&")]
  return out


def pso_jax_main_commands(text: str) -> list[list[str]]:
  return [shlex.split(c) for c in commands(text) if c.startswith("python -m pso_jax.main")]


def on_tiny(argv: list[str]) -> list[str]:
  out = []
  for a in argv:
    if a.startswith("--config=configs/cxr.py"):
      a = "--config=configs/cxr.py:tiny"
    out.append(a)
  return out


def needs_user_data(argv: list[str]) -> bool:
  return any(re.search(r"=/(data|weights)/", a) for a in argv)


def test_readme_parsing_finds_the_commands():
  text = open(README, encoding="utf-8").read()
  cmds = commands(text)
  # the two set-up commands come first, and their last parts are the main job and the tests
  assert cmds[3] == "python -m pso_jax.main --config=configs/cxr.py:demo --workdir=runs/demo --mode=pipeline"
  assert any(c.startswith("python -m pytest") for c in cmds)
  assert on_tiny(["python", "--config=configs/cxr.py"])[1] == "--config=configs/cxr.py:tiny"
  assert needs_user_data(["--config.data.filelist=/data/cxr8/all.txt"])


@pytest.mark.slow
def test_every_readme_command_runs_on_tiny(tmp_path):
  text = open(README, encoding="utf-8").read()
  os.symlink(os.path.join(ROOT, "configs"), tmp_path / "configs")
  env = dict(os.environ, PSO_JAX_NO_PROGRESS="1", PYTHONPATH=ROOT)
  ran = 0
  for argv in pso_jax_main_commands(text):
    argv = [sys.executable] + on_tiny(argv)[1:]
    proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    shown = " ".join(argv[1:])
    if needs_user_data(argv):
      assert proc.returncode == 2, f"{shown}: expected a clear refusal, got rc={proc.returncode}\n{proc.stderr[-3000:]}"
      errors = [l for l in proc.stderr.splitlines() if l.startswith("pso_jax: error:")]
      assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    else:
      assert proc.returncode == 0, f"{shown} failed (rc={proc.returncode}):\n{proc.stderr[-3000:]}"
      ran += 1
  assert ran >= 4
  assert (tmp_path / "runs" / "demo" / "results.json").exists()


@pytest.mark.parametrize("name", ["data", "train", "audit", "sample", "cnn", "vae", "memory",
                                  "prepare"])
def test_readme_bench_names_exist(name):
  """The benches the README lists are registered (they run for minutes; not run here)."""
  text = open(README, encoding="utf-8").read()
  assert f"python -m pso_jax.bench {name}" in text
  from pso_jax.bench.__main__ import BENCHES
  assert name in BENCHES

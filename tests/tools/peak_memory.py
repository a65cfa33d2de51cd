"""Peak memory of a command and every process it starts (the test suite under pytest-xdist).

  python tests/tools/peak_memory.py --out /tmp/peak.json -- python -m pytest -n 2 -q tests

Every `--interval` seconds it sums the memory of the command's process tree and keeps the peak,
the time it happened and which processes held it. Two sums are kept: RSS (what `top` shows; it
counts shared library pages once per process, so it overstates) and PSS (shared pages divided
among the processes sharing them: what the tree really takes from the machine). The command's exit
status is passed through. Per-test figures come from the suite itself: set
PSO_JAX_TEST_MEMORY_LOG=FILE.jsonl (tests/conftest.py writes one line per test).
"""

import argparse
import json
import subprocess
import sys
import threading
import time

import psutil

MB = 2 ** 20


def tree(process: psutil.Process) -> list:
  try:
    return [process, *process.children(recursive=True)]
  except psutil.NoSuchProcess:
    return []


def memory(process: psutil.Process, pss: bool = False) -> int:
  """Bytes resident for `process` (0 once it has exited); PSS reads smaps, so costs more."""
  try:
    return process.memory_full_info().pss if pss else process.memory_info().rss
  except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
    return 0


def tree_rss(process: psutil.Process) -> int:
  return sum(memory(p) for p in tree(process))


class TreePeak:
  """The peak RSS of this process and its children since the last `reset`, sampled in a thread
  (conftest uses it to log each test's peak)."""

  def __init__(self, interval: float = 0.2):
    self.root, self.peak, self.interval = psutil.Process(), 0, interval
    threading.Thread(target=self._run, daemon=True).start()

  def _run(self):
    while True:
      rss = tree_rss(self.root)
      self.peak = max(self.peak, rss)
      time.sleep(self.interval)

  def reset(self) -> int:
    """The peak so far (bytes), then start a new one."""
    peak, self.peak = max(self.peak, tree_rss(self.root)), 0
    return peak


def watch(pid: int, interval: float, stop: threading.Event) -> dict:
  root = psutil.Process(pid)
  peak = {"rss_mb": 0.0, "pss_mb": 0.0, "samples": 0}
  start = time.monotonic()
  while not stop.is_set():
    procs = tree(root)
    rss = {p.pid: memory(p) for p in procs}
    pss = {p.pid: memory(p, pss=True) for p in procs}
    peak["samples"] += 1
    if sum(rss.values()) / MB > peak["rss_mb"]:
      peak["rss_mb"] = sum(rss.values()) / MB
      peak["rss_at_s"] = round(time.monotonic() - start, 1)
    if sum(pss.values()) / MB > peak["pss_mb"]:
      peak["pss_mb"] = sum(pss.values()) / MB
      peak["pss_at_s"] = round(time.monotonic() - start, 1)
      peak["pss_by_process"] = sorted(((round(v / MB), " ".join(_cmdline(p))[:120])
                                       for p in procs if (v := pss[p.pid])), reverse=True)
    stop.wait(interval)
  peak["seconds"] = round(time.monotonic() - start, 1)
  return peak


def _cmdline(process: psutil.Process) -> list:
  try:
    return process.cmdline()
  except psutil.Error:
    return ["?"]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--interval", type=float, default=0.5, help="seconds between samples")
  parser.add_argument("--out", help="write the peak as JSON here too")
  parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run")
  args = parser.parse_args(argv)
  command = args.command[1:] if args.command[:1] == ["--"] else args.command
  if not command:
    parser.error("give the command to measure after --")
  proc = subprocess.Popen(command)
  stop, result = threading.Event(), {}
  thread = threading.Thread(target=lambda: result.update(watch(proc.pid, args.interval, stop)))
  thread.start()
  code = proc.wait()
  stop.set()
  thread.join()
  result.update(command=command, returncode=code)
  text = json.dumps(result, indent=1)
  print(text, file=sys.stderr)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text + "\n")
  return code


if __name__ == "__main__":
  sys.exit(main())

"""The memory bench's measuring and arithmetic (never the bench itself: it runs every stage twice):
a child's peak RSS polled from /proc, the growth table and the train-step line's parsing."""

import sys

import pytest

from pso_jax.bench import memory


def test_child_peak_rss_is_measured(tmp_path):
  """A child that touches 300 MiB (and holds it a moment) reports a peak between 300 MiB and
  300 MiB + an interpreter; an empty child, launched from this large pytest process, reads small
  (the parent's pages before exec do not count)."""
  code = ("import time; b = bytearray(300 << 20); b[::4096] = b'x' * len(b[::4096]); "
          "time.sleep(0.3); print('ok')")
  r = memory.run_measured([sys.executable, "-c", code], str(tmp_path / "child.log"))
  assert r["rc"] == 0 and (tmp_path / "child.log").read_text().strip() == "ok"
  assert 300 << 20 <= r["peak_rss"] <= (300 << 20) + (120 << 20)
  small = memory.run_measured([sys.executable, "-c", "import time; time.sleep(0.3)"],
                              str(tmp_path / "small.log"))
  assert 0 < small["peak_rss"] < 60 << 20
  failed = memory.run_measured([sys.executable, "-c", "raise SystemExit(3)"],
                               str(tmp_path / "fail.log"))
  assert failed["rc"] == 3


def test_growth_rows_and_table():
  mib = 1 << 20
  peaks = {"train_reid": {100: 500 * mib, 400: 520 * mib},    # streams: +4%
           "select": {100: 500 * mib, 400: 800 * mib},        # holds 1 MiB per image
           "audit": {100: 500 * mib}}                          # measured at one size only
  rows = memory.growth_rows(peaks, (100, 400), image_bytes=mib)
  assert [r["stage"] for r in rows] == ["train_reid", "select"]
  reid, select = rows
  assert reid["ratio"] == pytest.approx(1.04) and reid["ok"]
  assert reid["per_image"] == pytest.approx(20 * mib / 300)
  assert select["ratio"] == pytest.approx(1.6) and not select["ok"]
  assert select["image_share"] == pytest.approx(1.0)
  table = memory.format_rows(rows, (100, 400), mib)
  assert "N=400" in table and "1.600" in table and "ABOVE" in table and "100.0%" in table
  assert memory.patients_for(401, 4) == 101 and memory.patients_for(3, 4) == 1


def test_step_rate_parsing_and_headroom():
  text = ("train bench: preset=xs ...\n  step: 812.4 ms, 2.46 images/s (2.46 per device), "
          "30.1 GFLOP/step, compile 40.2 s\n  achieved: 37.1 GFLOP/s\n")
  assert memory.parse_step_rate(text) == 2.46
  with pytest.raises(ValueError, match="images/s"):
    memory.parse_step_rate("compile failed")
  h = memory.headroom(10.0, 2.5)
  assert h["ratio"] == 4.0 and h["ok"]
  assert not memory.headroom(4.0, 2.5)["ok"]


def test_overrides_reach_the_bench_config(tiny_config):
  memory.apply_override(tiny_config, "data.image_size=128")
  memory.apply_override(tiny_config, "data.phantom.render_size=32")
  memory.apply_override(tiny_config, "audit.attackers=('pixels',)")  # children only
  assert tiny_config.data.image_size == 128 and tiny_config.data.phantom.render_size == 32
  assert tiny_config.audit.attackers == ("features", "pixels")

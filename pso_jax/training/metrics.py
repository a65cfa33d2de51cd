"""Training metrics on process 0: JSONL lines plus TensorBoard scalars, and the FLOP accounting.

Achieved FLOP/s = the compiled step's FLOPs (XLA cost analysis) / step time; MFU divides that by
the devices' peak: a table by device kind for accelerators, the measured matmul rate on CPU.
"""

import json
import os
import time

import jax
import numpy as np

from pso_jax import io_utils

# dense peak TFLOP/s per device for bf16 inputs; fp32 matmuls run at half (TF32 / multi-pass bf16)
PEAK_BF16_TFLOPS = {
    "H200": 989.0, "H100": 989.0, "GH200": 989.0, "B200": 2250.0, "A100": 312.0, "L40S": 362.0,
    "L4": 121.0, "A10": 125.0, "V100": 125.0,
    "TPU v6": 918.0, "TPU v5p": 459.0, "TPU v5": 197.0, "TPU v4": 275.0, "TPU v3": 123.0,
}


def peak_flops_per_device(device, dtype: str) -> float | None:
  """Peak FLOP/s of one device from the table (None when unknown, e.g. CPU)."""
  kind = device.device_kind
  for name, tflops in PEAK_BF16_TFLOPS.items():  # more specific names come first
    if name.lower() in kind.lower():
      return tflops * 1e12 * (1.0 if dtype == "bfloat16" else 0.5)
  return None


def machine_peak_flops(devices, dtype: str) -> tuple[float, str]:
  """(peak FLOP/s of all `devices` together, where the number comes from)."""
  per = peak_flops_per_device(devices[0], dtype)
  if per is not None:
    return per * len(devices), f"table ({devices[0].device_kind})"
  # CPU: fake devices share the same cores, so the peak is the host's matmul rate per process
  from pso_jax.training.matmul_rate import matmul_gflops
  hosts = len({d.process_index for d in devices})
  return matmul_gflops(n=1024, repeats=3) * 1e9 * hosts, "measured matmul rate"


def compiled_flops(compiled, num_devices: int = 1) -> float:
  """FLOPs of one call of a compiled function on all its `num_devices` devices.

  XLA's cost analysis of a partitioned (SPMD) program counts one device's share, so it is scaled
  by the device count (replicated work, e.g. the optimizer on small leaves, counts once per device).
  """
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float((cost or {}).get("flops", 0.0)) * num_devices


class MetricsWriter:
  """metrics.jsonl + TensorBoard events under `directory`; a no-op on processes other than 0.

  On resume, lines of steps after the restored checkpoint are dropped (they are recomputed).
  Both files are written and flushed in the caller's thread (not by tensorboardX's background
  writer, which on a full disk dies with its own traceback and then blocks the queue): a failed
  write is an OSError from `write`, naming the file.
  """

  def __init__(self, directory: str, *, resume_step: int | None = None):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(directory, "metrics.jsonl")
    self._tb = None
    if not self.enabled:
      return
    os.makedirs(directory, exist_ok=True)
    if os.path.exists(self.path):
      with open(self.path, encoding="utf-8") as f:
        lines = [l for l in f if l.strip()]
      keep = [l for l in lines if resume_step is not None and json.loads(l).get("step", 0) <= resume_step]
      io_utils.write_text(self.path, "".join(keep))
    from tensorboardX.event_file_writer import EventsWriter
    os.makedirs(os.path.join(directory, "tensorboard"), exist_ok=True)
    self._tb = EventsWriter(os.path.join(directory, "tensorboard", "events"))

  def write(self, step: int, values: dict) -> None:
    if not self.enabled:
      return
    from tensorboardX.proto.event_pb2 import Event
    from tensorboardX.proto.summary_pb2 import Summary
    from tensorboardX.summary import scalar
    values = {k: float(np.asarray(v)) for k, v in values.items()}
    with open(self.path, "a", encoding="utf-8") as f:
      f.write(json.dumps({"step": int(step), **values}, sort_keys=True) + "\n")
    scalars = [tag for k, v in values.items() if np.isfinite(v) for tag in scalar(f"train/{k}", v).value]
    self._tb.write_event(Event(wall_time=time.time(), step=int(step), summary=Summary(value=scalars)))
    self._tb.flush()

  def close(self) -> None:
    tb, self._tb = self._tb, None  # closed once, even when closing fails
    if tb is not None:
      tb.close()


def read_metrics(directory: str) -> list[dict]:
  path = os.path.join(directory, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(l) for l in f if l.strip()]

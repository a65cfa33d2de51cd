"""Where a compiled program's time goes, op by op: a profiler trace of a few runs, each thunk
(named after its HLO instruction) classified from the compiled HLO text.

XLA:CPU's thunk runtime records one trace event per executed instruction (a convolution, a dot,
a fusion, a copy), named after it. The compiled module's text says what each name is: its opcode
and, for a fusion, the ops of the computation it calls. Convolution and dot FLOPs are counted from
their shapes (2 multiply-adds per output element and kernel tap), so each kind's achieved rate can
be set beside the machine's matmul rate: if the convolutions alone, at the rate XLA's kernels run
them inside the step, take longer than the whole step may take at a target share of the matmul
rate, no scheduling or fusion of the rest can reach that target.
"""

import collections
import glob
import gzip
import json
import math
import os
import re
import tempfile
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(\S+?)\{?[\d,]*\}?\s+([\w\-]+)\((.*)$")
_COMP = re.compile(r"^(?:ENTRY\s+)?%([\w.\-]+)\s.*\{\s*$")
_SHAPE = re.compile(r"^[a-z]+\d*\[([\d,]*)\]")
KINDS = ("convolution", "dot", "elementwise and reductions", "copy and transpose", "other")


def _dims(shape: str):
  m = _SHAPE.match(shape)
  return [int(v) for v in m.group(1).split(",") if v] if m else None


def parse_hlo(text: str):
  """{computation: [(name, shape, opcode, rest)]} of an HLO module's text."""
  comps, current = {}, None
  for line in text.splitlines():
    c = _COMP.match(line)
    if c:
      current = comps.setdefault(c.group(1), [])
      continue
    m = _INSTR.match(line)
    if m and current is not None:
      current.append(m.groups())
  return comps


def _shapes(comps: dict) -> dict:
  """{instruction: dims} over every computation (instruction names are unique in a module)."""
  return {name: _dims(shape) for body in comps.values() for name, shape, _, _ in body}


def _operands(rest: str) -> list:
  """The operand names of an instruction, from the text after its opcode's '('."""
  return re.findall(r"%([\w.\-]+)", rest.split(")", 1)[0])


def _dim_labels(rest: str) -> str:
  return re.search(r"dim_labels=([\w>\-]+)", rest).group(1)


def conv_flops(out_shape, rhs_shape, dim_labels: str) -> float:
  """2 x output elements x kernel taps per output (the kernel's elements over its 'o' dim)."""
  rhs_labels = dim_labels.split("_")[1].split("->")[0]
  return 2.0 * math.prod(out_shape) * math.prod(rhs_shape) / rhs_shape[rhs_labels.index("o")]


def dot_flops(out_shape, lhs_shape, contracting) -> float:
  return 2.0 * math.prod(out_shape) * math.prod(lhs_shape[i] for i in contracting)


def classify(text: str) -> dict:
  """{instruction name: (kind, flops)} for the instructions the entry computation (and its
  control flow) runs, the instructions inside fusions left out; a fusion takes the kind of the
  heaviest op it calls, and its FLOPs."""
  comps = parse_hlo(text)
  shapes = _shapes(comps)

  def ops_flops(body):
    conv = dot = 0.0
    for name, _, opcode, rest in body:
      operands = _operands(rest)
      if opcode == "convolution":
        conv += conv_flops(shapes[name], shapes[operands[1]], _dim_labels(rest))
      elif opcode == "dot":
        lhs_c = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest).group(1)
        dot += dot_flops(shapes[name], shapes[operands[0]],
                         [int(v) for v in lhs_c.split(",") if v])
    return conv, dot

  fused = {c for body in comps.values() for _, _, opcode, rest in body if opcode == "fusion"
           for c in re.findall(r"calls=%([\w.\-]+)", rest)}
  out = {}
  for comp, body in comps.items():
    if comp in fused:  # its ops run inside the fusion that calls it
      continue
    for name, _, opcode, rest in body:
      conv, dot = 0.0, 0.0
      called = re.search(r"calls=%([\w.\-]+)", rest)
      if opcode in ("convolution", "dot"):
        conv, dot = ops_flops([(name, None, opcode, rest)])
      elif opcode == "fusion" and called:
        conv, dot = ops_flops(comps.get(called.group(1), []))
      if conv or dot:
        kind = "convolution" if conv >= dot else "dot"
      elif opcode in ("copy", "transpose") or "copy" in name or "transpose" in name:
        kind = "copy and transpose"
      elif opcode in ("fusion", "reduce", "add", "multiply", "select", "compare"):
        kind = "elementwise and reductions"
      else:
        kind = "other"
      out[name] = (kind, conv + dot)
  return out


def trace_intervals(run: Callable[[], None], repeats: int = 3) -> dict:
  """{HLO instruction: [(start, end) seconds]} from a profiler trace of `repeats` runs. An
  asynchronous op (XLA:CPU runs convolutions on its thread pool) has a launch event and a later
  "end: <name>" event; its interval runs from the launch to that end."""
  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp, create_perfetto_trace=True):
      for _ in range(repeats):
        run()
    paths = glob.glob(os.path.join(tmp, "**", "*.trace.json.gz"), recursive=True)
    if not paths:
      return {}
    with gzip.open(paths[0]) as f:
      events = sorted((e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"),
                      key=lambda e: e["ts"])
  spans = collections.defaultdict(list)
  for e in events:
    t0, t1 = e["ts"] / 1e6, (e["ts"] + e.get("dur", 0)) / 1e6
    op = (e.get("args") or {}).get("hlo_op")
    if op:
      spans[op].append([t0, t1])
    elif e["name"].startswith("end: ") and spans.get(e["name"][5:]):
      last = spans[e["name"][5:]][-1]
      last[1] = max(last[1], t1)
  return spans


def union_seconds(intervals) -> float:
  """Length of the union of [start, end] intervals (time during which any of them ran)."""
  total, reach = 0.0, -math.inf
  for t0, t1 in sorted(intervals):
    if t1 > reach:
      total += t1 - max(t0, reach)
      reach = t1
  return total


def breakdown(compiled, run: Callable[[], None], repeats: int = 3) -> dict:
  """Per kind (KINDS): wall seconds per run during which some op of the kind ran (ops of one
  kind may overlap each other and other kinds), FLOPs per run and their rate, for `compiled` (a
  jax Compiled) whose one execution `run()` performs and waits for."""
  ops = classify(compiled.as_text())
  spans = trace_intervals(run, repeats)
  rows = {k: {"intervals": [], "flops": 0.0, "ops": 0} for k in KINDS}
  for name, intervals in spans.items():
    if name in ops:
      kind, flops = ops[name]
      rows[kind]["intervals"] += intervals
      rows[kind]["flops"] += flops
      rows[kind]["ops"] += 1
  busy = union_seconds([i for r in rows.values() for i in r["intervals"]]) / repeats
  for r in rows.values():
    r["seconds"] = union_seconds(r.pop("intervals")) / repeats
    r["share"] = r["seconds"] / busy if busy else 0.0
    r["gflops"] = r["flops"] / 1e9 / r["seconds"] if r["seconds"] and r["flops"] else 0.0
  return {"kinds": rows, "busy_seconds": busy, "traced_ops": sum(r["ops"] for r in rows.values())}


def _window(rest: str, n: int) -> dict:
  """An HLO convolution's window attributes as lax.conv_general_dilated arguments."""
  w = dict(t.split("=", 1) for t in re.search(r"window=\{([^}]*)\}", rest).group(1).split())
  ints = lambda key, default: tuple(int(v) for v in w[key].split("x")) if key in w else (default,) * n
  pads = ([tuple(int(v) for v in p.split("_")) for p in w["pad"].split("x")] if "pad" in w
          else [(0, 0)] * n)
  return dict(window_strides=ints("stride", 1), padding=pads, lhs_dilation=ints("lhs_dilate", 1),
              rhs_dilation=ints("rhs_dilate", 1))


def convolutions(text: str) -> list:
  """Every convolution of an HLO module (inside fusions too; each runs once per execution of a
  module without loops), as (lhs dims, rhs dims, dtype, out dims, lax.conv_general_dilated
  keyword arguments, FLOPs)."""
  comps = parse_hlo(text)
  shapes = _shapes(comps)
  out = []
  for body in comps.values():
    for name, shape, opcode, rest in body:
      if opcode != "convolution":
        continue
      lhs, rhs = _operands(rest)[:2]
      labels = _dim_labels(rest)
      lhs_l, rest_l = labels.split("_", 1)
      rhs_l, out_l = rest_l.split("->")
      spatial = [str(i) for i in range(len(lhs_l) - 2)]
      dn = jax.lax.ConvDimensionNumbers(
          tuple(lhs_l.index(c) for c in ["b", "f", *spatial]),
          tuple(rhs_l.index(c) for c in ["o", "i", *spatial]),
          tuple(out_l.index(c) for c in ["b", "f", *spatial]))
      kw = dict(_window(rest, len(spatial)), dimension_numbers=dn)
      for key in ("feature_group_count", "batch_group_count"):
        m = re.search(key + r"=(\d+)", rest)
        if m:
          kw[key] = int(m.group(1))
      out.append((tuple(shapes[lhs]), tuple(shapes[rhs]), shape.split("[")[0],
                  tuple(shapes[name]), kw, conv_flops(shapes[name], shapes[rhs], labels)))
  return out


_DTYPES = {"f32": "float32", "bf16": "bfloat16", "f16": "float16"}


def time_convolutions(text: str, compiler_options=None, repeats: int = 5) -> dict:
  """Each convolution of a compiled module run alone (best of `repeats`, one compile per distinct
  shape), summed: what its convolutions cost with no other op beside them."""
  from pso_jax.training.matmul_rate import best_seconds
  groups = {}  # one entry per distinct convolution: [count, its arguments]
  for lhs, rhs, dtype, out_shape, kw, flops in convolutions(text):
    key = (lhs, rhs, dtype, out_shape, repr(kw))
    groups.setdefault(key, [0, kw, flops])[0] += 1
  total, total_flops = 0.0, 0.0
  for (lhs, rhs, dtype, out_shape, _), (count, kw, flops) in groups.items():
    dt = jnp.dtype(_DTYPES.get(dtype, "float32"))
    a = jnp.asarray(np.random.default_rng(0).standard_normal(lhs), dt)
    b = jnp.asarray(np.random.default_rng(1).standard_normal(rhs), dt)
    fn = jax.jit(lambda a, b, kw=kw: jax.lax.conv_general_dilated(a, b, **kw)) \
        .lower(a, b).compile(compiler_options=compiler_options)
    y = fn(a, b).block_until_ready()
    if tuple(y.shape) != out_shape:
      raise ValueError(f"rebuilt convolution gives {y.shape}, the module's gives {out_shape}")
    total += best_seconds(lambda: fn(a, b).block_until_ready(), repeats) * count
    total_flops += flops * count
  return {"seconds": total, "flops": total_flops,
          "convolutions": sum(g[0] for g in groups.values()), "shapes": len(groups),
          "gflops": total_flops / total / 1e9 if total else 0.0}

"""What a compiled program does per chip, read from its HLO text, and the roofline model built on it.

Used by `python -m pso_jax.bench pod` (programs compiled for a TPU slice on a CPU host), and kept
free of any TPU dependency so that it can be checked on small CPU programs.

HLO accounting (`analyse_hlo`): the compiled module's text is split into computations and
instructions; every computation gets a multiplier, how often one run of the program runs it: 1 for
the entry, the caller's multiplier for a fusion, call or branch, and the caller's times the trip
count for a while body. Trip counts are the compiler's `known_trip_count` where it writes one,
otherwise read from the loop condition (`induction variable < constant`, the start taken from the
while's initial tuple). XLA's own `cost_analysis()` counts a loop body once, whatever its trip
count, so loops (grad accumulation, the audit's blocked search) need this.

- Collectives: all-reduce, all-gather, reduce-scatter, all-to-all, collective-permute, their async
  `-start` forms (the `-done` halves are not counted twice), and the TPU's fused reduce-scatter (an
  all-reduce inside a computation called by an `AllReduceScatter` fusion). For each: its payload
  (`data_bytes`: the reduced array; the gathered output; the scattered input; the permuted
  buffer), the number of devices in its groups, and the bytes one device sends over the links
  with ring algorithms (`traffic_bytes`): 2 (n-1)/n of the payload for an all-reduce, (n-1)/n for
  an all-gather, reduce-scatter or all-to-all, all of it for a permute.
- Matmul FLOPs: every dot and convolution in any computation (fusions included), 2 per
  multiply-add, padded taps counted, times its computation's multiplier.
- Memory traffic: every instruction the runtime executes (not those inside fusions) reads its
  operands and writes its result once: a model of HBM bytes of the same kind as XLA's
  "bytes accessed", but multiplied through loops.

Roofline (`roofline`): the step takes at least the largest of FLOPs / peak FLOP/s, HBM bytes / HBM
bandwidth and ICI bytes / ICI bandwidth (perfect overlap), at most their sum (none). It is a model
from the chip's public figures (`CHIPS`), not a measurement.
"""

import dataclasses
import math
import re
from typing import Optional

# ----------------------------------------------------------------------------- chip constants


@dataclasses.dataclass(frozen=True)
class Chip:
  generation: str        # as in topology names: v5p:2x2x2
  device_kind: str       # jax's device_kind for it
  peak_bf16: float       # dense FLOP/s per chip, bf16 inputs
  hbm_bytes: float       # HBM capacity per chip
  hbm_bw: float          # HBM bytes/s per chip
  ici_bw: Optional[float]  # bidirectional ICI bytes/s per chip, all links (None: not published)
  source: str

  @property
  def ici_out_bw(self) -> Optional[float]:
    """Bytes/s one chip can send: half of the bidirectional figure."""
    return None if self.ici_bw is None else self.ici_bw / 2


GIB = 2.0 ** 30
# Google Cloud's TPU pages (system architecture tables). HBM capacities as the issue states them
# (the pages give "95 GiB" for v5p, "16 GB" for v5e, "32 GiB" for v4, "32 GB" for v6e); the TPU
# compiler itself refuses a program that does not fit, whatever this table says.
CHIPS = {
    "v5p": Chip("v5p", "TPU v5", 459e12, 95 * GIB, 2765e9, 1200e9,
                "https://cloud.google.com/tpu/docs/v5p: 459 TFLOP/s bf16, 95 GiB HBM2e at 2765 GB/s, "
                "ICI 1200 GB/s bidirectional per chip (4800 Gbps)"),
    "v5e": Chip("v5e", "TPU v5 lite", 197e12, 16 * GIB, 819e9, 400e9,
                "https://cloud.google.com/tpu/docs/v5e: 197 TFLOP/s bf16, 16 GB HBM2 at 819 GB/s, "
                "ICI 400 GB/s bidirectional per chip (1600 Gbps)"),
    "v6e": Chip("v6e", "TPU v6 lite", 918e12, 32 * GIB, 1638e9, 800e9,
                "https://cloud.google.com/tpu/docs/v6e: 918 TFLOP/s bf16, 32 GB HBM at 1638 GB/s, "
                "ICI 800 GB/s bidirectional per chip"),
    "v4": Chip("v4", "TPU v4", 275e12, 32 * GIB, 1200e9, None,
               "https://cloud.google.com/tpu/docs/v4: 275 TFLOP/s bf16, 32 GiB HBM2 at 1200 GB/s; "
               "no per-chip ICI figure there (the ICI term is left out)"),
}

# ----------------------------------------------------------------------------- HLO text

DTYPE_BYTES = {
    "pred": 1, "s2": 0.25, "u2": 0.25, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2,
    "u16": 2, "s32": 4, "u32": 4, "s64": 8, "u64": 8, "f16": 2, "bf16": 2, "f32": 4, "f64": 8,
    "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3": 1, "f8e4m3fnuz": 1,
    "f8e5m2fnuz": 1, "f8e4m3b11fnuz": 1, "f8e3m4": 1, "f8e8m0fnu": 1, "f4e2m1fn": 0.5,
    "token": 0,
}
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([\d,]*)\]")
_COMP = re.compile(r"^(?:ENTRY\s+)?%([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_NAME = re.compile(r"^\s*(ROOT\s+)?%([\w.\-]+)\s*=\s*")
_CALLS = re.compile(r"\b(calls|body|condition|to_apply|branch_computations|true_computation|"
                    r"false_computation|async_execution_thread_computation)=(\{[^}]*\}|%[\w.\-]+)")

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
               "ragged-all-to-all", "collective-broadcast")
# instructions that move no data of their own (or whose work is counted in what they call)
_FREE = {"parameter", "tuple", "get-tuple-element", "bitcast", "constant", "while", "call",
         "conditional", "after-all", "partition-id", "replica-id", "opt-barrier",
         "add-dependency", "domain"}


@dataclasses.dataclass(frozen=True)
class Array:
  dtype: str
  dims: tuple

  @property
  def bytes(self) -> float:
    return DTYPE_BYTES.get(self.dtype, 4) * math.prod(self.dims)


@dataclasses.dataclass
class Instruction:
  name: str
  shape: str        # the result's shape text (a tuple in parentheses, or one array with layout)
  opcode: str
  rest: str         # operands and attributes, after the opcode's "("
  root: bool = False

  @property
  def arrays(self) -> list:
    return parse_shape(self.shape)

  @property
  def operands(self) -> list:
    return re.findall(r"%([\w.\-]+)", _balanced(self.rest))

  def calls(self) -> list:
    """(attribute, computation) pairs this instruction calls."""
    out = []
    for attr, target in _CALLS.findall(self.rest):
      out += [(attr, t) for t in re.findall(r"%([\w.\-]+)", target)]
    return out


def parse_shape(text: str) -> list:
  """Every array of a shape text (a tuple's leaves in order); layouts are ignored."""
  text = re.sub(r"\{[^{}]*\}", "", text)  # layouts {1,0:T(8,128)(2,1)} hold no array shapes
  return [Array(dt, tuple(int(d) for d in dims.split(",") if d))
          for dt, dims in _ARRAY.findall(text)]


def _balanced(text: str) -> str:
  """The text up to the ')' that closes the '(' it follows (an instruction's operand list)."""
  depth = 0
  for i, ch in enumerate(text):
    if ch == "(":
      depth += 1
    elif ch == ")":
      if depth == 0:
        return text[:i]
      depth -= 1
  return text


def _split_shape(text: str):
  """(shape, remainder) of 'SHAPE opcode(...)': a tuple shape is a balanced '(...)'."""
  if text.startswith("("):
    depth = 0
    for i, ch in enumerate(text):
      depth += ch == "("
      depth -= ch == ")"
      if depth == 0:
        return text[:i + 1], text[i + 1:].lstrip()
  shape, _, remainder = text.partition(" ")
  return shape, remainder.lstrip()


def parse_module(text: str):
  """({computation: [Instruction]}, entry computation name) of an HLO module's text."""
  comps, current, entry = {}, None, None
  for line in text.splitlines():
    c = _COMP.match(line)
    if c:
      current = comps.setdefault(c.group(1), [])
      if line.startswith("ENTRY"):
        entry = c.group(1)
      continue
    if line.startswith("}"):
      current = None
      continue
    m = _NAME.match(line)
    if m is None or current is None:
      continue
    shape, remainder = _split_shape(line[m.end():])
    op = re.match(r"([\w\-]+)\((.*)$", remainder)
    if op is None:
      continue
    current.append(Instruction(m.group(2), shape, op.group(1), op.group(2), bool(m.group(1))))
  return comps, entry


# ----------------------------------------------------------------------------- loops


def _trip_count(inst: Instruction, comps: dict, by_name: dict) -> Optional[int]:
  """Trip count of a while instruction, or None when it cannot be read."""
  known = re.search(r'"known_trip_count":\{"n":"(\d+)"', inst.rest)
  if known:
    return int(known.group(1))
  cond = dict(inst.calls()).get("condition")
  body = comps.get(cond, [])
  roots = [i for i in body if i.root]
  if not roots or roots[0].opcode != "compare":
    return None
  root = roots[0]
  local = {i.name: i for i in body}
  ops = root.operands
  direction = re.search(r"direction=(\w+)", root.rest)
  if len(ops) != 2 or direction is None:
    return None
  a, b = (local.get(o) for o in ops)
  direction = direction.group(1)
  if a is not None and a.opcode == "constant" and b is not None:  # constant OP variable
    a, b = b, a
    direction = {"GT": "LT", "GE": "LE", "LT": "GT", "LE": "GE"}.get(direction, direction)
  if a is None or b is None or a.opcode != "get-tuple-element" or b.opcode != "constant":
    return None
  limit = _constant(b)
  index = re.search(r"index=(\d+)", a.rest)
  if limit is None or index is None:
    return None
  start = _initial_value(inst, int(index.group(1)), by_name)
  start = 0 if start is None else start
  if direction == "LT":
    return max(0, limit - start)
  if direction == "LE":
    return max(0, limit - start + 1)
  return None


def _constant(inst: Instruction) -> Optional[int]:
  m = re.match(r"\s*(-?\d+)\s*\)", inst.rest)
  return int(m.group(1)) if m else None


def _initial_value(while_inst: Instruction, index: int, by_name: dict) -> Optional[int]:
  """The constant a while loop's tuple element `index` starts from, through copies."""
  ops = while_inst.operands
  init = by_name.get(ops[0]) if ops else None
  if init is None or init.opcode != "tuple":
    return None
  elems = init.operands
  if index >= len(elems):
    return None
  node = by_name.get(elems[index])
  for _ in range(8):
    if node is None:
      return None
    if node.opcode == "constant":
      return _constant(node)
    if node.opcode not in ("copy", "bitcast", "convert"):
      return None
    node = by_name.get(node.operands[0]) if node.operands else None
  return None


def multipliers(comps: dict, entry: str):
  """({computation: runs per program run}, {while name: trip count or None},
  {computations inlined into their caller: fusions, reducers})."""
  by_name = {i.name: i for body in comps.values() for i in body}
  mult = {c: 0.0 for c in comps}
  trips, inlined = {}, set()
  edges = {c: [] for c in comps}  # caller -> [(callee, factor)]
  for c, body in comps.items():
    for inst in body:
      calls = inst.calls()
      if inst.opcode == "while":
        n = _trip_count(inst, comps, by_name)
        trips[inst.name] = n
        n = 1 if n is None else n
        for attr, target in calls:
          edges[c].append((target, n if attr == "body" else n + 1))
        continue
      for attr, target in calls:
        # a fusion's computation and a reducer (reduce, all-reduce, scatter, sort) run inside
        # their caller; a call, a branch or an async op's computation runs as its own
        if inst.opcode == "fusion" or (attr == "to_apply" and inst.opcode != "call"):
          inlined.add(target)
        edges[c].append((target, 1))
  # computations form a DAG; propagate in topological order from the entry
  order, seen = [], set()

  def visit(c):
    if c in seen:
      return
    seen.add(c)
    for t, _ in edges.get(c, []):
      visit(t)
    order.append(c)
  if entry is not None:
    visit(entry)
    mult[entry] = 1.0
  for c in reversed(order):
    for t, f in edges.get(c, []):
      if t in mult:
        mult[t] += mult[c] * f
  return mult, trips, inlined


# ----------------------------------------------------------------------------- collectives


@dataclasses.dataclass
class Collective:
  name: str
  kind: str           # all-reduce | all-gather | reduce-scatter | all-to-all | collective-permute
  group_size: int
  data_bytes: float   # per device, per execution
  count: float        # executions per program run
  traffic_bytes: float = 0.0  # per device, per execution, sent over the links

  @property
  def total_data_bytes(self) -> float:
    return self.data_bytes * self.count

  @property
  def total_traffic_bytes(self) -> float:
    return self.traffic_bytes * self.count


def group_size(rest: str, num_devices: int) -> int:
  """Devices per group of a collective, from any of the replica_groups spellings."""
  m = re.search(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}", rest)
  if m:  # mesh['axis_0'=2,'axis_1'=4], device_ids=(...) {'axis_0'}
    sizes = {k: int(v) for k, v in re.findall(r"'([^']+)'\s*=\s*(\d+)", m.group(1))}
    axes = re.findall(r"'([^']+)'", m.group(2))
    return math.prod(sizes[a] for a in axes) if axes else num_devices
  m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", rest)
  if m:  # iota form [groups,size]<=[...]
    return int(m.group(2))
  m = re.search(r"replica_groups=\{(\{[^}]*\})", rest)
  if m:  # {{0,1,2,3},{4,5,6,7}}
    return len(re.findall(r"\d+", m.group(1)))
  return num_devices  # replica_groups={} or absent: every device


def _traffic(kind: str, data: float, n: int) -> float:
  if kind == "collective-permute":
    return data
  if n <= 1:
    return 0.0
  if kind == "all-reduce":
    return 2.0 * (n - 1) / n * data
  return (n - 1) / n * data


def collectives(comps: dict, mult: dict, num_devices: int) -> list:
  """Every collective of the module with its payload, group size and executions per run."""
  scatter_fusions = set()
  for body in comps.values():
    for inst in body:
      if inst.opcode == "fusion" and "AllReduceScatter" in inst.rest:
        scatter_fusions.update(t for a, t in inst.calls() if a == "calls")
  out = []
  for c, body in comps.items():
    for inst in body:
      op = inst.opcode[:-len("-start")] if inst.opcode.endswith("-start") else inst.opcode
      if op not in COLLECTIVES or mult.get(c, 0) == 0:
        continue
      arrays = [a for a in inst.arrays if a.dims or a.dtype not in ("u32", "s32")]
      if not arrays:
        continue
      n = group_size(inst.rest, num_devices)
      kind = op
      if op == "all-reduce" and (c in scatter_fusions or c.startswith("all-reduce-scatter")):
        kind = "reduce-scatter"  # fused all-reduce + slice: the payload is the whole input
      if op == "all-gather":
        data = max(a.bytes for a in arrays)  # the gathered output
      elif op == "reduce-scatter":
        data = max(a.bytes for a in arrays) * (n if len(arrays) == 1 else 1)  # the input
      elif op == "collective-permute":
        data = arrays[0].bytes
      elif inst.opcode.endswith("-start") and len(arrays) > 1 and op == "all-to-all":
        data = sum(a.bytes for a in arrays[:len(arrays) // 2])
      else:  # all-reduce (a tuple: several arrays reduced at once), all-to-all
        data = sum(a.bytes for a in arrays)
      if kind == "ragged-all-to-all" or kind == "collective-broadcast":
        kind = "all-to-all" if kind == "ragged-all-to-all" else "all-gather"
      pairs = re.search(r"source_target_pairs=\{(.*?)\}\}", inst.rest)
      if op == "collective-permute" and pairs and all(
          a == b for a, b in re.findall(r"\{(\d+),(\d+)", pairs.group(0))):
        data = 0.0  # every device sends to itself
      out.append(Collective(inst.name, kind, n, data, mult[c], _traffic(kind, data, n)))
  return out


def by_kind(colls: list) -> dict:
  """{kind: {count, data_bytes, traffic_bytes}} summed over a program run (per device)."""
  out = {}
  for col in colls:
    row = out.setdefault(col.kind, dict(count=0.0, data_bytes=0.0, traffic_bytes=0.0))
    row["count"] += col.count
    row["data_bytes"] += col.total_data_bytes
    row["traffic_bytes"] += col.total_traffic_bytes
  return out


# ----------------------------------------------------------------------------- FLOPs and bytes


def _matmul_flops(inst: Instruction, shapes: dict) -> float:
  """2 x multiply-adds of a dot or convolution; of a convolution only the kernel taps that meet
  input elements count (not padding, not the holes of a dilated input): the TPU compiler writes
  batched and reshaped matmuls as convolutions over padded or dilated inputs."""
  out = inst.arrays
  ops = inst.operands
  if not out or len(ops) < 2 or ops[0] not in shapes or ops[1] not in shapes:
    return 0.0
  out_elems = math.prod(out[0].dims)
  if inst.opcode == "dot":
    lhs = shapes[ops[0]]
    m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", inst.rest)
    contract = [int(v) for v in m.group(1).split(",") if v] if m else []
    return 2.0 * out_elems * math.prod(lhs.dims[i] for i in contract)
  labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", inst.rest)
  lhs, rhs = shapes[ops[0]], shapes[ops[1]]
  if labels is None:
    return 0.0
  lhs_l, rhs_l, out_l = labels.groups()
  if not (len(lhs_l) == len(lhs.dims) and len(rhs_l) == len(rhs.dims) and len(out_l) == len(out[0].dims)
          and "o" in rhs_l):
    return 0.0
  spatial = sorted(ch for ch in rhs_l if ch.isdigit())
  window = _window(inst.rest, len(spatial))
  taps = 1
  for i, ch in enumerate(spatial):
    size, stride, (lo, _), lhs_dilate, rhs_dilate = (w[i] for w in window)
    n_in, n_out = lhs.dims[lhs_l.index(ch)], out[0].dims[out_l.index(ch)]
    last = (n_in - 1) * lhs_dilate  # the last real element of the dilated input
    taps *= sum(1 for p in range(n_out) for k in range(size)
                if 0 <= (idx := p * stride + k * rhs_dilate - lo) <= last and idx % lhs_dilate == 0)
  per_tap = math.prod(rhs.dims) / (rhs.dims[rhs_l.index("o")] * math.prod(w for w in window[0]))
  per_out = out_elems / math.prod(out[0].dims[out_l.index(ch)] for ch in spatial)
  return 2.0 * per_out * taps * per_tap


def _window(rest: str, n: int):
  """(sizes, strides, (low, high) pads, lhs dilations, rhs dilations) of a convolution's window."""
  w = re.search(r"window=\{([^}]*)\}", rest)
  attrs = dict(re.findall(r"(\w+)=([\w\-]+)", w.group(1))) if w else {}

  def ints(key, default):
    return [int(v) for v in attrs[key].split("x")] if key in attrs else [default] * n
  pads = ([tuple(int(v) for v in p.split("_")) for p in attrs["pad"].split("x")]
          if "pad" in attrs else [(0, 0)] * n)
  return ints("size", 1), ints("stride", 1), pads, ints("lhs_dilate", 1), ints("rhs_dilate", 1)


@dataclasses.dataclass
class HloStats:
  matmul_flops: float          # per device per run, loops multiplied through
  memory_bytes: float          # per device per run: operands read + results written
  collectives: list
  trip_counts: dict            # while instruction -> trip count (None: unknown, counted once)
  loops_counted_once: bool     # some loop body of trip count > 1 (cost_analysis undercounts)
  ops: list = dataclasses.field(default_factory=list)  # (runs, matmul FLOPs, bytes, ICI bytes)
                                                       # of each executed instruction

  @property
  def kinds(self) -> dict:
    return by_kind(self.collectives)

  @property
  def ici_traffic_bytes(self) -> float:
    return sum(c.total_traffic_bytes for c in self.collectives)

  @property
  def unknown_trip_counts(self) -> list:
    return [k for k, v in self.trip_counts.items() if v is None]


_SLICING = ("dynamic-slice", "slice", "gather")


def _users(body: list) -> dict:
  out = {}
  for i in body:
    for o in i.operands:
      out.setdefault(o, []).append(i)
  return out


def _params(body: list) -> dict:
  out = {}
  for i in body:
    if i.opcode == "parameter":
      n = re.match(r"\s*(\d+)", i.rest)
      if n:
        out[int(n.group(1))] = i.name
  return out


def _read_bytes(name: str, body: list, comps: dict, all_bytes: dict, depth: int = 0) -> float:
  """Bytes a fused computation reads of its value `name`: the parts its slices return, followed
  through bitcasts and nested fusions; all of it as soon as any other op uses it."""
  full = all_bytes.get(name, 0.0)
  if any(i.root and i.name == name for i in body):
    return full  # returned as it is: read whole
  total = 0.0
  for u in _users(body).get(name, []):
    if u.opcode in _SLICING and u.operands[:1] == [name]:
      total += all_bytes.get(u.name, 0.0)
    elif u.opcode == "bitcast":
      total += _read_bytes(u.name, body, comps, all_bytes, depth)
    elif u.opcode == "fusion" and depth < 4:
      inner = comps.get(next((t for a, t in u.calls() if a == "calls"), None), [])
      params = _params(inner)
      for index, operand in enumerate(u.operands):
        if operand == name and index in params:
          total += _read_bytes(params[index], inner, comps, all_bytes, depth + 1)
    else:
      return full
  return min(total, full)


def _bytes_moved(inst: Instruction, comps: dict, all_bytes: dict) -> float:
  """Bytes an executed instruction reads and writes: its operands and its result, except that a
  slice (or a fusion operand that is only sliced, through bitcasts and nested fusions) reads
  just the part it returns and a dynamic-update-slice writes just the update in place."""
  ops = inst.operands
  out = all_bytes.get(inst.name, 0.0)
  if inst.opcode in _SLICING:
    return 2 * out + sum(all_bytes.get(o, 0.0) for o in ops[1:])
  if inst.opcode == "dynamic-update-slice":
    return 2 * sum(all_bytes.get(o, 0.0) for o in ops[1:])
  if inst.opcode != "fusion":
    return out + sum(all_bytes.get(o, 0.0) for o in ops)
  body = comps.get(next((t for a, t in inst.calls() if a == "calls"), None), [])
  if not body:
    return out + sum(all_bytes.get(o, 0.0) for o in ops)
  params = _params(body)
  users = _users(body)
  root = next((i for i in body if i.root), None)
  in_place = root is not None and root.opcode == "dynamic-update-slice" and len(root.operands) > 1
  if in_place:
    out = all_bytes.get(root.operands[1], 0.0)  # only the update is written
  total = out
  for index, o in enumerate(ops):
    p = params.get(index)
    if p is None:
      total += all_bytes.get(o, 0.0)
    elif in_place and root.operands[:1] == [p] and users.get(p) == [root]:
      continue  # the buffer updated in place is not read
    else:
      # the parameter has the operand's shape: read as much of it as the computation reads
      total += min(all_bytes.get(o, 0.0), _read_bytes(p, body, comps, all_bytes)) \
          if all_bytes.get(p) == all_bytes.get(o) else all_bytes.get(o, 0.0)
  return total


def analyse_hlo(text: str, num_devices: int) -> HloStats:
  """The per-device accounting of one compiled (partitioned) HLO module's text."""
  comps, entry = parse_module(text)
  mult, trips, inlined = multipliers(comps, entry)
  shapes = {}
  for body in comps.values():
    for inst in body:
      arrays = inst.arrays
      if len(arrays) == 1 and not inst.shape.startswith("("):
        shapes[inst.name] = arrays[0]
  flops = 0.0
  memory = 0.0
  all_bytes = {i.name: sum(a.bytes for a in i.arrays) for body in comps.values() for i in body}
  colls = collectives(comps, mult, num_devices)
  traffic = {c.name: c.traffic_bytes for c in colls}
  own = {c: (sum(_matmul_flops(i, shapes) for i in body if i.opcode in ("dot", "convolution")),
             sum(traffic.get(i.name, 0.0) for i in body)) for c, body in comps.items()}
  fused = {}

  def inside(c, depth=0):
    """(matmul FLOPs, ICI bytes) of one run of computation c, fusions it calls included."""
    if c not in fused:
      f, t = own.get(c, (0.0, 0.0))
      for i in comps.get(c, []):
        if i.opcode == "fusion" and depth < 8:
          for _, callee in i.calls():
            cf, ct = inside(callee, depth + 1)
            f, t = f + cf, t + ct
      fused[c] = (f, t)
    return fused[c]

  ops = []
  for c, body in comps.items():
    m = mult.get(c, 0.0)
    if not m:
      continue
    for inst in body:
      if inst.opcode in ("dot", "convolution"):
        flops += m * _matmul_flops(inst, shapes)
      if c in inlined or inst.opcode in _FREE or inst.opcode.endswith("-done"):
        continue
      moved = _bytes_moved(inst, comps, all_bytes)
      memory += m * moved
      if inst.opcode == "fusion":
        op_flops, op_ici = inside(next((t for a, t in inst.calls() if a == "calls"), ""))
      else:
        op_flops = _matmul_flops(inst, shapes) if inst.opcode in ("dot", "convolution") else 0.0
        op_ici = traffic.get(inst.name, 0.0)
      ops.append((m, op_flops, moved, op_ici))
  return HloStats(flops, memory, colls, trips, any((n or 0) > 1 for n in trips.values()), ops)


# ----------------------------------------------------------------------------- tiles


_LAYOUT = re.compile(r"\b([a-z][a-z0-9]*)\[([\d,]*)\]\{([\d,]*):?((?:T\([\d,]+\))*)")


def tiled_arrays(shape_text: str) -> list:
  """(Array, padded bytes) of each array of a shape text with TPU tiled layouts: the first tile
  T(a, b) rounds the two most minor dimensions (in the layout's minor-to-major order) up to
  multiples of a and b; an array without a tile is not padded."""
  out = []
  for dtype, dims, minor_to_major, tiles in _LAYOUT.findall(shape_text):
    array = Array(dtype, tuple(int(d) for d in dims.split(",") if d))
    padded = list(array.dims)
    first = re.match(r"T\(([\d,]+)\)", tiles)
    order = [int(v) for v in minor_to_major.split(",") if v]
    if first and padded and len(order) == len(padded):
      tile = [int(v) for v in first.group(1).split(",")]
      for t, axis in zip(reversed(tile), order):  # the tile's last entry is the most minor
        padded[axis] = -(-padded[axis] // t) * t
    out.append((array, DTYPE_BYTES.get(dtype, 4) * math.prod(padded)))
  return out


def tile_padding(text: str, min_bytes: float = 2 ** 20, top: int = 5) -> dict:
  """Logical vs tile-padded bytes of the entry's parameters (the state and the batch), and the
  results (of at least `min_bytes`) that padding inflates the most."""
  comps, entry = parse_module(text)
  params = [i for i in comps.get(entry, []) if i.opcode == "parameter"]
  logical = padded = 0.0
  for inst in params:
    for array, nbytes in tiled_arrays(inst.shape):
      logical += array.bytes
      padded += nbytes
  worst = {}
  for body in comps.values():
    for inst in body:
      for array, nbytes in tiled_arrays(inst.shape):
        if array.bytes >= min_bytes and nbytes > array.bytes * 1.05:
          key = f"{array.dtype}{list(array.dims)}"
          worst[key] = max(worst.get(key, 0.0), nbytes / array.bytes)
  return dict(parameters_logical=logical, parameters_padded=padded,
              most_padded=sorted(worst.items(), key=lambda kv: -kv[1])[:top])


# ----------------------------------------------------------------------------- roofline


def roofline(*, flops: float, hbm_bytes: float, ici_bytes: float, chip: Chip,
             useful_flops: Optional[float] = None, ops: Optional[list] = None) -> dict:
  """Per-chip step time by the roofline model, and the share of peak it implies.

  flops: what the chip's matrix units execute; useful_flops: the model's own count (default:
  flops), the numerator of MFU. Returns seconds per term, the bound (largest term), the
  estimate with perfect overlap (the largest term: the issue's roofline) and with none (the sum),
  and MFU for both. With `ops` ((runs, FLOPs, HBM bytes, ICI bytes) per executed instruction,
  HloStats.ops) also the per-op roofline: the instructions run one after another, each taking
  its own largest term (`step_s_per_op`, `mfu_per_op`).
  """
  useful = flops if useful_flops is None else useful_flops
  ici_bw = chip.ici_out_bw
  terms = {"compute": flops / chip.peak_bf16, "hbm": hbm_bytes / chip.hbm_bw}
  if ici_bw is not None:
    terms["ici"] = ici_bytes / ici_bw
  overlap = max(terms.values())
  serial = sum(terms.values())
  bound = max(terms, key=terms.get)
  out = dict(seconds=terms, bound=bound, step_s=overlap, step_s_serial=serial,
             mfu=useful / (overlap * chip.peak_bf16) if overlap else 0.0,
             mfu_serial=useful / (serial * chip.peak_bf16) if serial else 0.0,
             intensity=flops / hbm_bytes if hbm_bytes else math.inf,
             ridge=chip.peak_bf16 / chip.hbm_bw)
  if ops is not None:
    per_op = sum(m * max(f / chip.peak_bf16, b / chip.hbm_bw, t / ici_bw if ici_bw else 0.0)
                 for m, f, b, t in ops)
    out["step_s_per_op"] = per_op
    out["mfu_per_op"] = useful / (per_op * chip.peak_bf16) if per_op else 0.0
  return out

"""Pod scale without a pod: the train step and the audit's search compiled for a TPU slice on a CPU host.

  python -m pso_jax.bench pod --topology=v5p:2x2x2 --preset=xs --batch=2048 --fsdp=1 --dtype=bfloat16
  python -m pso_jax.bench pod --topology=v5p-64 --audit               # the audit's all-pairs search
  python -m pso_jax.bench pod --sweep --out=/tmp/pod_sweep.jsonl       # the table of docs/pod_scale.md
  python -m pso_jax.bench pod --table=/tmp/pod_sweep.jsonl             # that table, as markdown

Needs libtpu (`pip install -e ".[tpu-aot]"`), no TPU: `jax.experimental.topologies` describes the
slice's chips and the real TPU compiler compiles for them. The program compiled is the train
stage's own jitted step (`diffusion.train_step.jit_train_step(make_train_step(...))`, with the
FSDP state shardings, batch sharding, grad accumulation and donation of `stages/train.py`) at the
reference recipe's 64x64x4 latents and 2048-d pseudo-conditions, lowered from ShapeDtypeStructs;
and `search.pairwise`'s sharded blocked top-k engine, with its block sizes, padding and the kernel
`knn(kernel="auto")` picks on a TPU (`--audit_kernel`). JAX's
default backend stays on the CPU, so nothing is allocated anywhere.

Per chip it prints: HBM bytes of arguments, outputs, temporaries and in total (the compiler's
memory analysis) against the chip's HBM; the state's bytes per chip by part and how FSDP divides
them; FLOPs per step (the model's, EDM2's convention, and the matmul FLOPs of the compiled
program, loops multiplied through); the bytes each kind of collective moves (read from the
compiled HLO); the compile time; and a roofline estimate of the step (roofline.py): a model from
public chip figures, not a measurement.
"""

import argparse
import dataclasses
import fnmatch
import importlib.metadata
import json
import math
import os
import re
import subprocess
import sys
import time

from pso_jax.bench import roofline
from pso_jax.errors import UserError

# Google Cloud accelerator types -> topology names. v5p and v4 types count TensorCores (two per
# chip), v5e / v6e types count chips: v5p-8 is 4 chips (2x2x1), v5e-256 is 256 chips (16x16).
_V5P_SHAPES = {8: "2x2x1", 16: "2x2x2", 32: "2x2x4", 64: "2x4x4", 128: "4x4x4", 256: "4x4x8",
               512: "4x8x8", 1024: "8x8x8", 2048: "8x8x16", 4096: "8x16x16"}
_2D_SHAPES = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
              256: "16x16"}
ALIASES = {
    **{f"v5p-{n}": f"v5p:{s}" for n, s in _V5P_SHAPES.items()},
    **{f"v4-{n}": f"v4:{s}" for n, s in _V5P_SHAPES.items()},
    **{f"v5e-{n}": f"v5e:{s}" for n, s in _2D_SHAPES.items()},
    **{f"v5litepod-{n}": f"v5e:{s}" for n, s in _2D_SHAPES.items()},
    **{f"v6e-{n}": f"v6e:{s}" for n, s in _2D_SHAPES.items()},
}
TOPOLOGY_EXAMPLES = "v5p:2x2x1 (= v5p-8, 4 chips), v5p:2x4x4 (= v5p-64), v5p:4x4x8 (= v5p-256), v5e:16x16 (= v5e-256)"

# The sweep of docs/pod_scale.md: each preset on v5p-8 / v5p-64 / v5p-256 at the reference batch,
# the FSDP check, and v5e-256; a case that does not fit is followed by its fallbacks.
SWEEP = [
    dict(topology="v5p-8", preset="xs", batch=2048, fsdp=1, grad_accum=1),
    dict(topology="v5p-8", preset="s", batch=2048, fsdp=1, grad_accum=1),
    dict(topology="v5p-8", preset="m", batch=2048, fsdp=1, grad_accum=1),
    dict(topology="v5p-64", preset="xs", batch=2048, fsdp=1, grad_accum=1),
    dict(topology="v5p-64", preset="s", batch=2048, fsdp=1, grad_accum=1),
    dict(topology="v5p-64", preset="m", batch=2048, fsdp=1, grad_accum=1),
    dict(topology="v5p-64", preset="m", batch=2048, fsdp=8, grad_accum=1),
    dict(topology="v5p-256", preset="xs", batch=2048, fsdp=1, grad_accum=1),
    dict(topology="v5p-256", preset="s", batch=2048, fsdp=1, grad_accum=1),
    dict(topology="v5p-256", preset="m", batch=2048, fsdp=1, grad_accum=1),
    dict(topology="v5e-256", preset="m", batch=2048, fsdp=8, grad_accum=1),
]
AUDIT_SWEEP = [dict(topology=t, ring=r) for t in ("v5p-8", "v5p-64", "v5p-256") for r in (False, True)]


# ----------------------------------------------------------------------------- set-up checks


def check_libtpu() -> str:
  """The installed libtpu's version, or a UserError naming what to install."""
  import jax
  pins = [r.split(";")[0].strip() for r in (importlib.metadata.requires("jax") or [])
          if re.match(r"libtpu\b", r)]
  pin = pins[0] if pins else "libtpu"
  fix = (f'pip install -e ".[tpu-aot]" (which installs {pin}, the libtpu jax {jax.__version__} '
         f"was built with), or pip install '{pin}'")
  try:
    have = importlib.metadata.version("libtpu")
  except importlib.metadata.PackageNotFoundError:
    raise UserError(f"libtpu is not installed: compiling for a TPU slice needs the TPU compiler it "
                    f"holds (no TPU is needed). Install it: {fix}") from None
  want = pin.split("==", 1)[1] if "==" in pin else None
  if want and not fnmatch.fnmatch(have, want):
    raise UserError(f"libtpu {have} is installed, but jax {jax.__version__} needs {pin}; a "
                    f"mismatched TPU compiler fails or miscompiles. Install the matching one: {fix}")
  return have


def resolve_topology(name: str):
  """(topology name, its devices, its Chip) for 'v5p:2x2x2' or an accelerator type 'v5p-16'."""
  from jax.experimental import topologies
  topo_name = ALIASES.get(name.lower(), name)
  generation = topo_name.split(":")[0].lower()
  if ":" not in topo_name or generation not in roofline.CHIPS:
    raise UserError(f"unknown TPU topology {name!r}: use GENERATION:SHAPE with a generation of "
                    f"{', '.join(roofline.CHIPS)}, e.g. {TOPOLOGY_EXAMPLES}")
  try:
    topo = topologies.get_topology_desc(platform="tpu", topology_name=topo_name)
  except Exception as e:  # noqa: BLE001 - libtpu's own error types
    first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
    if "lockfile" in first:
      raise UserError(f"libtpu could not start: another process holds /tmp/libtpu_lockfile ({first}); "
                      "run with ALLOW_MULTIPLE_LIBTPU_LOAD=1 (no TPU is used here)") from None
    raise UserError(f"libtpu does not know the TPU topology {topo_name!r} ({first}); use one of "
                    f"the slice shapes Google Cloud sells, e.g. {TOPOLOGY_EXAMPLES}") from None
  devices = list(topo.devices)
  chip = roofline.CHIPS[generation]
  kinds = {d.device_kind for d in devices}
  if kinds != {chip.device_kind}:
    raise UserError(f"topology {topo_name} has devices of kind {sorted(kinds)}, not "
                    f"{chip.device_kind!r} as roofline.CHIPS[{generation!r}] expects")
  return topo_name, devices, chip


def check_mesh(n_chips: int, fsdp: int, batch: int, grad_accum: int, topology: str) -> None:
  divisors = [d for d in range(1, n_chips + 1) if n_chips % d == 0]
  if fsdp < 1 or n_chips % fsdp:
    raise UserError(f"--fsdp={fsdp} does not divide the {n_chips} chips of {topology}: the mesh is "
                    f"(data={n_chips}/fsdp, fsdp); use one of {divisors}")
  if batch < 1 or grad_accum < 1 or batch % grad_accum or (batch // grad_accum) % n_chips:
    step = n_chips * max(grad_accum, 1)
    raise UserError(f"--batch={batch} with --grad_accum={grad_accum} does not split over the "
                    f"{n_chips} chips of {topology}: every micro-batch must hold a whole number "
                    f"of images per chip; use a multiple of {step}, e.g. --batch="
                    f"{step * max(1, round(batch / step))}")


def _setup_jax():
  """Concrete arrays (keys, the config's constants) stay on the host CPU; libtpu is loaded only
  for its compiler, so other processes that loaded it (any jax process of this environment tries
  to) need not be waited for, and no cloud metadata server is asked what TPU this host has."""
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  import jax
  jax.config.update("jax_platforms", os.environ["JAX_PLATFORMS"])
  return jax


# ----------------------------------------------------------------------------- the train step


def _config(preset: str, batch: int, fsdp: int, grad_accum: int, dtype: str):
  from pso_jax.bench import cxr_config
  config = cxr_config("")  # reference recipe: 512 px -> 64x64x4 SD-VAE latents, 2048-d features
  config.model.preset = preset
  config.model.dtype = dtype
  config.train.batch_size = batch
  config.train.grad_accum = grad_accum
  config.mesh.data = -1
  config.mesh.fsdp = fsdp
  return config


def _shard_bytes(sds) -> float:
  shape = sds.sharding.shard_shape(tuple(sds.shape))
  return math.prod(shape) * sds.dtype.itemsize


def state_bytes(abstract, shardings, min_size: int) -> dict:
  """Per-chip and unsharded bytes of the train state by part, and of its large (FSDP) leaves."""
  import jax
  from pso_jax import parallel
  parts = dict(params=abstract.params, opt_state=abstract.opt_state, ema=abstract.ema,
               other=(abstract.step, abstract.constants))
  part_shardings = dict(params=shardings.params, opt_state=shardings.opt_state, ema=shardings.ema,
                        other=(shardings.step, shardings.constants))
  out = {}
  for part, tree in parts.items():
    sds = jax.tree.leaves(parallel.with_shardings(tree, part_shardings[part]))
    out[part] = dict(per_chip=sum(_shard_bytes(s) for s in sds),
                     unsharded=sum(math.prod(s.shape) * s.dtype.itemsize for s in sds),
                     large_per_chip=sum(_shard_bytes(s) for s in sds if math.prod(s.shape) >= min_size),
                     large_unsharded=sum(math.prod(s.shape) * s.dtype.itemsize for s in sds
                                         if math.prod(s.shape) >= min_size))
  return out


def compile_train_step(devices, preset: str, batch: int, fsdp: int, grad_accum: int, dtype: str):
  """(compiled, info): the train stage's jitted step compiled for `devices` from abstract inputs."""
  import jax
  from jax.sharding import NamedSharding, PartitionSpec as P
  from pso_jax import parallel
  from pso_jax.diffusion import train_setup
  from pso_jax.diffusion import train_step as step_lib
  from pso_jax.models import flops as flops_lib
  from pso_jax.models import presets
  config = _config(preset, batch, fsdp, grad_accum, dtype)
  train_setup.check_config(config)
  mesh = parallel.make_mesh(config.mesh, devices)
  parallel.micro_batch_size(batch, grad_accum, mesh)
  model = presets.build_model(config)
  abstract, shardings = train_setup.abstract_state(model, config, mesh)  # as stages/train.py
  state = parallel.with_shardings(abstract, shardings)
  rows = parallel.batch_sharding(mesh)
  h, w, c = presets.model_input_shape(config)
  batch_sds = {"x": jax.ShapeDtypeStruct((batch, h, w, c), jax.numpy.float32, sharding=rows)}
  if model.cond_dim:  # train_setup.model_batch's fields for this config
    batch_sds["cond"] = jax.ShapeDtypeStruct((batch, model.cond_dim), jax.numpy.float32, sharding=rows)
  from pso_jax.diffusion import regulariser
  if config.model.cond != "uncond" and regulariser.uses_kanon(config.regulariser):
    batch_sds["kanon_cond"] = batch_sds["cond"]
  key = jax.eval_shape(lambda: jax.random.key(0))
  key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=NamedSharding(mesh, P()))
  start, cpu0 = time.perf_counter(), time.process_time()
  with jax.set_mesh(mesh):
    lowered = step_lib.jit_train_step(step_lib.make_train_step(model, config), shardings, mesh) \
        .lower(state, batch_sds, key)
    lower_s = time.perf_counter() - start
    compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  cpu_s = time.process_time() - cpu0
  forward = flops_lib.forward_flops(model, {"params": abstract.params, **abstract.constants},
                                    (h, w, c), batch=1)
  info = dict(mesh=dict(data=mesh.shape["data"], fsdp=mesh.shape["fsdp"]),
              params=presets.count_params({"params": abstract.params}),
              model_flops_per_step=3.0 * forward * batch,  # forward + backward (2x), EDM2's count
              forward_flops_per_image=forward,
              state=state_bytes(abstract, shardings, int(config.mesh.fsdp_min_size)),
              batch_bytes_per_chip=sum(_shard_bytes(s) for s in batch_sds.values()),
              lower_s=lower_s, compile_s=compile_s, compile_cpu_s=cpu_s)
  return compiled, info


def fsdp_check(devices, preset: str, dtype: str, sizes=(1, 2, 4, 8, 16, 32)) -> list:
  """Per-chip state bytes (parameters, Adam moments, EMA copies) for each FSDP size that divides
  the chips: what parallel.state_shardings gives, without compiling anything."""
  from pso_jax import parallel
  from pso_jax.diffusion import train_setup
  from pso_jax.models import presets
  rows = []
  for fsdp in sizes:
    if len(devices) % fsdp:
      continue
    config = _config(preset, len(devices), fsdp, 1, dtype)
    mesh = parallel.make_mesh(config.mesh, devices)
    abstract, shardings = train_setup.abstract_state(presets.build_model(config), config, mesh)
    rows.append(dict(fsdp=fsdp, **state_bytes(abstract, shardings, int(config.mesh.fsdp_min_size))))
  return rows


def _print_fsdp_check(preset: str, topology: str, rows: list) -> None:
  print(f"FSDP check: {preset} state per chip on {topology} (parallel.state_shardings, no compile)")
  base = None
  for r in rows:
    parts = {k: r[k] for k in ("params", "opt_state", "ema", "other")}
    total = sum(v["per_chip"] for v in parts.values())
    large = sum(v["large_per_chip"] for v in parts.values())
    small = total - large
    base = base or (total, large)
    print(f"  fsdp={r['fsdp']:3d}: {_gib(total)} per chip (/{base[0] / total:.2f} vs fsdp=1); large "
          f"leaves {_gib(large)} (/{base[1] / max(large, 1):.2f}), replicated small leaves {_gib(small)}")


# ----------------------------------------------------------------------------- the audit search


def compile_audit(devices, n: int, m: int, d: int, k: int, dtype: str, ring: bool,
                  query_block: int, ref_block: int, kernel: str = "auto"):
  """(compiled, info): search.pairwise's top-k engine as knn() would run it for n x m x d with
  the named kernel (pairwise.KERNELS)."""
  import jax
  import numpy as np
  from pso_jax import parallel
  from pso_jax.search import pairwise
  mesh = parallel.data_mesh(devices)
  n_dev = mesh.size
  kk = min(k + pairwise._margin(k, dtype), m)  # as knn(): candidates kept per query
  kern = pairwise.resolve_kernel(kernel, mesh, ring)
  kernel = kernel if kernel != "auto" else next(k for k, v in pairwise.KERNELS.items() if v == kern)
  if dtype == "float32":  # as knn(): an fp32 search keeps exact fp32 similarities
    kern = pairwise.Kernel(kern.chunk)
  qb, rb, n_rows = pairwise.topk_plan(n, m, query_block, ref_block, n_dev, ring, kern)
  n_pad = -(-n // (n_dev * qb)) * n_dev * qb  # as _run_engine pads the queries
  host = jax.numpy.bfloat16 if dtype == "bfloat16" else jax.numpy.float32
  rows = parallel.batch_sharding(mesh)
  refs_sharding = rows if ring else parallel.replicated(mesh)
  args = (jax.ShapeDtypeStruct((n_pad, d), host, sharding=rows),
          jax.ShapeDtypeStruct((n_rows, d), host, sharding=refs_sharding),
          jax.ShapeDtypeStruct((n_rows,), np.int32, sharding=refs_sharding))
  fn = pairwise._engine(mesh, ring, ("topk", kk, kern), qb, rb, dtype, n_rows > m)
  start, cpu0 = time.perf_counter(), time.process_time()
  with jax.set_mesh(mesh):
    compiled = fn.lower(*args).compile()
  info = dict(n=n, m=m, d=d, k=k, kk=kk, query_block=qb, ref_block=rb, padded_queries=n_pad,
              reference_rows=n_rows, ring=ring, dtype=dtype, kernel=kernel,
              kernel_params=dataclasses.asdict(kern),
              gemm_flops=2.0 * n * m * d, padded_gemm_flops=2.0 * n_pad * n_rows * d,
              refs_bytes_per_chip=_shard_bytes(args[1]), queries_bytes_per_chip=_shard_bytes(args[0]),
              block_bytes=dict(query_block=qb * d * np.dtype(host).itemsize,
                               ref_block=rb * d * np.dtype(host).itemsize,
                               similarity_block=qb * rb * 4),
              compile_s=time.perf_counter() - start, compile_cpu_s=time.process_time() - cpu0)
  return compiled, info


# ----------------------------------------------------------------------------- analysis


def analyse(compiled, n_chips: int, chip, useful_flops_per_chip: float, hlo_path: str = "") -> dict:
  """Memory, FLOPs, collectives and the roofline of one compiled program, per chip."""
  mem = compiled.memory_analysis()
  memory = dict(argument=mem.argument_size_in_bytes, output=mem.output_size_in_bytes,
                alias=mem.alias_size_in_bytes, temp=mem.temp_size_in_bytes,
                code=mem.generated_code_size_in_bytes,
                host=getattr(mem, "host_argument_size_in_bytes", 0) + getattr(mem, "host_temp_size_in_bytes", 0))
  cost = compiled.cost_analysis()
  cost = (cost[0] if isinstance(cost, (list, tuple)) and cost else cost) or {}
  cost = {k: float(v) for k, v in cost.items()
          if k in ("flops", "bytes accessed", "transcendentals", "optimal_seconds")}
  text = compiled.as_text()
  if hlo_path:
    with open(hlo_path, "w", encoding="utf-8") as f:
      f.write(text)
  return analyse_parts(memory, cost, text, n_chips, chip, useful_flops_per_chip)


def analyse_parts(memory: dict, cost: dict, text: str, n_chips: int, chip,
                  useful_flops_per_chip: float) -> dict:
  """analyse() from its parts: the compiler's memory and cost analyses and the HLO text (so a
  saved sweep can be analysed again without compiling)."""
  memory = dict(memory)
  memory["total"] = (memory["argument"] + memory["output"] - memory["alias"] + memory["temp"]
                     + memory["code"])
  memory["hbm"] = chip.hbm_bytes
  memory["fits"] = memory["total"] <= chip.hbm_bytes
  stats = roofline.analyse_hlo(text, n_chips)
  # XLA's cost analysis counts a loop body once: where loops run more than once, the loop-aware
  # counts of roofline.analyse_hlo stand in for it (the larger of the two otherwise)
  flops = stats.matmul_flops if stats.loops_counted_once else max(stats.matmul_flops, cost.get("flops", 0.0))
  hbm = stats.memory_bytes if stats.loops_counted_once else cost.get("bytes accessed", stats.memory_bytes)
  # MFU counts the model's FLOPs, but never more than the compiled matmuls: EDM2's count includes
  # the kernel taps on the zero padding (16% of a 3x3 convolution at 8x8) and a full backward
  # pass, which the compiled program skips
  useful = min(useful_flops_per_chip, stats.matmul_flops) if stats.matmul_flops else useful_flops_per_chip
  est = roofline.roofline(flops=flops, hbm_bytes=hbm, ici_bytes=stats.ici_traffic_bytes, chip=chip,
                          useful_flops=useful, ops=stats.ops)
  # the TPU compiler's own estimate of the program's time (its cost model; loop bodies once)
  compiler_s = cost.get("optimal_seconds", 0.0)
  est["compiler_step_s"] = compiler_s if not stats.loops_counted_once else 0.0
  est["compiler_mfu"] = useful / (compiler_s * chip.peak_bf16) if est["compiler_step_s"] else 0.0
  return dict(memory=memory, cost=cost,
              flops=dict(xla_cost_analysis=cost.get("flops", 0.0), hlo_matmul=stats.matmul_flops,
                         used=flops, useful=useful, model=useful_flops_per_chip),
              hbm_bytes=dict(xla_cost_analysis=cost.get("bytes accessed", 0.0),
                             hlo_model=stats.memory_bytes, used=hbm),
              collectives=stats.kinds, ici_traffic_bytes=stats.ici_traffic_bytes,
              loops=dict(trip_counts=stats.trip_counts, unknown=stats.unknown_trip_counts,
                         counted_once_by_xla=stats.loops_counted_once),
              roofline=est, layout_notes=layout_notes(text))


def layout_notes(text: str) -> dict:
  """What the TPU compile did that a CPU compile does not show: counts read from the HLO."""
  return dict(
      remat_or_clone=len(re.findall(r"%[\w.\-]*(?:remat|rematerialized)[\w.\-]*\s*=", text)),
      host_offload=len(re.findall(r"S\(5\)", text)),  # memory space 5: pinned host memory
      copies=len(re.findall(r"\s(?:copy|copy-start)\(", text)),
      transposes=len(re.findall(r"\stranspose\(", text)),
      custom_calls=sorted(set(re.findall(r'custom_call_target="([^"]+)"', text))),
      tiles=roofline.tile_padding(text),
  )


# ----------------------------------------------------------------------------- printing


def _gib(x: float) -> str:
  return f"{x / 2 ** 30:.2f} GiB"


def _print_train(r: dict) -> None:
  a, chip = r["analysis"], roofline.CHIPS[r["generation"]]
  mem, est = a["memory"], a["roofline"]
  print(f"pod bench (train step): preset={r['preset']} batch={r['batch']} grad_accum={r['grad_accum']} "
        f"dtype={r['dtype']} on {r['topology']} ({r['chips']} x {chip.device_kind}), mesh "
        f"data={r['mesh']['data']} x fsdp={r['mesh']['fsdp']}; {r['params'] / 1e6:.1f} M parameters")
  print(f"  compile: {r['compile_s']:.1f} s wall ({r['compile_cpu_s']:.1f} s CPU), lowering "
        f"{r['lower_s']:.1f} s of it")
  print(f"  HBM per chip: arguments {_gib(mem['argument'])}, outputs {_gib(mem['output'])} "
        f"({_gib(mem['alias'])} aliased to donated arguments), temporaries {_gib(mem['temp'])}, "
        f"code {_gib(mem['code'])}; total {_gib(mem['total'])} of {_gib(mem['hbm'])} -> "
        f"{'fits' if mem['fits'] else 'DOES NOT FIT'}")
  s = r["state"]
  parts = ", ".join(f"{k} {_gib(v['per_chip'])}" for k, v in s.items())
  whole = sum(v["per_chip"] for v in s.values())
  full = sum(v["unsharded"] for v in s.values())
  large = sum(v["large_per_chip"] for v in s.values())
  large_full = sum(v["large_unsharded"] for v in s.values())
  print(f"  state per chip: {parts}; {_gib(whole)} of {_gib(full)} unsharded (/{full / whole:.2f}); "
        f"large leaves {_gib(large)} of {_gib(large_full)} (/{large_full / max(large, 1):.2f} with "
        f"fsdp={r['mesh']['fsdp']}; {large_full / max(full, 1):.1%} of the state is in them)")
  f = a["flops"]
  print(f"  FLOPs per chip per step: model {f.get('model', f['useful']) / 1e12:.2f} T (3x forward, "
        f"{r['forward_flops_per_image'] / 1e9:.1f} GFLOP per image forward), compiled matmuls "
        f"{f['hlo_matmul'] / 1e12:.2f} T, XLA cost analysis {f['xla_cost_analysis'] / 1e12:.2f} T")
  _print_collectives(a)
  _print_roofline(a, chip, per_chip_items=r["batch"] / r["chips"], unit="images")


def _print_collectives(a: dict) -> None:
  rows = a["collectives"]
  if not rows:
    print("  collectives: none")
  for kind, row in sorted(rows.items()):
    print(f"  {kind:18s} x{row['count']:6.0f}: payload {_gib(row['data_bytes'])}, sent per chip "
          f"{_gib(row['traffic_bytes'])}")
  loops = a["loops"]
  if loops["trip_counts"]:
    print(f"  loops: trip counts {sorted(set(v for v in loops['trip_counts'].values() if v))}"
          + (f"; {len(loops['unknown'])} unknown (counted once)" if loops["unknown"] else "")
          + ("; XLA's cost analysis counts each body once, the loop-aware HLO counts are used"
             if loops["counted_once_by_xla"] else ""))


def _print_roofline(a: dict, chip, per_chip_items: float, unit: str, share: str = "MFU") -> None:
  est, hbm = a["roofline"], a["hbm_bytes"]["used"]
  t = est["seconds"]
  terms = ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in t.items())
  print(f"  roofline (a MODEL from public chip figures, not a measurement): {terms}; HBM traffic "
        f"{_gib(hbm)}, ICI sent {_gib(a['ici_traffic_bytes'])}; intensity "
        f"{est['intensity']:.0f} FLOP/B vs ridge {est['ridge']:.0f}")
  print(f"  estimate: {est['step_s'] * 1e3:.2f} ms per step ({est['bound']}-bound; "
        f"{est['step_s_serial'] * 1e3:.2f} ms with no overlap) -> {per_chip_items / est['step_s']:.1f} "
        f"{unit}/s per chip, {share} {est['mfu']:.1%} ({est['mfu_serial']:.1%} with no overlap)")
  if est.get("step_s_per_op"):
    print(f"  per op (one instruction after another, each at its own roofline): "
          f"{est['step_s_per_op'] * 1e3:.2f} ms per step -> {per_chip_items / est['step_s_per_op']:.1f} "
          f"{unit}/s per chip, {share} {est['mfu_per_op']:.1%}")
  if est.get("compiler_step_s"):
    print(f"  the TPU compiler's own estimate (cost_analysis optimal_seconds): "
          f"{est['compiler_step_s'] * 1e3:.2f} ms per step -> {per_chip_items / est['compiler_step_s']:.1f} "
          f"{unit}/s per chip, {share} {est['compiler_mfu']:.1%}")


def _print_audit(r: dict) -> None:
  a, chip = r["analysis"], roofline.CHIPS[r["generation"]]
  mem, b = a["memory"], r["block_bytes"]
  print(f"pod bench (audit search): {r['n']} queries x {r['m']} references x {r['d']} d, k={r['k']} "
        f"(kk={r['kk']}), {r['dtype']}, {'ring-rotated' if r['ring'] else 'replicated'} references "
        f"on {r['topology']} ({r['chips']} x {chip.device_kind}); blocks {r['query_block']} x "
        f"{r['ref_block']}")
  print(f"  compile: {r['compile_s']:.1f} s wall ({r['compile_cpu_s']:.1f} s CPU)")
  print(f"  HBM per chip: references {_gib(r['refs_bytes_per_chip'])}, queries "
        f"{_gib(r['queries_bytes_per_chip'])}, one reference block {b['ref_block'] / 2 ** 20:.1f} MiB, "
        f"one similarity block {b['similarity_block'] / 2 ** 20:.1f} MiB"
        f"{' (never stored: two-stage)' if r.get('kernel_params', {}).get('two_stage') else ''}; "
        f"compiled: arguments "
        f"{_gib(mem['argument'])}, temporaries {_gib(mem['temp'])}, total {_gib(mem['total'])} of "
        f"{_gib(mem['hbm'])} -> {'fits' if mem['fits'] else 'DOES NOT FIT'}")
  f = a["flops"]
  print(f"  FLOPs per chip: all-pairs GEMM {f.get('model', f['useful']) / 1e12:.2f} T (2 N M d / chips), compiled "
        f"matmuls {f['hlo_matmul'] / 1e12:.2f} T (padding included), XLA cost analysis "
        f"{f['xla_cost_analysis'] / 1e12:.3f} T (loop bodies once)")
  _print_collectives(a)
  _print_roofline(a, chip, per_chip_items=r["n"] / r["chips"], unit="queries",
                  share="all-pairs GEMM FLOPs at a share of bf16 peak of")


# ----------------------------------------------------------------------------- cases


def run_train_case(topology, preset, batch, fsdp, grad_accum, dtype, hlo_dir="") -> dict:
  check_libtpu()
  name, devices, chip = resolve_topology(topology)
  check_mesh(len(devices), fsdp, batch, grad_accum, name)
  row = dict(kind="train", topology=name, alias=topology if topology != name else "",
             generation=chip.generation, chips=len(devices), preset=preset, batch=batch,
             fsdp=fsdp, grad_accum=grad_accum, dtype=dtype)
  try:
    compiled, info = compile_train_step(devices, preset, batch, fsdp, grad_accum, dtype)
  except Exception as e:  # noqa: BLE001
    if _is_oom(e):  # the TPU compiler refuses a program that does not fit in HBM
      return dict(row, fits=False, error=_oom_summary(e))
    raise
  row.update(info)
  hlo = os.path.join(hlo_dir, f"train_{name.replace(':', '_')}_{preset}_b{batch}_f{fsdp}_a{grad_accum}.hlo") if hlo_dir else ""
  row["analysis"] = analyse(compiled, len(devices), chip, info["model_flops_per_step"] / len(devices), hlo)
  row["hlo"] = hlo
  row["fits"] = row["analysis"]["memory"]["fits"]
  return row


def run_audit_case(topology, n, m, d, k, dtype, ring, query_block, ref_block, hlo_dir="",
                   kernel="auto") -> dict:
  check_libtpu()
  name, devices, chip = resolve_topology(topology)
  row = dict(kind="audit", topology=name, alias=topology if topology != name else "",
             generation=chip.generation, chips=len(devices))
  try:
    compiled, info = compile_audit(devices, n, m, d, k, dtype, ring, query_block, ref_block, kernel)
  except Exception as e:  # noqa: BLE001
    if _is_oom(e):
      return dict(row, n=n, m=m, d=d, ring=ring, fits=False, error=_oom_summary(e))
    raise
  row.update(info)
  hlo = os.path.join(hlo_dir, f"audit_{name.replace(':', '_')}_{'ring' if ring else 'repl'}_"
                     f"{info['kernel']}.hlo") if hlo_dir else ""
  row["analysis"] = analyse(compiled, len(devices), chip, info["gemm_flops"] / len(devices), hlo)
  row["hlo"] = hlo
  row["fits"] = row["analysis"]["memory"]["fits"]
  return row


def _is_oom(e: Exception) -> bool:
  s = str(e)
  return "RESOURCE_EXHAUSTED" in s or "Ran out of memory" in s or "out of memory" in s.lower()


def _oom_summary(e: Exception) -> str:
  s = " ".join(str(e).split())
  m = re.search(r"(Ran out of memory[^.]*\.[^.]*\.)", s)
  return (m.group(1) if m else s)[:400]


# ----------------------------------------------------------------------------- the sweep


def _case_args(case: dict, args) -> list:
  if case.get("kind") == "audit" or "ring" in case:
    return ["--audit", f"--topology={case['topology']}", f"--ring={case['ring']}",
            f"--n={args.n}", f"--m={args.m}", f"--d={args.d}", f"--k={args.k}",
            f"--audit_dtype={args.audit_dtype}", f"--query_block={args.query_block}",
            f"--ref_block={args.ref_block}", f"--audit_kernel={args.audit_kernel}"]
  return [f"--topology={case['topology']}", f"--preset={case['preset']}", f"--batch={case['batch']}",
          f"--fsdp={case['fsdp']}", f"--grad_accum={case['grad_accum']}", f"--dtype={args.dtype}"]


def _case_key(row: dict) -> tuple:
  if row.get("kind") == "audit":
    return ("audit", row.get("alias") or row["topology"], bool(row["ring"]), row.get("kernel", "cpu"))
  return ("train", row.get("alias") or row["topology"], row["preset"], row["batch"], row["fsdp"],
          row["grad_accum"])


def sweep(args) -> None:
  """Each case in a fresh process (its compile's memory returned), appended to --out as one JSON
  line; a rerun skips the cases already there, so a killed sweep resumes."""
  done = set()
  if os.path.exists(args.out):
    with open(args.out, encoding="utf-8") as f:
      done = {_case_key(json.loads(l)) for l in f if l.strip()}
  cases = ([dict(c, kind="audit") for c in AUDIT_SWEEP] if args.audit else []) + \
      ([] if args.audit_only else [dict(c, kind="train") for c in SWEEP])
  while cases:
    case = cases.pop(0)
    kernel = args.audit_kernel if args.audit_kernel != "auto" else ("cpu" if case.get("ring") else "tpu")
    key = (("audit", case["topology"], case["ring"], kernel) if case["kind"] == "audit" else
           ("train", case["topology"], case["preset"], case["batch"], case["fsdp"], case["grad_accum"]))
    if key in done:
      continue
    cmd = [sys.executable, "-m", "pso_jax.bench", "pod", *_case_args(case, args), f"--json={args.out}"]
    if args.hlo_dir:
      cmd.append(f"--hlo_dir={args.hlo_dir}")
    print("sweep:", " ".join(cmd[3:]), flush=True)
    try:
      r = subprocess.run(cmd, timeout=args.case_timeout or None)
      if r.returncode:
        print(f"sweep: case failed (exit {r.returncode})", flush=True)
    except subprocess.TimeoutExpired:
      print(f"sweep: case stopped after {args.case_timeout} s (compile too long)", flush=True)
      continue
    row = _last_row(args.out, key)
    if case["kind"] == "train" and row is not None and not row.get("fits", True):
      # does not fit: the same global batch in more micro-batches (the grad accumulation scan)
      accum = case["grad_accum"] * 2
      chips = row["chips"]
      if case["batch"] % (accum * chips) == 0 and accum <= 16:
        print(f"sweep: does not fit; next: grad_accum={accum}", flush=True)
        cases.insert(0, dict(case, grad_accum=accum))


def _last_row(path: str, key: tuple):
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    rows = [json.loads(l) for l in f if l.strip()]
  rows = [r for r in rows if _case_key(r) == key]
  return rows[-1] if rows else None


def reanalysed(row: dict) -> dict:
  """A sweep row analysed again from its saved HLO text (after a change to roofline.py)."""
  if "analysis" not in row or not row.get("hlo") or not os.path.exists(row["hlo"]):
    return row
  with open(row["hlo"], encoding="utf-8") as f:
    text = f.read()
  a = row["analysis"]
  chip = roofline.CHIPS[row["generation"]]
  row = dict(row, analysis=analyse_parts(a["memory"], a.get("cost", {}), text, row["chips"], chip,
                                         a["flops"].get("model", a["flops"]["useful"])))
  row["fits"] = row["analysis"]["memory"]["fits"]
  return row


def _kernel_label(row: dict) -> str:
  """An audit row's kernel: its name, and what it chose (chunking, the block's storage dtype)."""
  k = row.get("kernel_params") or dict(chunk=16)
  name = row.get("kernel", "cpu")
  if k.get("two_stage"):
    return f"{name}: two-stage, chunks of {k['chunk']}"
  return f"{name}: one-stage, chunks of {k['chunk']}"


def table(path: str) -> str:
  """The sweep's rows as the markdown tables of docs/pod_scale.md."""
  if not os.path.exists(path):
    raise UserError(f"--table={path}: no such file; it is the JSON lines a sweep writes "
                    "(--sweep --out=FILE) or a single case appends (--json=FILE)")
  with open(path, encoding="utf-8") as f:
    rows = [reanalysed(json.loads(l)) for l in f if l.strip()]

  def ms(x):
    return f"{x * 1e3:.0f}" if x else "-"

  def pct(x):
    return f"{x:.0%}" if x else "-"
  out = ["| preset | slice (chips) | batch (per chip) | data x fsdp | grad accum | HBM per chip: args / "
         "temp / total GiB | fits | TFLOP per chip: model / compiled | ICI sent per chip | bound | "
         "step ms: roofline / per op / compiler | img/s per chip (per op) | MFU: roofline / per op / "
         "compiler | compile (CPU) |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    if r.get("kind") != "train":
      continue
    slice_name = f"{r.get('alias') or r['topology']} ({r['chips']})"
    if "analysis" not in r:
      out.append(f"| {r['preset']} | {slice_name} | {r['batch']} ({r['batch'] // r['chips']}) | "
                 f"fsdp={r['fsdp']} | {r['grad_accum']} | {r.get('error', '')} | no | | | | | | | |")
      continue
    a = r["analysis"]
    mem, est, f = a["memory"], a["roofline"], a["flops"]
    per_chip = r["batch"] / r["chips"]
    coll = ", ".join(f"{k} {v['traffic_bytes'] / 2 ** 30:.2f} GiB" for k, v in sorted(a["collectives"].items()))
    out.append(
        f"| {r['preset']} | {slice_name} | {r['batch']} ({per_chip:.0f}) | "
        f"{r['mesh']['data']} x {r['mesh']['fsdp']} | {r['grad_accum']} | "
        f"{mem['argument'] / 2 ** 30:.2f} / {mem['temp'] / 2 ** 30:.2f} / {mem['total'] / 2 ** 30:.2f} | "
        f"{'yes' if mem['fits'] else 'no'} | {f.get('model', f['useful']) / 1e12:.1f} / "
        f"{f['hlo_matmul'] / 1e12:.1f} | {coll or 'none'} | {est['bound']} | "
        f"{ms(est['step_s'])} / {ms(est.get('step_s_per_op'))} / {ms(est.get('compiler_step_s'))} | "
        f"{per_chip / est['step_s_per_op']:.0f} | {pct(est['mfu'])} / {pct(est.get('mfu_per_op'))} / "
        f"{pct(est.get('compiler_mfu'))} | {r['compile_s'] / 60:.1f} min ({r['compile_cpu_s'] / 60:.1f}) |")
  audit = [r for r in rows if r.get("kind") == "audit"]
  if audit:
    out += ["", "| slice (chips) | references | kernel | blocks (queries x refs) | HBM per chip: refs / temp / "
            "total GiB | TFLOP per chip: GEMM / compiled | HBM traffic per chip | ICI sent per chip | "
            "bound | time ms: roofline / per op | share of bf16 peak: roofline / per op | compile |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in audit:
      slice_name = f"{r.get('alias') or r['topology']} ({r['chips']})"
      kind = "ring-rotated" if r["ring"] else "replicated"
      if "analysis" not in r:
        out.append(f"| {slice_name} | {kind} | {r.get('kernel', 'cpu')} | | {r.get('error', '')} | | | | | | | |")
        continue
      a = r["analysis"]
      mem, est, f = a["memory"], a["roofline"], a["flops"]
      out.append(
          f"| {slice_name} | {kind} | {_kernel_label(r)} | {r['query_block']} x {r['ref_block']} | "
          f"{r['refs_bytes_per_chip'] / 2 ** 30:.2f} / {mem['temp'] / 2 ** 30:.2f} / "
          f"{mem['total'] / 2 ** 30:.2f} | {f.get('model', f['useful']) / 1e12:.2f} / "
          f"{f['hlo_matmul'] / 1e12:.2f} | {a['hbm_bytes']['used'] / 2 ** 30:.0f} GiB | "
          f"{a['ici_traffic_bytes'] / 2 ** 30:.2f} GiB | {est['bound']} | {est['step_s'] * 1e3:.1f} / "
          f"{est['step_s_per_op'] * 1e3:.1f} | {pct(est['mfu'])} / {pct(est['mfu_per_op'])} | "
          f"{r['compile_s']:.0f} s |")
  return "\n".join(out)


# ----------------------------------------------------------------------------- main


def parse(argv):
  p = argparse.ArgumentParser(prog="python -m pso_jax.bench pod", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--topology", default="v5p:2x2x2",
                 help=f"TPU slice: a topology name or accelerator type, e.g. {TOPOLOGY_EXAMPLES}")
  p.add_argument("--preset", default="xs", help="xs | s | m (EDM2, 64x64x4 latents) | demo | tiny")
  p.add_argument("--batch", type=int, default=2048, help="global batch")
  p.add_argument("--fsdp", type=int, default=1, help="FSDP size (mesh: chips/fsdp x fsdp)")
  p.add_argument("--grad_accum", type=int, default=1)
  p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"),
                 help="the model's activation dtype (config.model.dtype)")
  p.add_argument("--audit", action="store_true", help="compile the audit's all-pairs search instead")
  p.add_argument("--fsdp_check", action="store_true", help="print the state's bytes per chip for "
                 "each FSDP size (no compile)")
  p.add_argument("--n", type=int, default=100_000, help="audit: queries")
  p.add_argument("--m", type=int, default=1_000_000, help="audit: references")
  p.add_argument("--d", type=int, default=512, help="audit: embedding dimension")
  p.add_argument("--k", type=int, default=10, help="audit: neighbours per query")
  p.add_argument("--audit_dtype", default="bfloat16", choices=("float32", "bfloat16"))
  p.add_argument("--ring", type=lambda s: s.lower() in ("1", "true", "yes"), default=False,
                 help="audit: rotate sharded references (ppermute) instead of replicating them")
  p.add_argument("--query_block", type=int, default=1024, help="audit: as config.audit.query_block")
  p.add_argument("--ref_block", type=int, default=16384, help="audit: as config.audit.ref_block")
  p.add_argument("--audit_kernel", default="auto", help="audit: a search.pairwise.KERNELS name "
                 "(tpu: two-stage, the GEMM reduced to chunk maxima in its output fusion; cpu: "
                 "the similarity block stored, then its top-k), or auto (as knn picks on a TPU: tpu "
                 "with replicated references, cpu with ring)")
  p.add_argument("--sweep", action="store_true", help="run the cases of docs/pod_scale.md (train; "
                 "with --audit also the audit's), each in a fresh process, into --out")
  p.add_argument("--audit_only", action="store_true", help="with --sweep --audit: only the audit cases")
  p.add_argument("--out", default="pod_sweep.jsonl", help="--sweep: JSON lines, one per case")
  p.add_argument("--case_timeout", type=int, default=0, help="--sweep: seconds per case (0: none)")
  p.add_argument("--table", default="", help="print the markdown tables of a sweep's JSON lines")
  p.add_argument("--json", default="", help="append this case's figures as one JSON line")
  p.add_argument("--hlo_dir", default="", help="keep each compiled program's HLO text here")
  return p.parse_args(argv[1:])


def main(argv):
  args = parse(argv)
  try:
    if args.table:
      print(table(args.table))
      return None
    _setup_jax()
    if args.sweep:
      check_libtpu()
      sweep(args)
      return None
    if args.hlo_dir:
      os.makedirs(args.hlo_dir, exist_ok=True)
    if args.fsdp_check:
      check_libtpu()
      name, devices, _ = resolve_topology(args.topology)
      rows = fsdp_check(devices, args.preset, args.dtype)
      _print_fsdp_check(args.preset, name, rows)
      return rows
    if args.audit:
      r = run_audit_case(args.topology, args.n, args.m, args.d, args.k, args.audit_dtype, args.ring,
                         args.query_block, args.ref_block, args.hlo_dir, args.audit_kernel)
      printer = _print_audit
    else:
      r = run_train_case(args.topology, args.preset, args.batch, args.fsdp, args.grad_accum,
                         args.dtype, args.hlo_dir)
      printer = _print_train
  except UserError as e:
    print(f"pso_jax bench pod: error: {e}", file=sys.stderr)
    sys.exit(2)
  if "analysis" in r:
    printer(r)
  else:
    print(f"pod bench: {r['topology']}: does not fit: {r['error']}")
  if args.json:
    with open(args.json, "a", encoding="utf-8") as f:
      f.write(json.dumps(r, default=float) + "\n")
  return r

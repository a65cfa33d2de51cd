"""The pod bench's accounting (bench/roofline.py) on small programs, against hand-computed figures,
and its bad-input messages. Nothing here needs libtpu or compiles for a TPU: the CPU program is
compiled for the 8 fake CPU devices, the TPU-style module is written out below."""

import importlib.metadata

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from pso_jax.bench import pod, roofline
from pso_jax.errors import UserError

F32, BF16 = 4, 2


def _cpu_program():
  """On 8 devices: a psum of a [128, 64] f32 block, an all-gather of [128, 128] f32 blocks, and a
  ppermute of a [64, 128] f32 block inside a 7-step fori_loop that also runs a [128,128]x[128,64]
  matmul per step."""
  mesh = jax.make_mesh((8,), ("data",), devices=jax.devices()[:8])

  def local(x, r):
    perm = [(i, (i + 1) % 8) for i in range(8)]

    def body(_, carry):
      r, acc = carry
      r = jax.lax.ppermute(r, "data", perm)
      return r, acc + x @ r.T
    _, acc = jax.lax.fori_loop(0, 7, body, (r, jnp.zeros((x.shape[0], r.shape[0]), jnp.float32)))
    return jax.lax.psum(acc, "data"), jax.lax.all_gather(x, "data", tiled=True)

  f = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P("data"), P("data")),
                            out_specs=(P("data"), P()), check_vma=False))
  x = jax.ShapeDtypeStruct((1024, 128), jnp.float32, sharding=NamedSharding(mesh, P("data")))
  r = jax.ShapeDtypeStruct((512, 128), jnp.float32, sharding=NamedSharding(mesh, P("data")))
  return f.lower(x, r).compile()


def test_collectives_and_flops_of_a_compiled_cpu_program():
  stats = roofline.analyse_hlo(_cpu_program().as_text(), num_devices=8)
  kinds = stats.kinds
  assert set(kinds) == {"all-reduce", "all-gather", "collective-permute"}
  # by hand: one device's psum block is 128 x 64 f32; a ring all-reduce over 8 sends 2 * 7/8 of it
  assert kinds["all-reduce"] == pytest.approx(dict(count=1, data_bytes=128 * 64 * F32,
                                                   traffic_bytes=2 * 7 / 8 * 128 * 64 * F32))
  # the gathered array is 1024 x 128 f32; each device sends its 7/8 share of the others' parts
  assert kinds["all-gather"] == pytest.approx(dict(count=1, data_bytes=1024 * 128 * F32,
                                                   traffic_bytes=7 / 8 * 1024 * 128 * F32))
  # the permute runs once per loop step: 7 x a 64 x 128 f32 block, all of it sent
  assert kinds["collective-permute"] == pytest.approx(dict(count=7, data_bytes=7 * 64 * 128 * F32,
                                                           traffic_bytes=7 * 64 * 128 * F32))
  assert list(stats.trip_counts.values()) == [7]
  # the loop's matmul: 7 steps x 2 x [128,128] x [128,64]; XLA's cost analysis counts one step
  assert stats.matmul_flops == pytest.approx(7 * 2 * 128 * 128 * 64)
  assert stats.loops_counted_once
  # the per-instruction list carries the same FLOPs and ICI bytes, loops multiplied through
  assert sum(m * f for m, f, _, _ in stats.ops) == pytest.approx(stats.matmul_flops)
  assert sum(m * t for m, _, _, t in stats.ops) == pytest.approx(stats.ici_traffic_bytes)


def test_convolution_flops_count_only_taps_that_meet_the_input():
  x = jnp.ones((2, 8, 8, 4))
  w = jnp.ones((3, 3, 4, 6))
  conv = jax.jit(lambda x, w: jax.lax.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))).lower(x, w).compile()
  stats = roofline.analyse_hlo(conv.as_text(), num_devices=1)
  # by hand: along each axis 8 outputs x 3 taps, minus the 2 taps on the zero padding = 22
  assert stats.matmul_flops == pytest.approx(2 * 2 * 6 * 22 * 22 * 4)
  assert stats.collectives == [] and not stats.loops_counted_once


# A TPU-style module written out by hand in the spellings the TPU compiler uses (layouts with
# tiles, mesh and iota replica groups, async start/done, a fused all-reduce + slice that is a
# reduce-scatter, a while loop without a known_trip_count, a batched matmul written as a
# convolution over a dilated input).
TPU_MODULE = """HloModule fixture, is_scheduled=true

%add.f32 (a.1: f32[], b.1: f32[]) -> f32[] {
  %a.1 = f32[] parameter(0)
  %b.1 = f32[] parameter(1)
  ROOT %sum.1 = f32[] add(%a.1, %b.1)
}

%all-reduce-scatter (input.1: f32[512,256]) -> f32[256,256] {
  %input.1 = f32[512,256]{1,0:T(8,128)} parameter(0)
  %all-reduce.2 = f32[512,256]{1,0:T(8,128)} all-reduce(%input.1), channel_id=3, replica_groups={{0,1},{2,3},{4,5},{6,7}}, use_global_device_ids=true, to_apply=%add.f32
  %zero.1 = s32[] constant(0)
  ROOT %slice.1 = f32[256,256]{1,0:T(8,128)} dynamic-slice(%all-reduce.2, %zero.1, %zero.1), dynamic_slice_sizes={256,256}
}

%sliced (big.1: bf16[4096,512], at.1: s32[]) -> bf16[1024,512] {
  %big.1 = bf16[4096,512]{1,0:T(8,128)(2,1)} parameter(0)
  %at.1 = s32[] parameter(1)
  %zero.2 = s32[] constant(0)
  ROOT %part.1 = bf16[1024,512]{1,0:T(8,128)(2,1)} dynamic-slice(%big.1, %at.1, %zero.2), dynamic_slice_sizes={1024,512}
}

%loop.body (state.1: (s32[], bf16[64,128], f32[128,64], bf16[128,128])) -> (s32[], bf16[64,128], f32[128,64], bf16[128,128]) {
  %state.1 = (s32[]{:T(128)}, bf16[64,128]{1,0:T(8,128)(2,1)}, f32[128,64]{0,1:T(8,128)}, bf16[128,128]{1,0:T(8,128)(2,1)}) parameter(0)
  %i.1 = s32[]{:T(128)} get-tuple-element(%state.1), index=0
  %r.1 = bf16[64,128]{1,0:T(8,128)(2,1)} get-tuple-element(%state.1), index=1
  %acc.1 = f32[128,64]{0,1:T(8,128)} get-tuple-element(%state.1), index=2
  %x.1 = bf16[128,128]{1,0:T(8,128)(2,1)} get-tuple-element(%state.1), index=3
  %collective-permute-start = (bf16[64,128]{1,0:T(8,128)(2,1)}, bf16[64,128]{1,0:T(8,128)(2,1)}, u32[]{:S(2)}, u32[]{:S(2)}) collective-permute-start(%r.1), channel_id=1, source_target_pairs={{0,1},{1,2},{2,3},{3,4},{4,5},{5,6},{6,7},{7,0}}
  %collective-permute-done = bf16[64,128]{1,0:T(8,128)(2,1)} collective-permute-done(%collective-permute-start)
  %dot.1 = f32[128,64]{0,1:T(8,128)} dot(%x.1, %collective-permute-done), lhs_contracting_dims={1}, rhs_contracting_dims={1}
  %new.1 = f32[128,64]{0,1:T(8,128)} add(%acc.1, %dot.1)
  %one.1 = s32[]{:T(128)} constant(1)
  %next.1 = s32[]{:T(128)} add(%i.1, %one.1)
  ROOT %tuple.2 = (s32[]{:T(128)}, bf16[64,128]{1,0:T(8,128)(2,1)}, f32[128,64]{0,1:T(8,128)}, bf16[128,128]{1,0:T(8,128)(2,1)}) tuple(%next.1, %collective-permute-done, %new.1, %x.1)
}

%loop.cond (state.2: (s32[], bf16[64,128], f32[128,64], bf16[128,128])) -> pred[] {
  %state.2 = (s32[]{:T(128)}, bf16[64,128]{1,0:T(8,128)(2,1)}, f32[128,64]{0,1:T(8,128)}, bf16[128,128]{1,0:T(8,128)(2,1)}) parameter(0)
  %limit.1 = s32[]{:T(128)} constant(7)
  %i.2 = s32[]{:T(128)} get-tuple-element(%state.2), index=0
  ROOT %lt.1 = pred[]{:T(512)} compare(%i.2, %limit.1), direction=LT
}

ENTRY %main.1 (p0: bf16[128,128], p1: bf16[64,128], p2: f32[128,64], p3: f32[512,256], p4: bf16[256,256], p5: bf16[8,1024,2,8], p6: bf16[8,1024,2,8], p7: bf16[4096,512], p8: s32[]) -> (f32[128,64], f32[256,256], bf16[512,256], bf16[8,2,1024,1024], bf16[1024,512]) {
  %p0 = bf16[128,128]{1,0:T(8,128)(2,1)} parameter(0)
  %p1 = bf16[64,128]{1,0:T(8,128)(2,1)} parameter(1)
  %p2 = f32[128,64]{0,1:T(8,128)} parameter(2)
  %p3 = f32[512,256]{1,0:T(8,128)} parameter(3)
  %p4 = bf16[256,256]{1,0:T(8,128)(2,1)} parameter(4)
  %p5 = bf16[8,1024,2,8]{3,2,1,0:T(8,128)(2,1)} parameter(5)
  %p6 = bf16[8,1024,2,8]{3,2,1,0:T(8,128)(2,1)} parameter(6)
  %p7 = bf16[4096,512]{1,0:T(8,128)(2,1)} parameter(7)
  %p8 = s32[]{:T(128)} parameter(8)
  %zero.3 = s32[]{:T(128)} constant(0)
  %start.1 = s32[]{:T(128)} copy(%zero.3)
  %init.1 = (s32[]{:T(128)}, bf16[64,128]{1,0:T(8,128)(2,1)}, f32[128,64]{0,1:T(8,128)}, bf16[128,128]{1,0:T(8,128)(2,1)}) tuple(%start.1, %p1, %p2, %p0)
  %while.1 = (s32[]{:T(128)}, bf16[64,128]{1,0:T(8,128)(2,1)}, f32[128,64]{0,1:T(8,128)}, bf16[128,128]{1,0:T(8,128)(2,1)}) while(%init.1), condition=%loop.cond, body=%loop.body
  %acc.2 = f32[128,64]{0,1:T(8,128)} get-tuple-element(%while.1), index=2
  %fusion.1 = f32[256,256]{1,0:T(8,128)} fusion(%p3), kind=kCustom, calls=%all-reduce-scatter, backend_config={"collective_algorithm_config":{"emitter":"SingleInputAllReduceScatterFusion","strategy":"StrategyRing"}}
  %all-gather.1 = bf16[512,256]{1,0:T(8,128)(2,1)} all-gather(%p4), channel_id=2, replica_groups=mesh['axis_0'=2,'axis_1'=1,'axis_2'=4], device_ids=([4,2]T(1,0)) {'axis_0'}, dimensions={0}, use_global_device_ids=true
  %all-reduce.1 = f32[256,256]{1,0:T(8,128)} all-reduce(%fusion.1), channel_id=4, replica_groups=[2,4]<=[4,2]T(1,0), use_global_device_ids=true, to_apply=%add.f32
  %attention.1 = bf16[8,2,1024,1024]{2,3,1,0:T(8,128)(2,1)} convolution(%p5, %p6), window={size=8x2 stride=7x1 lhs_dilate=8x2}, dim_labels=0b1f_0o1i->01bf
  %block.1 = bf16[1024,512]{1,0:T(8,128)(2,1)} fusion(%p7, %p8), kind=kLoop, calls=%sliced
  ROOT %out.1 = (f32[128,64]{0,1:T(8,128)}, f32[256,256]{1,0:T(8,128)}, bf16[512,256]{1,0:T(8,128)(2,1)}, bf16[8,2,1024,1024]{2,3,1,0:T(8,128)(2,1)}, bf16[1024,512]{1,0:T(8,128)(2,1)}) tuple(%acc.2, %all-reduce.1, %all-gather.1, %attention.1, %block.1)
}
"""


def test_tpu_spellings_by_hand():
  stats = roofline.analyse_hlo(TPU_MODULE, num_devices=8)
  assert stats.trip_counts == {"while.1": 7}  # read from 'i < 7' with i starting at copy(0)
  got = {c.name: (c.kind, c.group_size, c.data_bytes, c.count, c.traffic_bytes)
         for c in stats.collectives}
  assert got == {
      # the all-reduce inside the AllReduceScatter fusion: a reduce-scatter of the whole input
      "all-reduce.2": ("reduce-scatter", 2, 512 * 256 * F32, 1, 1 / 2 * 512 * 256 * F32),
      # mesh-style groups over 'axis_0' (2 devices); the payload is the gathered array
      "all-gather.1": ("all-gather", 2, 512 * 256 * BF16, 1, 1 / 2 * 512 * 256 * BF16),
      # iota groups [2,4]: 4 devices per group
      "all-reduce.1": ("all-reduce", 4, 256 * 256 * F32, 1, 2 * 3 / 4 * 256 * 256 * F32),
      # the async permute counted once per start (not again at its done), 7 times
      "collective-permute-start": ("collective-permute", 8, 64 * 128 * BF16, 7, 64 * 128 * BF16),
  }
  # the loop's dot 7 x 2 x 128 x 64 x 128; the attention logits 2 x (8 x 2 heads x 1024 q x
  # 1024 k) x 8 channels: one of every 8 x 2 window taps meets a real input element
  assert stats.matmul_flops == pytest.approx(7 * 2 * 128 * 64 * 128 + 2 * 8 * 2 * 1024 * 1024 * 8)


def test_memory_bytes_of_a_sliced_parameter_are_the_slice():
  stats = roofline.analyse_hlo(TPU_MODULE, num_devices=8)
  entry_only = stats.memory_bytes
  # the fusion that slices a [1024, 512] bf16 block out of a [4096, 512] one reads the block
  # (plus its 4-byte index) and writes it: not the whole array
  block = 1024 * 512 * BF16
  text = TPU_MODULE.replace("calls=%sliced", "calls=%unknown_computation")
  whole = roofline.analyse_hlo(text, num_devices=8).memory_bytes
  assert whole - entry_only == pytest.approx(4096 * 512 * BF16 - block)


NESTED = """HloModule nested

%inner (big.2: bf16[4096,512], at.2: s32[]) -> bf16[1024,512] {
  %big.2 = bf16[4096,512]{1,0} parameter(0)
  %flat.2 = bf16[4096,512]{1,0} bitcast(%big.2)
  %at.2 = s32[] parameter(1)
  %zero.4 = s32[] constant(0)
  ROOT %part.2 = bf16[1024,512]{1,0} dynamic-slice(%flat.2, %at.2, %zero.4), dynamic_slice_sizes={1024,512}
}

%outer (big.3: bf16[4096,512], at.3: s32[], q.3: bf16[256,512]) -> f32[256,1024] {
  %big.3 = bf16[4096,512]{1,0} parameter(0)
  %at.3 = s32[] parameter(1)
  %q.3 = bf16[256,512]{1,0} parameter(2)
  %block.3 = bf16[1024,512]{1,0} fusion(%big.3, %at.3), kind=kLoop, calls=%inner
  ROOT %dot.3 = f32[256,1024]{1,0} dot(%q.3, %block.3), lhs_contracting_dims={1}, rhs_contracting_dims={1}
}

ENTRY %main.2 (r: bf16[4096,512], i: s32[], q: bf16[256,512]) -> f32[256,1024] {
  %r = bf16[4096,512]{1,0} parameter(0)
  %i = s32[] parameter(1)
  %q = bf16[256,512]{1,0} parameter(2)
  ROOT %s.1 = f32[256,1024]{1,0} fusion(%r, %i, %q), kind=kOutput, calls=%outer
}
"""


def test_a_slice_inside_a_nested_fusion_reads_the_slice():
  stats = roofline.analyse_hlo(NESTED, num_devices=1)
  # reads the [1024, 512] bf16 block (through a bitcast, in a nested fusion), the index, the
  # [256, 512] queries; writes [256, 1024] f32
  assert stats.memory_bytes == 1024 * 512 * BF16 + 4 + 256 * 512 * BF16 + 256 * 1024 * F32
  assert stats.matmul_flops == 2 * 256 * 1024 * 512


def test_tile_padding_by_hand():
  # layout {0,1}: dim 0 is the most minor and is rounded to the tile's 128, dim 1 to its 8
  [(array, padded)] = roofline.tiled_arrays("f32[100,6]{0,1:T(8,128)}")
  assert array.bytes == 100 * 6 * F32 and padded == 128 * 8 * F32
  # a 3x3 kernel with 5 input channels: channels 5 -> 8 (second most minor), 128 stays
  [(_, padded)] = roofline.tiled_arrays("bf16[3,3,5,128]{3,2,1,0:T(8,128)(2,1)}")
  assert padded == 3 * 3 * 8 * 128 * BF16
  pads = roofline.tile_padding(TPU_MODULE)
  assert pads["parameters_logical"] <= pads["parameters_padded"]


def test_roofline_arithmetic():
  chip = roofline.CHIPS["v5p"]
  # 10 ms of matmuls, 20 ms of HBM traffic, 5 ms of ICI (half the bidirectional figure sends)
  est = roofline.roofline(flops=0.010 * 459e12, hbm_bytes=0.020 * 2765e9, ici_bytes=0.005 * 600e9,
                          chip=chip, useful_flops=0.008 * 459e12)
  assert est["seconds"] == pytest.approx(dict(compute=0.010, hbm=0.020, ici=0.005))
  assert est["bound"] == "hbm"
  assert est["step_s"] == pytest.approx(0.020) and est["step_s_serial"] == pytest.approx(0.035)
  assert est["mfu"] == pytest.approx(0.008 / 0.020)
  assert est["mfu_serial"] == pytest.approx(0.008 / 0.035)
  assert est["ridge"] == pytest.approx(459e12 / 2765e9)
  # per op: one instruction after another, each at its own largest term
  ops = [(2, 0.001 * 459e12, 0.0005 * 2765e9, 0.0), (1, 0.0, 0.004 * 2765e9, 0.001 * 600e9)]
  est = roofline.roofline(flops=0.002 * 459e12, hbm_bytes=0.005 * 2765e9, ici_bytes=0.001 * 600e9,
                          chip=chip, ops=ops)
  assert est["step_s_per_op"] == pytest.approx(2 * 0.001 + 0.004)
  assert est["mfu_per_op"] == pytest.approx(0.002 / 0.006)
  assert est["step_s"] == pytest.approx(0.005) and est["step_s_serial"] == pytest.approx(0.008)
  # no published ICI figure: the term is left out rather than guessed
  v4 = roofline.roofline(flops=1e12, hbm_bytes=1e9, ici_bytes=1e12, chip=roofline.CHIPS["v4"])
  assert "ici" not in v4["seconds"] and v4["bound"] == "compute"


def test_bad_input_messages(monkeypatch):
  with pytest.raises(UserError, match=r"--fsdp=3 does not divide the 8 chips .*\[1, 2, 4, 8\]"):
    pod.check_mesh(8, 3, 2048, 1, "v5p:2x2x2")
  with pytest.raises(UserError, match=r"--batch=100 .* use a multiple of 8, e.g. --batch=96"):
    pod.check_mesh(8, 1, 100, 1, "v5p:2x2x2")
  with pytest.raises(UserError, match=r"unknown TPU topology 'v9:2x2'.*v5p:2x2x1 \(= v5p-8"):
    pod.resolve_topology("v9:2x2")
  with pytest.raises(UserError, match=r"unknown TPU topology 'v5p-7'"):
    pod.resolve_topology("v5p-7")
  assert pod.ALIASES["v5p-8"] == "v5p:2x2x1" and pod.ALIASES["v5e-256"] == "v5e:16x16"
  with pytest.raises(UserError, match=r"--table=.*no such file.*--json=FILE"):
    pod.table("/nonexistent/sweep.jsonl")

  pin = [r for r in importlib.metadata.requires("jax") if r.startswith("libtpu")][0].split(";")[0]

  def missing(name):
    raise importlib.metadata.PackageNotFoundError(name)
  monkeypatch.setattr(importlib.metadata, "version", missing)
  with pytest.raises(UserError, match=r'libtpu is not installed.*pip install -e "\.\[tpu-aot\]"') as e:
    pod.check_libtpu()
  assert pin in str(e.value)
  monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.0.1")
  with pytest.raises(UserError, match=r"libtpu 0\.0\.1 is installed, but jax .* needs libtpu=="):
    pod.check_libtpu()


def test_audit_plan_and_kernel_label():
  """The audit's blocks as the bench compiles them: query blocks of equal size (100k queries on
  32 chips: 4 blocks of 784, not 4 of 1024 with 31% padding), and the table's kernel column."""
  from pso_jax.search import pairwise
  tpu = pairwise.KERNELS["tpu"]
  assert pairwise.topk_plan(100_000, 1_000_000, 1024, 16384, 32, False, tpu) == (784, 16384, 1_000_000)
  assert pairwise.topk_plan(100_000, 1_000_000, 1024, 16384, 4, False, tpu)[0] == 1000
  qb, rb, rows = pairwise.topk_plan(100_000, 1_000_000, 1024, 16384, 128, True, tpu)
  assert (qb, rb, rows) == (784, 16384, 128 * 16384)  # ring: 62 blocks padded to one per chip
  row = dict(kernel="tpu", kernel_params=dict(chunk=16, two_stage=True, index_bits=10))
  assert pod._kernel_label(row) == "tpu: two-stage, chunks of 16"
  assert pod._kernel_label({}) == "cpu: one-stage, chunks of 16"  # rows from before the kernels

"""Exact all-pairs similarity search: blocked, sharded, certified.

Similarities are dot products of (unit-norm) embeddings. The canonical similarity of a pair is the
float64 dot product of the float32 inputs; every value and every decision this module returns is
about that canonical similarity, whatever precision the bulk search ran in:

1. Device search (jitted): queries are split over all mesh axes with `jax.shard_map`; each device
   walks its queries in blocks of `query_block` and the references in blocks of `ref_block`
   (`lax.scan`), keeping a running top-kk per query, so the N x M matrix never exists. References
   are replicated, or (`ring=True`) sharded and rotated around the devices with `lax.ppermute`
   when they do not fit on one device. The block GEMM takes bf16 or fp32 inputs and accumulates in
   fp32; the block top-kk is found from chunk maxima (exact, see `_block_topk`).
2. Host re-score: the kk candidates of each query are re-scored in float64.
3. Certificate: |approximate - canonical| <= eps (a bound from the input precision and d). If a
   query's kk-th approximate candidate lies more than 2 eps below its k-th, no reference outside
   the candidates can enter the top-k; otherwise the query is searched again in fp32, and if even
   that cannot be certified, brute force in float64 on the host.

Patient counting (`patient_search`) reuses the candidates: when the kk-th candidate lies below
tau - eps, every reference that reaches tau is a candidate, so the distinct matched patients are
read off the re-scored candidates at no device cost. Queries with more near-tau references than kk
("saturated") go through a second kernel that counts patients exactly over a patient-sorted
layout (cumulative hit counts per patient segment), with the same certificate and float64 fallback.
"""

import dataclasses
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.sharding import PartitionSpec as P

from pso_jax import parallel
from pso_jax.errors import UserError

_CHUNK = 16           # columns per chunk for the chunk-maximum top-k
_HOST_BATCH = 16384   # rows per host-side float64 step
_ALIGN = 64           # bytes
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class Kernel:
  """How the device search reduces a similarity block to its top-kk. Every kernel gives the same
  exact answer: the certificate's eps covers what a kernel rounds (`rounding`).

  chunk: rows per chunk of the chunk-maximum top-k (`_block_topk`): chunk n of a block holds its
    rows n, n + nc, ..., so the maxima are one elementwise max over `chunk` contiguous slices.
  two_stage: the block is never stored: the GEMM's output is reduced at once to its chunk maxima
    (on a TPU, inside the GEMM's output fusion), a running top-kk of chunks is kept over the
    references, and then the references of each query's kk chunks are gathered and scored again
    (`_stage2`). The top-kk of those chunks' rows is exact up to eps; every reference outside
    them is at most the kk-th chunk maximum, a bound the certificate takes (`outside`).
  index_bits: (two-stage) the chunk maxima are sorted as int32 keys, the value's leading
    32 - index_bits bits (rounded down: 2^-(23 - index_bits) relative, or 2^(index_bits - 149)
    below -0) and the chunk in the rest (`_topk_packed`), for blocks of at most 2^index_bits
    chunks.
  """
  chunk: int = 16
  two_stage: bool = False
  index_bits: int = 10

  @property
  def rounding(self) -> float:
    """Relative error of the similarities the kernel stores (beyond the GEMM's own)."""
    return 2.0 ** -(23 - self.index_bits) if self.two_stage else 0.0


# "cpu": the CPU's fastest; "tpu": what the programs compiled for TPU slices say moves the fewest
# HBM bytes with replicated references (docs/pod_scale.md); with ring-rotated references its
# gathers would run once per ring step, so "auto" takes it on a TPU without ring only
KERNELS = {"cpu": Kernel(), "tpu": Kernel(two_stage=True)}


@dataclasses.dataclass(frozen=True)
class PatientSearch:
  topk_sims: np.ndarray           # [N, k] float32, descending
  topk_idx: np.ndarray            # [N, k] int32 reference rows
  n_patients_matched: np.ndarray  # [N] int32: distinct patients with an image at sim >= tau
  best_patient: np.ndarray        # [N] int32: patient of the most similar reference
  best_sim: np.ndarray            # [N] float32
  matched_patients: np.ndarray    # [N, kk] int32: matched patients by similarity, -1 padded
  matched_complete: np.ndarray    # [N] bool: matched_patients lists every matched patient
  stats: dict                     # how the answer was certified (counts per path)


# ----------------------------------------------------------------------------- input checks

def check_embeddings(name: str, x, dim: Optional[int] = None) -> np.ndarray:
  """float32 [n, d] with finite values, or a UserError naming the set and the fix."""
  return _checked(name, x, dim)[0]


def _checked(name: str, x, dim: Optional[int] = None):
  """check_embeddings, plus upper bounds of the row norms [n] float64 (from the same pass)."""
  x = np.asarray(x)
  if x.ndim != 2:
    raise UserError(f"{name} must be a 2-D array [n, dim] of embeddings, got shape {x.shape}")
  if x.shape[0] == 0:
    raise UserError(f"{name} is empty (shape {x.shape}); the audit needs at least one embedding")
  if dim is not None and x.shape[1] != dim:
    raise UserError(f"{name} has dimension {x.shape[1]} but the other set has {dim}: both must "
                    "come from the same embedder")
  x = np.asarray(x, np.float32)
  norms = _norms(x)  # one pass; NaN/Inf anywhere in a row makes its norm non-finite
  if not np.isfinite(norms).all():
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
      raise UserError(f"{name} has {int(bad.sum())} rows with NaN/Inf (first: row "
                      f"{int(np.argmax(bad))}); re-embed those images or drop them")
    norms = _norms(x, np.float64)  # finite, but squares beyond float32 range
  return x, norms


def _norms(x: np.ndarray, dtype=np.float32) -> np.ndarray:
  """Upper bounds of the row norms, float64 [n]: a float32 sum of d squares is within
  (d + 1) 2^-24 (relative) of the exact one, so it is inflated by twice that."""
  sq = np.einsum("nd,nd->n", x, x, dtype=dtype).astype(np.float64)
  return np.sqrt(sq * (1 + 2 * (x.shape[1] + 2) * 2.0 ** -24))


def _eps_coeff(dtype: str, d: int, rounding: float = 0.0) -> float:
  """|approximate - exact| <= coeff * |q| * |r| for one block GEMM of depth d, fp32 accumulate,
  its result then stored with a relative error of at most `rounding` (Kernel.rounding)."""
  coeff = 2 * (d + 2) * 2.0 ** -24
  if dtype == "bfloat16":
    coeff += 2 * 2.0 ** -8 + 2.0 ** -16   # two inputs rounded to 8 significant bits
  return coeff + rounding * (1 + coeff)


# ----------------------------------------------------------------------------- device kernels

def _block_topk(s, kk: int, chunk: int = _CHUNK):
  """Exact top-kk of each row of s [qb, rb] (values; columns), by a hierarchy of chunk maxima.

  Split a row's columns into groups ("chunks"; here strided: chunk c holds columns c, c + nc,
  c + 2 nc, ..., so the maxima are one elementwise max over `chunk` contiguous slices). The kk
  largest values lie in the kk chunks with the largest maxima (a value outside them is at most kk
  chunk maxima, each a distinct element of its own chunk), so one max pass over s leaves rb/chunk
  maxima, whose top-kk chunks are found the same way, recursively; each level then costs a top-k
  over kk*chunk values. A CPU top-k (a partial sort per row, one thread) over the whole row
  would cost more than the block GEMM."""
  qb, rb = s.shape
  nc = rb // chunk
  if rb % chunk or nc <= 2 * kk:
    return jax.lax.top_k(s, kk)
  chunks = s.reshape(qb, chunk, nc)
  _, ci = _block_topk(chunks.max(1), kk, chunk)
  cand = jnp.take_along_axis(chunks, ci[:, None, :], axis=2).reshape(qb, chunk * kk)
  v, j = jax.lax.top_k(cand, kk)
  return v, jnp.take_along_axis(ci, j % kk, axis=1) + nc * (j // kk)


def _topk_reducer(kk: int, kernel: Kernel = Kernel()):
  """Running top-kk per query. aux: the reference ids of the rows ([R] int32, -1 for padding)."""
  def init(qb):
    return (jnp.full((qb, kk), -jnp.inf, jnp.float32), jnp.full((qb, kk), -1, jnp.int32))

  def block_aux(aux, i, start, rb):
    return jax.lax.dynamic_slice_in_dim(aux, start, rb)

  def update(carry, s, ids, valid):
    if valid is not None:  # padding or (clamped last block) columns of the previous block
      s = jnp.where(valid[None, :] & (ids[None, :] >= 0), s, -jnp.inf)
    v, col = _block_topk(s, kk, kernel.chunk)
    v = jnp.concatenate([carry[0], v], axis=1)
    i = jnp.concatenate([carry[1], ids[col]], axis=1)
    v, j = jax.lax.top_k(v, kk)
    return v, jnp.take_along_axis(i, j, axis=1)

  return init, block_aux, update


def _topk_packed(x, k: int, index_bits: int):
  """(values rounded down to their leading 32 - index_bits bits, columns) of the top k of each
  row of a float32 x [rows, n], n <= 2^index_bits, found as a top-k of int32 keys: the value's
  bits made order-preserving, its low index_bits bits replaced by the column. The TPU's sort then
  moves one int32 key (and its position) per element instead of a float, an int32 column and the
  position, with no relayout of the columns; ties within the rounding go to the higher column."""
  u = np.uint32
  sign, low = u(0x80000000), u(2 ** index_bits - 1)
  bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  ordered = jnp.where(bits >= sign, ~bits, bits | sign)  # as unsigned ints, in the floats' order
  col = jnp.arange(x.shape[-1], dtype=jnp.uint32)
  keys = jax.lax.bitcast_convert_type(((ordered & ~low) | col) ^ sign, jnp.int32)
  top, _ = jax.lax.top_k(keys, k)
  top = jax.lax.bitcast_convert_type(top, jnp.uint32) ^ sign
  ordered = top & ~low
  v = jax.lax.bitcast_convert_type(jnp.where(ordered >= sign, ordered & ~sign, ~ordered), jnp.float32)
  return jnp.where(jnp.isnan(v), -jnp.inf, v), (top & low).astype(jnp.int32)  # -inf: NaN bits


def _chunk_reducer(kk: int, kernel: Kernel, rb: int):
  """Stage 1 of the two-stage kernel: running top-kk chunk maxima per query (values; chunk ids
  i nc + n for chunk n of block i, -1 if none). Chunk n of a block holds its rows n, n + nc, ...,
  n + (chunk - 1) nc (nc = rb / chunk), so its maximum is one elementwise max over `chunk`
  contiguous slices of the block's GEMM output."""
  chunk, nc = kernel.chunk, rb // kernel.chunk
  init, _, _ = _topk_reducer(kk)

  def block_aux(aux, i, start, rb):
    return i

  def update(carry, s, i, valid):
    # s: the block transposed [rb, qb]: its chunk maxima come out with the queries minor, the
    # layout the TPU's sort along the chunks wants (no relayout copies). Padding rows (id -1)
    # are left in: a chunk maximum is then still an upper bound of its references, and stage 2
    # drops them; rows met in the previous block (the clamped last block) are masked
    if valid is not None:
      s = jnp.where(valid[:, None], s, -jnp.inf)
    # the block is reduced inside the GEMM's output fusion and never stored
    maxima = s.reshape(chunk, nc, s.shape[1]).max(0).T
    if nc <= 2 ** kernel.index_bits:
      v, n = _topk_packed(maxima, min(kk, nc), kernel.index_bits)
    else:
      v, n = jax.lax.top_k(maxima, min(kk, nc))
    v = jnp.concatenate([carry[0], v], axis=1)
    ids = jnp.concatenate([carry[1], i * nc + n], axis=1)
    v, j = jax.lax.top_k(v, kk)
    return v, jnp.take_along_axis(ids, j, axis=1)

  return init, block_aux, update


def _stage2(q, refs, ids, chunks, carry, kk: int, kernel: Kernel, rb: int, compute, sub: int = 128):
  """Stage 2 of the two-stage kernel for one query block: the rows of each query's kk chunks
  (chunks: (maxima, chunk ids) [qb, kk]) scored again and merged into carry (values, ids,
  outside [qb]); outside: the largest chunk maximum not taken, a bound of every row left out."""
  cv, cid = chunks
  qb, d = q.shape
  sub = sub if qb % sub == 0 else qb
  nc, n_rows = rb // kernel.chunk, refs.shape[0]

  def score(args):
    q, cv, cid = args
    block = cid // nc
    start = jnp.minimum(block * rb, n_rows - rb)  # as the search placed the (clamped) block
    rows = (start + cid % nc)[:, :, None] + nc * jnp.arange(kernel.chunk)  # [sub, kk, chunk]
    safe = jnp.clip(rows, 0, n_rows - 1)
    g = refs[safe].astype(compute)                                          # [sub, kk, chunk, d]
    # a batched matrix-vector product would be rewritten as multiply + reduce in fp32 (the
    # gathered rows converted to fp32 first); 8 query rows (7 of zeros) keep it on the MXU
    q8 = jnp.pad(q[:, None, :], ((0, 0), (0, 7), (0, 0)))
    s = jnp.einsum("qed,qkcd->qekc", q8, g, preferred_element_type=jnp.float32)[:, 0]
    row_ids = ids[safe]
    # not a padding row, a real chunk, and (clamped block) not a row of the previous block
    keep = ((row_ids >= 0) & (rows >= (block * rb)[:, :, None])
            & ((cid >= 0) & (cv > -jnp.inf))[:, :, None])
    s = jnp.where(keep, s, -jnp.inf).reshape(q.shape[0], -1)
    v, j = jax.lax.top_k(s, kk)
    return v.astype(jnp.float32), jnp.take_along_axis(row_ids.reshape(q.shape[0], -1), j, axis=1)

  v, i = jax.lax.map(score, (q.reshape(-1, sub, d), cv.reshape(-1, sub, cv.shape[1]),
                             cid.reshape(-1, sub, cid.shape[1])))
  v = jnp.concatenate([carry[0], v.reshape(qb, -1)], axis=1)
  i = jnp.concatenate([carry[1], i.reshape(qb, -1)], axis=1)
  v, j = jax.lax.top_k(v, kk)
  return v, jnp.take_along_axis(i, j, axis=1), jnp.maximum(carry[2], cv[:, -1])


def _count_reducer(tau: float, eps: float):
  """Per query: patients with some sim >= tau + eps (sure) and >= tau - eps (possible).
  aux: (start, end) [nb, S] patient segments of each block; padding lies outside every segment."""
  def init(qb):
    return (jnp.zeros((qb,), jnp.int32), jnp.zeros((qb,), jnp.int32))

  def block_aux(aux, i, start, rb):
    return jax.tree.map(lambda x: x[i], aux)

  def segments_hit(hits, start, end):
    c = jnp.pad(jnp.cumsum(hits.astype(jnp.int32), axis=1), ((0, 0), (1, 0)))
    return jnp.sum((c[:, end] - c[:, start]) > 0, axis=1, dtype=jnp.int32)

  def update(carry, s, aux, valid):
    start, end = aux
    return (carry[0] + segments_hit(s >= tau + eps, start, end),
            carry[1] + segments_hit(s >= tau - eps, start, end))

  return init, block_aux, update


@functools.lru_cache(maxsize=32)
def _engine(mesh, ring: bool, reducer_key: tuple, qb: int, rb: int, dtype: str, masked: bool):
  """Jitted, sharded blocked search. Queries [n, d] split over all mesh axes; refs [R, d] (per
  device) walked in blocks of rb rows, with the reducer's aux, replicated or (ring) split over
  the same axes and rotated. References are not padded to whole blocks: when R % rb != 0 the
  last block is clamped to end at row R and its rows already seen are masked out.
  masked: (topk) some rows are padding (id -1), so every block is masked."""
  kind, *params = reducer_key
  init, block_aux, update = (_topk_reducer if kind == "topk" else _count_reducer)(*params)
  kernel = params[1] if kind == "topk" else Kernel()
  two_stage = kernel.two_stage
  if two_stage:  # blocks reduce to chunk maxima; the result carry gains the bound `outside`
    kk = params[0]
    final_init = lambda qb: (*init(qb), jnp.full((qb,), -jnp.inf, jnp.float32))
    init, block_aux, update = _chunk_reducer(kk, kernel, rb)
  axes = parallel.batch_axes(mesh)
  n_dev = mesh.size
  compute = DTYPES[dtype]

  def dot(q, r):
    return jax.lax.dot_general(q, r, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)

  def reduce(carry, s, aux, i, start, clamped):
    valid = None
    if clamped:  # rows before i * rb were met in the previous block
      valid = start + jnp.arange(rb) >= i * rb
    elif masked:
      valid = jnp.ones((rb,), bool)
    return update(carry, s, block_aux(aux, i, start, rb), valid)

  def local(queries, refs, aux):
    qblocks = queries.astype(compute).reshape(-1, qb, queries.shape[-1])
    carry = jax.vmap(lambda _: (final_init if two_stage else init)(qb))(jnp.arange(qblocks.shape[0]))
    nqb = qblocks.shape[0]

    def search(refs, aux, carry):
      # each reference block is sliced (a copy) once and met by every query block in turn; with
      # query blocks outside, every reference block would be copied once per query block (at
      # 1024 x 16384 x d: 2 bytes moved per 1024 flops, some 5% of the GEMM time, by estimate)
      nb = -(-refs.shape[0] // rb)
      n_full = nb - int(refs.shape[0] % rb != 0)

      def per_block(i, last, carry):
        n_rows = refs.shape[0]
        clamped = last and n_rows % rb != 0  # the last block is moved back to end at row n_rows
        start = jnp.minimum(i * rb, n_rows - rb) if clamped else i * rb
        r = jax.lax.dynamic_slice_in_dim(refs, start, rb).astype(compute)  # (a copy)

        def one(j, carry):
          c = jax.tree.map(lambda x: x[j], carry)
          s = dot(r, qblocks[j]) if two_stage else dot(qblocks[j], r)  # (two-stage: [rb, qb])
          c = reduce(c, s, aux, i, start, clamped)
          return jax.tree.map(lambda x, y: x.at[j].set(y), carry, c)
        return jax.lax.fori_loop(0, nqb, one, carry)
      carry = jax.lax.fori_loop(0, n_full, lambda i, c: per_block(i, False, c), carry)
      if n_full < nb:
        carry = per_block(n_full, True, carry)
      return carry

    if two_stage:  # stage 1 over these references, then stage 2 into the result carry
      stage1 = search

      def search(refs, aux, carry):
        chunks = stage1(refs, aux, jax.vmap(lambda _: init(qb))(jnp.arange(nqb)))

        def one(j, carry):
          c = jax.tree.map(lambda x: x[j], carry)
          c = _stage2(qblocks[j], refs, aux, jax.tree.map(lambda x: x[j], chunks), c, kk, kernel,
                      rb, compute)
          return jax.tree.map(lambda x, y: x.at[j].set(y), carry, c)
        return jax.lax.fori_loop(0, nqb, one, carry)
    if not ring:
      carry = search(refs, aux, carry)
    else:
      # every device searches its own shard, then n_dev - 1 shards passed around the ring
      perm = [(i, (i + 1) % n_dev) for i in range(n_dev)]

      def step(state, _):
        refs, aux, carry = state
        refs, aux = jax.lax.ppermute((refs, aux), axes, perm)
        return (refs, aux, search(refs, aux, carry)), None
      carry = search(refs, aux, carry)
      if n_dev > 1:
        carry = jax.lax.scan(step, (refs, aux, carry), None, length=n_dev - 1)[0][2]
    return jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), carry)

  batch = parallel.batch_spec(mesh)
  ref_spec = batch if ring else P()
  fn = jax.shard_map(local, mesh=mesh, in_specs=(batch, ref_spec, ref_spec), out_specs=batch,
                     check_vma=False)
  return jax.jit(fn)


def aligned_empty(shape, dtype=np.float32) -> np.ndarray:
  """An uninitialised array on a 64-byte boundary: the CPU runtime uses such host arrays in
  place, where it copies others (numpy's own are 16-byte aligned)."""
  nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
  buf = np.empty(nbytes + _ALIGN, np.uint8)
  off = -buf.ctypes.data % _ALIGN
  return buf[off:off + nbytes].view(dtype).reshape(shape)


def _as_host(x: np.ndarray, dtype) -> np.ndarray:
  """x in dtype, 64-byte aligned; x itself when it already is."""
  if x.dtype == dtype and x.flags.c_contiguous and x.ctypes.data % _ALIGN == 0:
    return x
  out = aligned_empty(x.shape, dtype)
  out[...] = x
  return out


def _run_engine(mesh, ring, reducer_key, queries, refs, aux, qb, rb, dtype, masked=False):
  """Pads queries to the mesh x block grid, places everything, runs, returns host arrays [n]."""
  n = queries.shape[0]
  per = mesh.size * qb
  host_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32
  if n % per:
    qpad = aligned_empty((-(-n // per) * per, queries.shape[1]), host_dtype)
    qpad[:n] = queries
    qpad[n:] = 0
  else:
    qpad = _as_host(queries, host_dtype)
  batch = parallel.batch_sharding(mesh)
  ref_sharding = batch if ring else parallel.replicated(mesh)
  fn = _engine(mesh, ring, reducer_key, qb, rb, dtype, bool(masked))
  with jax.set_mesh(mesh):
    out = fn(parallel.host_to_global(qpad, batch),
             parallel.host_to_global(_as_host(refs, host_dtype), ref_sharding),
             parallel.host_to_global(aux, ref_sharding))
  return jax.tree.map(lambda a: a[:n], parallel.to_host(out))


def _blocks(n_rows: int, ref_block: int, n_dev: int, ring: bool) -> int:
  nb = -(-n_rows // ref_block)
  return -(-nb // n_dev) * n_dev if ring else nb


def _fit_block(block: int, n: int, multiple: int = _CHUNK) -> int:
  """Blocks no larger than needed (small sets), a multiple of the chunk size."""
  block = max(1, min(int(block), n))
  return -(-block // multiple) * multiple


# ----------------------------------------------------------------------------- host side

def _rescore(queries, refs, approx, idx, cut) -> np.ndarray:
  """Canonical float64 similarities of the candidates with approx >= cut [N] (the only ones that
  can be in the top k or reach tau); the others keep their approximate value, below the cut."""
  exact = np.where(idx >= 0, approx, -np.inf).astype(np.float64)
  rows, cols = np.nonzero((approx >= cut[:, None]) & (idx >= 0))
  step = 1024  # pairs per step, so the float64 copies stay in cache
  for a in range(0, len(rows), step):
    r, c = rows[a:a + step], cols[a:a + step]
    x = queries[r].astype(np.float64)
    x *= refs[idx[r, c]]  # float32 products are exact in float64; the sum is float64
    exact[r, c] = x.sum(1)
  return exact


def _sort_desc(sims, idx):
  order = np.argsort(-sims, axis=1, kind="stable")
  return np.take_along_axis(sims, order, 1), np.take_along_axis(idx, order, 1)


def _host_sims(q64: np.ndarray, refs: np.ndarray):
  """float64 similarity rows of a few queries against all references, in reference blocks."""
  for b in range(0, len(refs), _HOST_BATCH):
    yield b, q64 @ refs[b:b + _HOST_BATCH].astype(np.float64).T


def _host_topk(queries, refs, kk):
  """float64 brute-force top-kk for the few queries no certificate covers."""
  q64 = queries.astype(np.float64)
  best = np.full((len(q64), 0), -np.inf)
  best_i = np.zeros((len(q64), 0), np.int64)
  for b, s in _host_sims(q64, refs):
    s = np.concatenate([best, s], 1)
    i = np.concatenate([best_i, np.broadcast_to(np.arange(b, b + s.shape[1] - best.shape[1]),
                                                (len(q64), s.shape[1] - best.shape[1]))], 1)
    keep = np.argsort(-s, axis=1, kind="stable")[:, :kk]
    best, best_i = np.take_along_axis(s, keep, 1), np.take_along_axis(i, keep, 1)
  return best, best_i.astype(np.int32)


def _host_patient_counts(queries, refs, ref_patients, tau):
  q64 = queries.astype(np.float64)
  _, compact = np.unique(ref_patients, return_inverse=True)  # ids may be large and sparse
  hit = np.zeros((len(q64), int(compact.max()) + 1), bool)
  for b, s in _host_sims(q64, refs):
    rows, cols = np.nonzero(s >= tau)
    hit[rows, compact[b + cols]] = True
  return hit.sum(1).astype(np.int32)


@dataclasses.dataclass
class _Options:
  query_block: int
  ref_block: int
  dtype: str
  mesh: Any
  ring: bool
  qnorm: np.ndarray = None  # upper bounds of the query norms [N]
  rmax: float = 0.0         # upper bound of the reference norms
  kernel: Kernel = Kernel()


def topk_plan(n: int, m: int, query_block: int, ref_block: int, n_dev: int, ring: bool,
              kernel: Kernel):
  """(query block, reference block, reference rows after padding) of a top-k search."""
  rb = _fit_block(ref_block, m, kernel.chunk)
  per_dev = -(-n // n_dev)
  # blocks of equal size, so that padding the queries costs under 8 rows per block
  qb = _fit_block(-(-per_dev // -(-per_dev // max(1, query_block))), per_dev, multiple=8)
  n_rows = _blocks(m, rb, n_dev, ring) * rb if ring or m < rb else m
  return qb, rb, n_rows


def _candidates(queries, refs, kk, opts: _Options):
  """Approximate top-kk per query from the device search: (approx [N,kk] descending, idx,
  outside [N]: an upper bound of the approximate similarity of every reference not in idx)."""
  mesh = opts.mesh
  m = len(refs)
  qb, rb, n_rows = topk_plan(len(queries), m, opts.query_block, opts.ref_block, mesh.size,
                             opts.ring, opts.kernel)
  ids = np.arange(n_rows, dtype=np.int32)
  if n_rows > m:  # ring shards (whole blocks each) or a set smaller than one block: pad
    rpad = aligned_empty((n_rows, refs.shape[1]))
    rpad[m:] = 0
    rpad[:m] = refs
    refs, ids[m:] = rpad, -1
  out = _run_engine(mesh, opts.ring, ("topk", kk, opts.kernel), queries, refs, ids, qb, rb,
                    opts.dtype, masked=n_rows > m)
  if opts.kernel.two_stage:
    approx, idx, outside = out
    return approx, idx, np.maximum(outside, approx[:, -1])
  return out[0], out[1], out[0][:, -1].copy()


def _certified_topk(queries, refs, k, kk, opts: _Options, stats: dict, tau=None):
  """Top-kk candidates (kk >= k) per query, the top k of them certified complete and exact.

  Returns (approx [N,kk] descending, exact [N,kk] descending, idx [N,kk] in exact order, eps [N],
  outside [N]: an upper bound of the approximate similarity of every reference not in idx).
  `exact` is canonical for every candidate within 2 eps of the k-th and (given tau) for every one
  at >= tau - eps. A query whose candidates cannot be certified is searched again in fp32, then
  by float64 brute force.
  """
  n, d = queries.shape
  kk = min(kk, len(refs))
  rmax, qnorm = opts.rmax, opts.qnorm
  approx, idx, outside = _candidates(queries, refs, kk, opts)
  eps = _eps_coeff(opts.dtype, d, opts.kernel.rounding) * qnorm * rmax
  stats.update(n=n, m=len(refs), d=d, dtype=opts.dtype, candidates=kk)

  def uncertified(approx, outside, eps):
    if kk == len(refs):
      return np.zeros(len(approx), bool)  # every reference is a candidate
    return outside >= approx[:, min(k, kk) - 1] - 2 * eps

  todo = np.nonzero(uncertified(approx, outside, eps))[0]
  stats["refined_fp32"] = int(len(todo)) if opts.dtype != "float32" else 0
  if len(todo) and opts.dtype != "float32":
    sub = dataclasses.replace(opts, dtype="float32", kernel=Kernel(opts.kernel.chunk))
    a2, i2, o2 = _candidates(queries[todo], refs, kk, sub)
    eps2 = _eps_coeff("float32", d, sub.kernel.rounding) * qnorm[todo] * rmax
    approx[todo], idx[todo], outside[todo], eps[todo] = a2, i2, o2, eps2
    todo = todo[uncertified(a2, o2, eps2)]
  stats["refined_float64"] = int(len(todo))
  if len(todo):
    approx[todo], idx[todo] = _host_topk(queries[todo], refs, kk)
    outside[todo] = approx[todo, -1]
    eps[todo] = 2.0 ** -22 * qnorm[todo] * rmax  # exact values, rounded to float32 in approx
  cut = approx[:, min(k, kk) - 1] - 2 * eps
  if tau is not None:
    cut = np.minimum(cut, tau - eps)
  exact, idx = _sort_desc(_rescore(queries, refs, approx, idx, cut), idx)
  stats["rescored"] = int(np.sum(approx >= cut[:, None]))
  return approx, exact, idx, eps, outside


def resolve_kernel(kernel: str, mesh, ring: bool) -> Kernel:
  """KERNELS[kernel]; "auto": the TPU's on a TPU mesh with replicated references, the CPU's
  otherwise."""
  if kernel == "auto":
    kernel = "tpu" if mesh.devices.flat[0].platform == "tpu" and not ring else "cpu"
  if kernel not in KERNELS:
    raise UserError(f"kernel {kernel!r} is not known; use auto or one of {sorted(KERNELS)}")
  return KERNELS[kernel]


def _resolve(queries, refs, query_block, ref_block, dtype, mesh, ring, kernel):
  if dtype not in DTYPES:
    raise UserError(f"dtype {dtype!r} is not supported; use one of {sorted(DTYPES)}")
  mesh = mesh if mesh is not None else parallel.data_mesh()
  kernel = resolve_kernel(kernel, mesh, ring)
  if dtype == "float32":  # an fp32 search keeps exact fp32 similarities (its margin is for them)
    kernel = Kernel(kernel.chunk)
  queries, qnorm = _checked("queries", queries)
  refs, rnorm = _checked("references", refs, queries.shape[1])
  return queries, refs, _Options(int(query_block), int(ref_block), dtype, mesh, bool(ring),
                                 qnorm, float(rnorm.max()), kernel)


def _check_k(k, m):
  if not 1 <= k <= m:
    raise UserError(f"k={k} must be between 1 and the number of references ({m})")


def _margin(k: int, dtype: str) -> int:
  # bf16 errors (~4e-3) span many ranks among dense random neighbours; fp32 ones almost none
  return 2 * k + 16 if dtype == "bfloat16" else 4


def knn(queries, refs, k: int, *, query_block: int = 1024, ref_block: int = 16384,
        dtype: str = "float32", mesh=None, ring: bool = False, margin: Optional[int] = None,
        stats: Optional[dict] = None, kernel: str = "auto"):
  """Exact k nearest references by dot product: (sims [N,k] float32 descending, idx [N,k] int32).

  Ties at the k-th place may resolve to either reference. `ring=True` shards the references over
  the devices and rotates them (for reference sets larger than one device's memory). kernel: a
  name in KERNELS, or "auto" (by the mesh's platform); every kernel gives the same answer.
  """
  queries, refs, opts = _resolve(queries, refs, query_block, ref_block, dtype, mesh, ring, kernel)
  _check_k(k, len(refs))
  stats = {} if stats is None else stats
  kk = k + (_margin(k, dtype) if margin is None else margin)
  exact, idx = _certified_topk(queries, refs, k, kk, opts, stats)[1:3]
  return exact[:, :k].astype(np.float32), idx[:, :k].astype(np.int32)


def _packed_patient_layout(ref_patients: np.ndarray, rb: int, n_dev: int, ring: bool):
  """References sorted by patient and packed into blocks so no patient straddles two blocks.

  Returns (order [nb*rb] reference row or -1, start/end [nb, S] patient segments per block).
  """
  order = np.argsort(ref_patients, kind="stable")
  sorted_pat = ref_patients[order]
  bounds = np.flatnonzero(np.diff(sorted_pat)) + 1
  seg_start = np.concatenate([[0], bounds])
  seg_len = np.diff(np.concatenate([seg_start, [len(order)]]))
  rb = max(rb, -(-int(seg_len.max()) // _CHUNK) * _CHUNK)
  blocks, cur, fill = [], [], 0
  for s, ln in zip(seg_start.tolist(), seg_len.tolist()):
    if fill + ln > rb:
      blocks.append(cur)
      cur, fill = [], 0
    cur.append((s, ln))
    fill += ln
  blocks.append(cur)
  nb = -(-len(blocks) // n_dev) * n_dev if ring else len(blocks)
  n_seg = max(len(b) for b in blocks)
  layout = np.full((nb, rb), -1, np.int64)
  start = np.zeros((nb, n_seg), np.int32)
  end = np.zeros((nb, n_seg), np.int32)
  for bi, blk in enumerate(blocks):
    pos = 0
    for si, (s, ln) in enumerate(blk):
      layout[bi, pos:pos + ln] = order[s:s + ln]
      start[bi, si], end[bi, si] = pos, pos + ln
      pos += ln
  return layout, start, end


def _count_patients(queries, refs, ref_patients, tau, qnorm, opts: _Options, stats: dict):
  """Exact distinct matched patients for (saturated) queries: fp32 kernel + float64 fallback."""
  d = refs.shape[1]
  rb = _fit_block(opts.ref_block, len(refs))
  layout, start, end = _packed_patient_layout(ref_patients, rb, opts.mesh.size, opts.ring)
  rpad = np.where((layout >= 0)[..., None], refs[np.maximum(layout, 0)], 0.0).astype(np.float32)
  eps = _eps_coeff("float32", d) * float(qnorm.max()) * opts.rmax
  qb = _fit_block(opts.query_block, -(-len(queries) // opts.mesh.size), multiple=8)
  sure, possible = _run_engine(opts.mesh, opts.ring, ("count", float(tau), float(eps)), queries,
                               rpad.reshape(-1, d), (start, end), qb, rpad.shape[1], "float32")
  todo = np.nonzero(sure != possible)[0]
  stats["count_float64"] = int(len(todo))
  if len(todo):
    sure[todo] = _host_patient_counts(queries[todo], refs, ref_patients, tau)
  return sure.astype(np.int32)


def _distinct_in_order(patients: np.ndarray, hit: np.ndarray):
  """Per row: count of distinct patients among hits, and them in row order (-1 padded)."""
  n, kk = patients.shape
  p = np.where(hit, patients, -1)
  out = np.full((n, kk), -1, np.int32)
  count = np.zeros(n, np.int32)
  for a in range(0, n, 4096):
    blk = p[a:a + 4096]
    earlier = np.tril(np.ones((kk, kk), bool), -1)     # [j, i]: i before j
    dup = ((blk[:, :, None] == blk[:, None, :]) & earlier[None]).any(2)
    first = (blk >= 0) & ~dup
    count[a:a + 4096] = first.sum(1)
    order = np.argsort(~first, axis=1, kind="stable")
    out[a:a + 4096] = np.where(np.take_along_axis(first, order, 1),
                               np.take_along_axis(blk, order, 1), -1)
  return count, out


def patient_search(queries, refs, ref_patients, tau: float, k: int, *, query_block: int = 1024,
                   ref_block: int = 16384, dtype: str = "float32", mesh=None, ring: bool = False,
                   count_k: int = 16, margin: Optional[int] = None,
                   kernel: str = "auto") -> PatientSearch:
  """Top-k references per query plus the distinct training patients matched at sim >= tau.

  ref_patients: int [M] patient id of each reference (any non-negative ints).
  count_k: candidates kept per query for counting; queries with more near-tau references than
  that are counted by the exact patient-segment kernel instead.
  """
  queries, refs, opts = _resolve(queries, refs, query_block, ref_block, dtype, mesh, ring, kernel)
  _check_k(k, len(refs))
  ref_patients = np.asarray(ref_patients)
  if ref_patients.shape != (len(refs),) or not np.issubdtype(ref_patients.dtype, np.integer):
    raise UserError(f"ref_patients must be integer ids, one per reference ({len(refs)}), got "
                    f"{ref_patients.dtype} {ref_patients.shape}")
  if ref_patients.min() < 0:
    raise UserError("ref_patients has negative ids; map patient names to ids 0..P-1 first")
  if not np.isfinite(tau):
    raise UserError(f"tau={tau} is not a finite similarity threshold")
  stats = {}
  kk = max(k + (_margin(k, dtype) if margin is None else margin), count_k)
  approx, exact, idx, eps, outside = _certified_topk(queries, refs, k, kk, opts, stats, tau=tau)
  kk = idx.shape[1]
  hit = exact >= tau
  count, matched = _distinct_in_order(np.where(idx >= 0, ref_patients[np.maximum(idx, 0)], -1), hit)
  # all references reaching tau are candidates unless the last candidate is near or above tau
  saturated = np.zeros(len(queries), bool) if kk == len(refs) else outside >= tau - eps
  todo = np.nonzero(saturated)[0]
  stats["saturated"] = int(len(todo))
  if len(todo):
    count[todo] = _count_patients(queries[todo], refs, ref_patients, tau, opts.qnorm[todo], opts,
                                  stats)
  best_patient = ref_patients[idx[:, 0]].astype(np.int32)
  return PatientSearch(
      topk_sims=exact[:, :k].astype(np.float32), topk_idx=idx[:, :k].astype(np.int32),
      n_patients_matched=count, best_patient=best_patient,
      best_sim=exact[:, 0].astype(np.float32), matched_patients=matched,
      matched_complete=~saturated, stats=stats)


def gflop(n: int, m: int, d: int) -> float:
  """Work of the all-pairs GEMM (multiply-adds counted as 2)."""
  return 2.0 * n * m * d / 1e9

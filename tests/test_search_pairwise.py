"""The all-pairs kernel against numpy brute force, faiss, 1 vs 8 devices, ring vs replicated,
bf16 vs fp32, and two real processes."""

import os
import socket
import subprocess
import sys

import faiss
import jax
import ml_collections
import numpy as np
import pytest

import tolerances as T
from conftest import ROOT
from pso_jax import parallel
from pso_jax.search import pairwise
from pso_jax.errors import UserError


def _unit(x):
  x = np.asarray(x, np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _random(n, m, d, seed=0):
  rng = np.random.default_rng(seed)
  return _unit(rng.normal(size=(n, d))), _unit(rng.normal(size=(m, d)))


def _structured(n_patients=60, per=4, n_queries=150, d=24, seed=1):
  """Patients as clusters: each image = patient centre + small noise; queries are noisy copies
  of some images, or of no patient at all. Gives dense near-ties among a patient's images."""
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(n_patients, d))
  patients = np.repeat(np.arange(n_patients), per)
  refs = _unit(centres[patients] + 0.25 * rng.normal(size=(len(patients), d)))
  src = rng.integers(0, len(refs), n_queries)
  queries = refs[src] + 0.05 * rng.normal(size=(n_queries, d))
  queries[::3] = rng.normal(size=(len(queries[::3]), d))
  return _unit(queries), refs, patients


def _mesh1():
  return parallel.data_mesh(jax.devices()[:1])


def _exact(q, r):
  return q.astype(np.float64) @ r.astype(np.float64).T


def _assert_topk_matches(sims, idx, q, r, k):
  """Same values as brute force; same index sets except where the k-th place is a tie."""
  tol = T.reduction_rtol(q.shape[1])  # float32 dot products of unit vectors vs float64
  full = _exact(q, r)
  want = -np.sort(-full, axis=1)[:, :k]
  np.testing.assert_allclose(sims, want, atol=tol)
  np.testing.assert_allclose(np.take_along_axis(full, idx, 1), sims, atol=tol)
  assert (np.diff(sims, axis=1) <= 0).all()
  clear = want[:, k - 1] - np.sort(full, axis=1)[:, -k - 1] > tol if k < r.shape[0] else True
  truth = np.argsort(-full, axis=1)[:, :k]
  assert (np.sort(idx, 1) == np.sort(truth, 1))[clear].all()


def _numpy_patient_counts(q, r, patients, tau):
  hits = _exact(q, r) >= tau
  return np.array([len(set(patients[h])) for h in hits])


@pytest.mark.parametrize("data", ["random", "structured"])
def test_knn_equals_numpy_and_faiss_on_1_and_8_devices(data):
  q, r = _random(200, 2000, 32) if data == "random" else _structured()[:2]
  k = 5
  index = faiss.IndexFlatIP(q.shape[1])
  index.add(r)
  f_sims, f_idx = index.search(q, k)
  runs = {}
  mesh2 = parallel.make_mesh(ml_collections.ConfigDict(dict(data=4, fsdp=2)))
  for name, mesh, ring in [("1dev", _mesh1(), False), ("8dev", None, False), ("ring", None, True),
                           ("data x fsdp ring", mesh2, True)]:
    sims, idx = pairwise.knn(q, r, k, query_block=16, ref_block=512, mesh=mesh, ring=ring)
    _assert_topk_matches(sims, idx, q, r, k)
    np.testing.assert_allclose(sims, f_sims, atol=T.reduction_rtol(q.shape[1]))  # faiss's order
    runs[name] = (sims, idx)
  for name in ("8dev", "ring", "data x fsdp ring"):
    np.testing.assert_array_equal(runs[name][0], runs["1dev"][0])
    np.testing.assert_array_equal(runs[name][1], runs["1dev"][1])
  same = (np.sort(runs["1dev"][1], 1) == np.sort(f_idx, 1)).mean()
  assert same > 0.99  # faiss's fp32 GEMM may order exact near-ties differently


def test_bf16_rescored_equals_fp32():
  q, r, _ = _structured(n_patients=100, per=5, n_queries=300, d=64)
  stats = {}
  b_sims, b_idx = pairwise.knn(q, r, 8, query_block=32, ref_block=128, dtype="bfloat16",
                               stats=stats)
  f_sims, f_idx = pairwise.knn(q, r, 8, query_block=32, ref_block=128)
  np.testing.assert_array_equal(b_sims, f_sims)
  np.testing.assert_array_equal(np.sort(b_idx, 1), np.sort(f_idx, 1))
  _assert_topk_matches(b_sims, b_idx, q, r, 8)
  assert stats["dtype"] == "bfloat16" and stats["refined_fp32"] < len(q)


def test_exact_ties_fall_back_to_float64():
  q, r = _random(40, 300, 16, seed=3)
  r = np.concatenate([r, r[:50], r[:50]])  # every one of these rows three times
  stats = {}
  sims, idx = pairwise.knn(q, r, 4, query_block=8, ref_block=64, stats=stats, margin=1)
  _assert_topk_matches(sims, idx, q, r, 4)
  assert stats["refined_float64"] > 0


@pytest.mark.parametrize("ring,dtype", [(False, "float32"), (True, "float32"), (True, "bfloat16")])
def test_patient_counts_equal_numpy(ring, dtype):
  q, r, patients = _structured(n_patients=50, per=4, n_queries=120, d=16)
  patients = patients * 7 + 3  # ids need not be contiguous
  tau = 0.55
  want = _numpy_patient_counts(q, r, patients, tau)
  assert want.max() >= 3 and (want == 1).any() and (want == 0).any()
  res = pairwise.patient_search(q, r, patients, tau, 3, query_block=16, ref_block=32,
                                ring=ring, dtype=dtype, count_k=4, margin=2)
  np.testing.assert_array_equal(res.n_patients_matched, want)
  assert res.stats["saturated"] > 0  # the exact patient-segment kernel ran for some queries
  full = _exact(q, r)
  np.testing.assert_allclose(res.best_sim, full.max(1), atol=T.reduction_rtol(q.shape[1]))
  np.testing.assert_array_equal(res.best_patient, patients[full.argmax(1)])
  assert res.matched_complete.any() and not res.matched_complete.all()
  for i in np.nonzero(res.matched_complete & (want > 0))[0][:20]:
    got = res.matched_patients[i][res.matched_patients[i] >= 0]
    assert set(got) == set(patients[full[i] >= tau])
    assert got[0] == res.best_patient[i]


def test_counts_near_tau_are_exact():
  """References at tau +- 1e-7 around a query: only the float64 fallback can tell them apart."""
  tau, d = 0.6, 8
  q = np.zeros((1, d), np.float32)
  q[0, 0] = 1
  cos = np.array([tau + 2e-7, tau - 2e-7, tau + 3e-7, tau - 3e-7, 0.1, 0.2], np.float32)
  r = np.zeros((6, d), np.float32)
  r[:, 0], r[:, 1] = cos, np.sqrt(1 - cos.astype(np.float64) ** 2)
  patients = 10 ** 9 + np.array([0, 1, 2, 3, 4, 5])  # large, sparse ids
  res = pairwise.patient_search(np.repeat(q, 3, 0), r, patients, tau, 2, query_block=8,
                                ref_block=16, count_k=1, margin=0)
  want = _numpy_patient_counts(q, r, patients, tau)[0]
  assert want == 2 and (res.n_patients_matched == want).all()
  assert res.stats["count_float64"] == 3  # the fp32 counts could not be certified


def test_bad_inputs_are_clear_errors():
  q, r = _random(10, 20, 8)
  with pytest.raises(UserError, match="dimension 7 but the other set has 8"):
    pairwise.knn(q, r[:, :7], 2)
  bad = q.copy()
  bad[3, 1] = np.nan
  with pytest.raises(UserError, match="NaN/Inf.*row 3"):
    pairwise.knn(bad, r, 2)
  with pytest.raises(UserError, match="empty"):
    pairwise.knn(q[:0], r, 2)
  with pytest.raises(UserError, match="k=30"):
    pairwise.knn(q, r, 30)
  with pytest.raises(UserError, match="one per reference"):
    pairwise.patient_search(q, r, np.arange(19), 0.5, 2)


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one_device(tmp_path):
  q, r, patients = _structured(n_patients=40, per=4, n_queries=90, d=16, seed=5)
  tau = 0.55
  out = str(tmp_path / "res")
  np.savez(out + ".inputs.npz", q=q, r=r, patients=patients, tau=tau)
  port = _free_port()
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  worker = os.path.join(ROOT, "tests", "audit_multiprocess_worker.py")
  procs = [subprocess.Popen([sys.executable, worker, str(port), str(i), out], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  logs = [p.communicate(timeout=240)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), "\n".join(logs)[-3000:]
  one = pairwise.patient_search(q, r, patients, tau, 5, query_block=16, ref_block=64,
                                mesh=_mesh1(), count_k=6)
  for pid in range(2):
    res = np.load(f"{out}.{pid}.npz")
    for ring in (False, True):
      np.testing.assert_array_equal(res[f"sims_{ring}"], one.topk_sims)
      np.testing.assert_array_equal(res[f"idx_{ring}"], one.topk_idx)
      np.testing.assert_array_equal(res[f"count_{ring}"], one.n_patients_matched)


@pytest.mark.parametrize("rb,kk", [(16384, 14), (4096, 9), (512, 30), (100, 5)])
def test_block_topk_hierarchy_equals_numpy(rb, kk):
  """The chunk-maximum hierarchy (up to three levels at 16384 columns) returns the same values as
  a full sort, and columns holding them, with many ties (small integers)."""
  rng = np.random.default_rng(rb)
  s = rng.integers(-500, 500, size=(64, rb)).astype(np.float32)
  s[3] = 7.0  # a row of ties only
  v, col = jax.jit(lambda s: pairwise._block_topk(s, kk))(s)
  v, col = np.asarray(v), np.asarray(col)
  np.testing.assert_array_equal(v, -np.sort(-s, axis=1)[:, :kk])
  np.testing.assert_array_equal(np.take_along_axis(s, col, 1), v)
  assert all(len(set(c)) == kk for c in col.tolist())


def test_aligned_host_arrays_are_used_in_place():
  """64-byte aligned float32 inputs reach the device without a copy; others are copied once."""
  x = pairwise.aligned_empty((300, 24))
  x[...] = 1.0
  assert x.ctypes.data % 64 == 0 and pairwise._as_host(x, np.float32) is x
  dev = parallel.host_to_global(pairwise._as_host(x, np.float32), parallel.replicated(_mesh1()))
  assert dev.addressable_data(0).unsafe_buffer_pointer() == x.ctypes.data
  y = np.ones((300, 24), np.float64)
  z = pairwise._as_host(y, np.float32)
  assert z.dtype == np.float32 and z.ctypes.data % 64 == 0 and (z == 1).all()


@pytest.mark.parametrize("ring", [False, True])
def test_two_stage_candidates_bound_every_other_reference(ring):
  """The TPU's two-stage kernel (chunk maxima, then the chunks' rows scored again): distinct
  candidates within eps of their float64 similarity, and every other reference at most
  `outside` + eps, the certificate's premise. 3001 references in blocks of 512: a clamped last
  block (replicated) or padded shards (ring)."""
  q, r = _random(97, 3001, 32, seed=7)
  queries, refs, opts = pairwise._resolve(q, r, 16, 512, "bfloat16", None, ring, "tpu")
  assert opts.kernel.two_stage
  kk = 12
  approx, idx, outside = pairwise._candidates(queries, refs, kk, opts)
  full = _exact(q, r)
  eps = pairwise._eps_coeff("bfloat16", 32, opts.kernel.rounding) * opts.qnorm * opts.rmax
  assert (idx >= 0).all() and all(len(set(row)) == kk for row in idx.tolist())
  assert (np.abs(approx - np.take_along_axis(full, idx, 1)) <= eps[:, None]).all()
  others = np.ones_like(full, bool)
  np.put_along_axis(others, idx, False, 1)
  assert (np.where(others, full, -np.inf).max(1) <= outside + eps).all()
  assert (outside >= approx[:, -1]).all()


def test_tpu_kernel_equals_the_cpu_kernel_and_numpy():
  """Every kernel returns the same exact answer: knn (replicated and ring, bf16 and fp32) and
  patient counts, against numpy and the CPU kernel."""
  kernel = "tpu"
  q, r, patients = _structured(n_patients=100, per=5, n_queries=150, d=32)
  for ring in (False, True):
    for dtype in ("bfloat16", "float32"):
      opts = dict(query_block=16, ref_block=128, ring=ring, dtype=dtype)
      sims, idx = pairwise.knn(q, r, 6, kernel=kernel, **opts)
      _assert_topk_matches(sims, idx, q, r, 6)
      c_sims, c_idx = pairwise.knn(q, r, 6, kernel="cpu", **opts)
      np.testing.assert_array_equal(sims, c_sims)
      np.testing.assert_array_equal(np.sort(idx, 1), np.sort(c_idx, 1))
  res = pairwise.patient_search(q, r, patients, 0.55, 3, query_block=16, ref_block=64,
                                dtype="bfloat16", kernel=kernel, count_k=4, margin=2)
  np.testing.assert_array_equal(res.n_patients_matched, _numpy_patient_counts(q, r, patients, 0.55))
  with pytest.raises(UserError, match="kernel 'gpu' is not known"):
    pairwise.knn(q, r, 2, kernel="gpu")


def test_packed_topk_equals_top_k_within_its_rounding():
  """float32 values packed with their columns into int32 keys (10 bits of column): lax.top_k's
  values rounded down by less than 2^-13 (relative; -0 becomes a subnormal, 2^-139 below), at
  distinct columns whose values are within that of them; exact for values with short mantissas
  (small integers / 8), ties, +0 and +-inf."""
  rng = np.random.default_rng(0)
  x = rng.integers(-300, 300, size=(64, 1000)).astype(np.float32) / 8
  x[1], x[4] = 0.0, -0.0
  x[2, ::3] = -np.inf
  x[3, :5] = np.inf
  x[5:] = rng.standard_normal((59, 1000)) * 10.0 ** rng.integers(-30, 30, (59, 1))
  x[5::2] = -np.abs(x[5::2])  # rows of negative values only
  v, col = jax.jit(lambda a: pairwise._topk_packed(a, 30, 10))(x)
  v, col = np.asarray(v), np.asarray(col)
  want = -np.sort(-x, axis=1)[:, :30]
  np.testing.assert_array_equal(v[:4], want[:4])
  tol = lambda a: 2.0 ** -13 * np.abs(a) + 2.0 ** -139
  with np.errstate(invalid="ignore"):  # inf - inf in rows 0-3, checked exactly above
    assert (v <= want).all() and (np.abs(v - want) <= tol(want))[4:].all()
    got = np.take_along_axis(x, col, 1)
    assert (np.abs(got - v) <= tol(got))[4:].all() and (got == v)[:4].all()
  assert all(len(set(c)) == 30 for c in col.tolist())

"""The audit benchmark runs at toy sizes and its kernel agrees with faiss on the bench's data."""

import json

from pso_jax.bench import audit as bench_audit


def test_bench_runs_and_agrees_with_faiss(capsys):
  bench_audit.main(["audit", "--n=96", "--m=1024", "--d=128", "--k=5", "--query_block=32",
                    "--ref_block=256", "--repeats=1", "--memory=64x512"])
  out = capsys.readouterr().out
  result = json.loads(out.strip().splitlines()[-1])
  t = result["throughput"]
  assert t["topk_agreement_with_faiss"] == 1.0 and t["max_abs_sim_diff_vs_faiss"] < 1e-5
  assert t["isolating_share"] > 0.5  # the bench data's queries match their own patient
  assert "knn/faiss" in out and "counting overhead" in out and "bound: XLA's GEMM" in out
  assert t["block_gemm_gflops"] > 0 and t["blas_block_gemm_gflops"] > 0
  assert t["knn_vs_block_gemm"] == t["knn_gflops"] / t["block_gemm_gflops"]
  mem = result["memory"][0]
  assert mem["n"] == 64 and mem["m"] == 512 and mem["peak_rss_mb"] >= mem["rss_with_inputs_mb"]

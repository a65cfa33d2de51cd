"""Heun sampler against the closed-form probability-flow ODE of Gaussian data, guidance algebra,
and independence of the images from device count and batch size."""

import os
import platform
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tolerances as T
from pso_jax import parallel
from pso_jax.diffusion import sampler as S

SCHEDULE = dict(sigma_min=0.002, sigma_max=80.0, rho=7.0)


def gaussian_denoiser(mu, s):
  """E[x0 | x] for x0 ~ N(mu, s^2 I), x = x0 + sigma n: the ideal denoiser."""
  def denoise(x, sigma, cond):
    shrink = (s ** 2 / (s ** 2 + sigma ** 2))[:, None, None, None]
    return mu + shrink * (x - mu)
  return denoise


def exact_flow(noise, mu, s, sigma_max):
  """Probability-flow ODE solution at sigma 0 from x(sigma_max) = noise * sigma_max.

  dx/dsigma = (x - mu) sigma / (s^2 + sigma^2)  =>  x - mu is proportional to sqrt(s^2 + sigma^2).
  """
  x_t = noise * sigma_max
  return mu + (x_t - mu) * s / np.sqrt(s ** 2 + sigma_max ** 2)


def test_sigma_schedule_matches_karras_formula():
  sig = S.edm_sigmas(4, **SCHEDULE)
  assert sig.shape == (5,) and sig[-1] == 0
  np.testing.assert_allclose(sig[0], 80.0, rtol=1e-6)
  np.testing.assert_allclose(sig[3], 0.002, rtol=1e-5)
  # the middle values are equally spaced in sigma^(1/rho)
  np.testing.assert_allclose(np.diff(sig[:4].astype(np.float64) ** (1 / 7)),
                             np.diff(sig[:2].astype(np.float64) ** (1 / 7))[0], rtol=1e-4)


def test_heun_converges_to_the_exact_gaussian_flow_at_second_order():
  mu, s = 0.3, 0.5
  noise = jax.random.normal(jax.random.key(0), (64, 4, 4, 1))
  expected = exact_flow(np.asarray(noise, np.float64), mu, s, 80.0)
  errors = {}
  for steps in (32, 64, 256):
    out = jax.jit(lambda n: S.heun_sample(gaussian_denoiser(mu, s), n, None, steps=steps,
                                          **SCHEDULE))(noise)
    errors[steps] = np.abs(np.asarray(out, np.float64) - expected).max()
  assert errors[256] < 1e-3
  # Heun is second order: doubling the steps divides the error by about 4
  assert 3.0 < errors[32] / errors[64] < 5.0


def test_samples_have_the_data_mean_and_std():
  mu, s = -0.4, 0.7
  noise = jax.random.normal(jax.random.key(1), (4096, 2, 2, 1))
  out = np.asarray(S.heun_sample(gaussian_denoiser(mu, s), noise, None, steps=64, **SCHEDULE))
  # 16384 values: sampling error of the mean ~0.005, of the std ~0.004
  assert abs(out.mean() - mu) < 0.02
  assert abs(out.std() - s) < 0.02


def test_guidance_extrapolates_between_conditional_and_reference():
  mu_ref, mu_cond, s, g = 0.0, 0.5, 0.5, 1.6
  noise = jax.random.normal(jax.random.key(2), (32, 2, 2, 1))
  out = S.heun_sample(gaussian_denoiser(mu_cond, s), noise, None, steps=256, guidance=g,
                      ref_denoise_fn=gaussian_denoiser(mu_ref, s), **SCHEDULE)
  # with equal variances the guided denoiser is the ideal one for mean mu_ref + g (mu_cond - mu_ref)
  expected = exact_flow(np.asarray(noise, np.float64), mu_ref + g * (mu_cond - mu_ref), s, 80.0)
  np.testing.assert_allclose(np.asarray(out), expected, atol=2e-3)
  # per-sample guidance: row i uses g_i
  gs = jnp.linspace(0.5, 2.0, 32)
  out_v = S.heun_sample(gaussian_denoiser(mu_cond, s), noise, None, steps=256, guidance=gs,
                        ref_denoise_fn=gaussian_denoiser(mu_ref, s), **SCHEDULE)
  mus = (mu_ref + np.asarray(gs) * (mu_cond - mu_ref))[:, None, None, None]
  np.testing.assert_allclose(np.asarray(out_v), exact_flow(np.asarray(noise, np.float64), mus, s, 80.0),
                             atol=2e-3)


@pytest.mark.parametrize("guidance, guided", [(1.0, False), (1.3, True)])
def test_guidance_one_skips_the_reference_and_counts_evaluations(guidance, guided):
  calls = {"cond": 0, "ref": 0}

  def counting(name, fn):
    def denoise(x, sigma, cond):
      calls[name] += 1
      return fn(x, sigma, cond)
    return denoise

  noise = jax.random.normal(jax.random.key(3), (2, 2, 2, 1))
  steps = 5
  with jax.disable_jit():  # fori_loop runs as a Python loop, so each call is counted
    out = S.heun_sample(counting("cond", gaussian_denoiser(0.2, 0.5)), noise, None, steps=steps,
                        guidance=guidance, ref_denoise_fn=counting("ref", gaussian_denoiser(0.0, 0.5)),
                        **SCHEDULE)
    cond_only = S.heun_sample(gaussian_denoiser(0.2, 0.5), noise, None, steps=steps, **SCHEDULE)
  assert calls["cond"] == 2 * steps - 1
  assert calls["ref"] == (2 * steps - 1 if guided else 0)
  assert calls["cond"] + calls["ref"] == S.evaluations_per_candidate(steps, guided)
  if not guided:
    np.testing.assert_array_equal(np.asarray(out), np.asarray(cond_only))


def conditional_toy_net():
  """A small nonlinear conditional 'network' with parameters, to exercise GuidedSampler."""
  w = jax.random.normal(jax.random.key(7), (3, 4)) * 0.3
  variables = {"w": w, "b": jnp.linspace(-0.2, 0.2, 4)}

  def apply(v, x, sigma, cond):
    c = jnp.zeros((x.shape[0], 3)) if cond is None else cond
    shift = jnp.tanh(c @ v["w"] + v["b"])[:, None, None, :]
    skip = (0.25 / (0.25 + sigma ** 2))[:, None, None, None]
    return skip * x + (1 - skip) * jnp.tanh(shift + 0.5 * x / jnp.sqrt(0.25 + sigma ** 2)[:, None, None, None])
  return S.Denoiser(apply, variables)


def make_sampler(mesh, batch_size, guide=True):
  net = conditional_toy_net()
  ref = S.null_condition_guide(net) if guide else None
  return S.GuidedSampler(net, ref, key=jax.random.key(11), shape=(8, 8, 4), steps=4,
                         batch_size=batch_size, mesh=mesh, **SCHEDULE)


# Two sampler programs (other device count, batch, padding or CPU vector width) agree to the
# rounding of every toy-net evaluation along a candidate's path (its 3-term condition sum, the
# tanh), added up: the probability-flow ODE contracts towards the data and does not amplify them.
LAYOUT_RTOL = T.sequential_rtol(S.evaluations_per_candidate(4, guided=True), T.reduction_rtol(3))


def images_in_three_layouts() -> dict:
  """24 candidates on 1 device in one batch, on 8 devices in batches of 16 (the second padded),
  and candidate 5 alone on 8 devices (padded to 8)."""
  n = 24
  seeds = np.arange(1000, 1000 + n)
  cond = np.asarray(jax.random.normal(jax.random.key(5), (n, 3)))
  guidance = np.where(np.arange(n) % 2 == 0, 1.2, 0.9)
  assert len(jax.devices()) == 8
  return dict(one=make_sampler(parallel.data_mesh(jax.devices()[:1]), batch_size=n)(seeds, cond, guidance),
              eight=make_sampler(parallel.data_mesh(), batch_size=16)(seeds, cond, guidance),
              alone=make_sampler(parallel.data_mesh(), batch_size=8)(seeds[5:6], cond[5:6], guidance[5:6]))


def test_images_do_not_depend_on_devices_or_batch_size():
  images = images_in_three_layouts()
  T.assert_close(images["eight"], images["one"], LAYOUT_RTOL)
  # a candidate alone gives the same image as inside a batch
  T.assert_close(images["alone"][0], images["one"][5], LAYOUT_RTOL)
  # and different seeds give different images
  assert np.abs(images["one"][0] - images["one"][2]).mean() > 0.1


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                    reason="AVX2 is an x86 instruction set")
def test_images_match_on_a_cpu_without_avx512(tmp_path):
  """The suite runs where the README runs, AVX-512 or not: a subprocess limited to AVX2 (as if on
  such a CPU; conftest's PSO_JAX_TEST_MAX_ISA) samples the three layouts, which agree with each
  other and with this process's images, whatever this CPU has, to the layouts' rounding."""
  here = os.path.dirname(os.path.abspath(__file__))
  env = dict(os.environ, PSO_JAX_TEST_MAX_ISA="AVX2",
             PYTHONPATH=os.pathsep.join([here, os.path.dirname(here), os.environ.get("PYTHONPATH", "")]))
  env.pop("XLA_FLAGS")  # conftest builds them again, the ISA limit included
  script = ("import sys, numpy as np, conftest, test_diffusion_sampler as t; "
            "np.savez(sys.argv[1], **t.images_in_three_layouts())")
  proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "avx2.npz")], env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  avx2 = dict(np.load(tmp_path / "avx2.npz"))
  T.assert_close(avx2["eight"], avx2["one"], LAYOUT_RTOL)
  T.assert_close(avx2["alone"][0], avx2["one"][5], LAYOUT_RTOL)
  for layout, images in images_in_three_layouts().items():
    T.assert_close(avx2[layout], images, LAYOUT_RTOL, err_msg=f"{layout}: AVX2 vs this CPU")


def test_short_batches_pad_to_power_of_two_buckets():
  """A short call runs at the smallest power-of-two multiple of the shards that holds it (few
  compiled shapes, little padding), and its images are those of a full batch."""
  one_dev = make_sampler(parallel.data_mesh(jax.devices()[:1]), batch_size=32)
  assert [one_dev.padded_size(r) for r in (1, 2, 3, 5, 9, 17, 32, 33)] == [1, 2, 4, 8, 16, 32, 32, 32]
  eight = make_sampler(parallel.data_mesh(), batch_size=40)  # 40: a multiple of the 8 shards
  assert [eight.padded_size(r) for r in (1, 8, 9, 17, 33, 40)] == [8, 8, 16, 32, 40, 40]
  n = 37
  seeds = np.arange(2000, 2000 + n)
  cond = np.asarray(jax.random.normal(jax.random.key(6), (n, 3)))
  guidance = np.full(n, 1.2)
  full = make_sampler(parallel.data_mesh(jax.devices()[:1]), batch_size=64)(seeds, cond, guidance)
  parts = np.concatenate([one_dev(seeds[:32], cond[:32], guidance[:32]),  # 32, then 5 -> 8
                          one_dev(seeds[32:], cond[32:], guidance[32:])])
  T.assert_close(parts, full, LAYOUT_RTOL)  # batches of 32 and 8 vs one of 64
  T.assert_identical(one_dev(seeds[32:], cond[32:], guidance[32:]), parts[32:])  # same program
  assert one_dev._function(True)._cache_size() == 2  # two shapes compiled: 32 and 8


def test_sampler_guided_matches_hand_built_guidance_and_counts():
  n = 8
  seeds = np.arange(n)
  cond = np.asarray(jax.random.normal(jax.random.key(6), (n, 3)))
  sampler = make_sampler(parallel.data_mesh(), batch_size=8)
  out = sampler(seeds, cond, 1.5)
  assert sampler.evaluations == n * S.evaluations_per_candidate(4, True)
  net = conditional_toy_net()
  noise = S.candidate_noise(jax.random.key(11), jnp.asarray(seeds, jnp.uint32), (8, 8, 4))
  ref = lambda x, s, c: net.apply(net.variables, x, s, jnp.zeros_like(c))
  manual = S.heun_sample(lambda x, s, c: net.apply(net.variables, x, s, c), noise, jnp.asarray(cond),
                         steps=4, guidance=1.5, ref_denoise_fn=ref, **SCHEDULE)
  T.assert_close(out, np.asarray(manual), LAYOUT_RTOL)  # eager vs fused jit: other roundings
  sampler.evaluations = 0
  plain = sampler(seeds, cond, 1.0)
  assert sampler.evaluations == n * S.evaluations_per_candidate(4, False)
  assert np.abs(plain - out).mean() > 1e-3
  with pytest.raises(ValueError, match="guide"):
    make_sampler(parallel.data_mesh(), 8, guide=False)(seeds, cond, 1.2)

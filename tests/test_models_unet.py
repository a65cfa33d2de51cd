"""EDM2 UNet + preconditioning: exact EDM2 sizes, FLOPs, init behaviour, gradients, conditioning."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tolerances as T
from conftest import load_config
from pso_jax.errors import UserError
from pso_jax.models import presets
from pso_jax.models.flops import forward_flops
from pso_jax.models.mp_layers import is_mp_weight
from pso_jax.models.unet import Block


def _xs_config(cond="uncond", dim=2048):
  c = load_config("")
  c.data.latent.kind = "sd_vae"        # 512 px -> 64x64x4 latents
  c.data.features.dim = dim
  c.model.cond = cond
  return c


def _shapes(config):
  model = presets.build_model(config)
  return model, jax.eval_shape(lambda k: presets.init_variables(model, k, config), jax.random.key(0))


@pytest.mark.parametrize("cond,count", [("uncond", 124_201_253), ("pseudo", 125_249_829),
                                        ("class", 124_201_253 + 8 * 512)])
def test_xs_parameter_count_matches_edm2(cond, count):
  config = _xs_config(cond)
  assert presets.model_input_shape(config) == (64, 64, 4)
  _, shapes = _shapes(config)
  assert presets.count_params(shapes) == count
  # the fixed Fourier features (128 noise + 128 logvar, freqs and phases) are not parameters
  assert sum(math.prod(x.shape) for x in jax.tree.leaves(shapes["constants"])) == 512


@pytest.mark.parametrize("preset,params_m,gmac", [("s", 280.2, 101), ("m", 497.8, 179)])
def test_larger_presets_match_edm2_imagenet_sizes(preset, params_m, gmac):
  config = _xs_config("pseudo", dim=1000)  # EDM2's ImageNet-512 models: 1000 class labels
  config.model.preset = preset
  model, shapes = _shapes(config)
  assert presets.count_params(shapes) / 1e6 == pytest.approx(params_m, abs=0.05)
  assert forward_flops(model, shapes, (64, 64, 4)) / 2e9 == pytest.approx(gmac, abs=0.5)


def test_xs_forward_flops_match_edm2_and_xla():
  config = _xs_config("uncond")
  model, shapes = _shapes(config)
  flops = forward_flops(model, shapes, (64, 64, 4), batch=2) / 2
  assert flops / 1e9 == pytest.approx(89.9, abs=0.05)
  # XLA's own count skips kernel taps on the zero padding and adds element-wise work: a few % less
  x = jax.ShapeDtypeStruct((1, 64, 64, 4), jnp.float32)
  sigma = jax.ShapeDtypeStruct((1,), jnp.float32)
  lowered = jax.jit(lambda v, x, s: model.apply(v, x, s, None)).lower(shapes, x, sigma)
  xla = lowered.cost_analysis()["flops"]
  assert 0.93 < xla / flops < 1.0


def _init(config, seed=0):
  model = presets.build_model(config)
  return model, jax.jit(lambda k: presets.init_variables(model, k, config))(jax.random.key(seed))


@pytest.fixture(scope="module")
def tiny():
  config = load_config("tiny")
  config.model.cond = "pseudo"
  model, variables = _init(config)
  return config, model, variables


@pytest.fixture(scope="module")
def tiny_apply(tiny):
  """One jitted apply of the tiny pseudo-conditioned model, shared by tests (one compile per shape)."""
  _, model, _ = tiny
  return jax.jit(lambda v, x, s, c: model.apply(v, x, s, c))


def _with_gains(variables, value):
  """The variables with every scalar gain (emb_gain, out_gain; 0 at init) set to `value`."""
  params = jax.tree_util.tree_map_with_path(
      lambda p, w: w if is_mp_weight(p) else jnp.full_like(w, value), variables["params"])
  return {**variables, "params": params}


def _batch(config, n, seed=1):
  shape = (n,) + presets.model_input_shape(config)
  x = jax.random.normal(jax.random.key(seed), shape)
  cond = jax.random.normal(jax.random.key(seed + 1), (n, presets.cond_dim(config)))
  return x, cond / jnp.linalg.norm(cond, axis=1, keepdims=True)


def test_init_output_is_skip_only_and_weights_are_projected(tiny, tiny_apply):
  config, _, variables = tiny
  x, cond = _batch(config, 4)
  sigma = jnp.array([0.1, 1.0, 3.0, 20.0])
  d, logvar = tiny_apply(variables, x, sigma, cond)
  assert d.dtype == jnp.float32 and d.shape == x.shape and logvar.shape == (4,)
  # out_gain = 0 at init, so D = c_skip * x exactly
  c_skip = 0.25 / (np.asarray(sigma) ** 2 + 0.25)
  np.testing.assert_allclose(d, c_skip[:, None, None, None] * np.asarray(x), rtol=1e-6)
  leaves = jax.tree_util.tree_flatten_with_path(variables["params"])[0]
  mp = [(p, w) for p, w in leaves if is_mp_weight(p)]
  assert len(mp) > 10 and len(mp) == len(leaves) - sum(1 for p, _ in leaves if not is_mp_weight(p))
  for _, w in mp:
    rows = np.asarray(w).reshape(-1, w.shape[-1])
    np.testing.assert_allclose(np.linalg.norm(rows, axis=0), math.sqrt(rows.shape[0]), rtol=1e-3)
  gains = [w for p, w in leaves if not is_mp_weight(p)]
  assert all(float(g) == 0.0 for g in gains)  # emb_gain per block and out_gain


def test_blocks_keep_unit_magnitude_through_the_unet(tiny):
  config, model, variables = tiny
  x, cond = _batch(config, 32)
  sigma = jnp.full((32,), 1.0)
  stds = {}

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if isinstance(context.module, Block) and context.method_name == "__call__":
      stds[context.module.name] = jnp.std(out)
    return out

  def block_stds(v):
    with nn.intercept_methods(record):
      model.apply(v, x * math.sqrt(1.25), sigma, cond)  # noisy input with unit variance after c_in
    return dict(stds)
  got = jax.jit(block_stds)(variables)
  assert len(got) == 1 + 2 + 2 + 2 * 2 + 1  # enc blocks + down, in0/in1, dec blocks, up
  for name, std in got.items():
    assert 0.7 < float(std) < 1.4, (name, float(std))


def test_all_parameters_get_finite_nonzero_gradients(tiny):
  from pso_jax.diffusion.loss import edm2_loss
  config, model, variables = tiny
  # with zero gains the emb/out paths block the gradient of everything before them
  params = _with_gains(variables, 0.5)["params"]
  x, cond = _batch(config, 8)
  grad_fn = jax.jit(jax.grad(
      lambda p: edm2_loss(model, {**variables, "params": p}, x * 0.5, cond, jax.random.key(3), config)[0]))
  grads = grad_fn(params)
  for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
    g = np.asarray(g)
    assert np.all(np.isfinite(g)), jax.tree_util.keystr(path)
    assert np.abs(g).max() > 0, jax.tree_util.keystr(path)


def test_conditioning_null_is_zeros_and_changes_output(tiny, tiny_apply):
  config, _, variables = tiny
  v = _with_gains(variables, 1.0)
  x, cond = _batch(config, 4)
  sigma = jnp.full((4,), 0.7)
  apply = lambda v, x, c: tiny_apply(v, x, sigma, c)[0]
  d_none = apply(v, x, None)
  np.testing.assert_array_equal(d_none, apply(v, x, jnp.zeros_like(cond)))
  assert float(jnp.max(jnp.abs(apply(v, x, cond) - d_none))) > 1e-3
  with pytest.raises(ValueError, match="condition of shape"):
    apply(v, x, cond[:, :3])


def test_uncond_model_under_jit_any_batch_matches_per_image(tiny):
  batch = 3
  config = load_config("tiny")
  config.model.cond = "uncond"
  model = presets.build_model(config)
  assert model.cond_dim == 0
  # the unconditional net is the conditional one without its label layer (saves an init compile)
  v = _with_gains(tiny[2], 1.0)
  v["params"] = {**v["params"], "unet": {k: w for k, w in v["params"]["unet"].items()
                                         if k != "emb_label"}}
  assert jax.tree.structure(jax.eval_shape(lambda k: presets.init_variables(model, k, config),
                                           jax.random.key(0))) == jax.tree.structure(v)
  x, _ = _batch(config, batch)
  sigma = jnp.linspace(0.05, 5.0, batch)
  apply = jax.jit(lambda v, x, s: model.apply(v, x, s, None))
  d, logvar = apply(v, x, sigma)
  d0, logvar0 = apply(v, x[:1], sigma[:1])  # images are independent of each other
  # a batch of 3 and a batch of 1 are two programs: the network's rounding
  T.assert_close(d[:1], d0, T.network_rtol(v))
  T.assert_close(logvar[:1], logvar0, T.network_rtol(v))


def test_bfloat16_activations_track_float32(tiny, tiny_apply):
  config, _, variables = tiny
  v = _with_gains(variables, 1.0)
  config_bf16 = load_config("tiny")
  config_bf16.model.cond = "pseudo"
  config_bf16.model.dtype = "bfloat16"
  model_bf16 = presets.build_model(config_bf16)
  x, cond = _batch(config, 4)
  sigma = jnp.full((4,), 2.0)
  d32, _ = tiny_apply(v, x, sigma, cond)
  d16, _ = jax.jit(lambda v: model_bf16.apply(v, x, sigma, cond))(v)
  assert d16.dtype == jnp.float32
  rel = float(jnp.linalg.norm(d16 - d32) / jnp.linalg.norm(d32))
  assert 0 < rel < 0.05


def test_dropout_is_random_in_training_only(tiny):
  config, model, variables = tiny
  model = model.clone(dropout=0.5)  # dropout has no parameters: same variables
  v = _with_gains(variables, 1.0)
  x, cond = _batch(config, 2)
  sigma = jnp.ones((2,))
  run = jax.jit(lambda key, train: model.apply(v, x, sigma, cond, train=train,
                                              rngs={"dropout": key})[0], static_argnums=1)
  a, b = run(jax.random.key(1), True), run(jax.random.key(2), True)
  assert float(jnp.max(jnp.abs(a - b))) > 1e-3
  np.testing.assert_array_equal(run(jax.random.key(1), False), run(jax.random.key(2), False))


def test_presets_dropout_and_attention_levels():
  c = load_config("")
  assert presets.build_model(c).dropout == 0.0
  c.model.preset = "m"
  m = presets.build_model(c)
  assert m.dropout == 0.1 and m.model_channels == 256 and tuple(m.attn_levels) == (2, 3)
  c.model.dropout = 0.0
  assert presets.build_model(c).dropout == 0.0
  demo_config = load_config("demo")
  demo = presets.build_model(demo_config)
  assert tuple(demo.attn_levels) == (2,) and presets.model_input_shape(demo_config) == (32, 32, 1)
  demo_config.model.channels = 32  # the base width is overridable from the config
  assert presets.build_model(demo_config).model_channels == 32


def test_cond_dim_and_bad_configs():
  c = load_config("tiny")
  assert presets.cond_dim(c) == c.data.features.dim
  c.model.cond = "class"
  assert presets.cond_dim(c) == 8
  c.model.cond = "uncond"
  assert presets.cond_dim(c) == 0
  for field, value, words in [("model.preset", "xxl", "preset"), ("model.cond", "text", "cond"),
                              ("model.dtype", "float16", "dtype"), ("data.image_size", 17, "multiple")]:
    bad = load_config("tiny")
    section, name = field.split(".")
    bad[section][name] = value
    with pytest.raises(UserError, match=words):
      presets.build_model(bad)


def _attention_params_by_level(params) -> dict:
  """{resolution: attention parameters} of a UNet's params, read from the block names."""
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    names = [getattr(p, "key", "") for p in path]
    if any(n.startswith("attn_") for n in names):
      block = next(n for n in names if n.startswith(("enc_", "dec_")))
      res = block.split("_")[1]
      out[res] = out.get(res, 0) + math.prod(leaf.shape)
  return out


def test_a_level_narrower_than_a_head_has_no_attention_as_in_edm2():
  """EDM2 gives a level with fewer channels than channels_per_head 0 heads (no attention); a
  head of its own there (max(c // per_head, 1)) added 4 c^2 weights per block and changed the
  output. Levels 16x16 (8 ch) and 8x8 (16 ch) both ask for attention at 16 channels per head."""
  from pso_jax.models.unet import UNet
  net = UNet(img_channels=1, model_channels=8, channel_mult=(1, 2), num_blocks=2,
             attn_levels=(0, 1), channels_per_head=16)
  x, sigma = jnp.zeros((1, 16, 16, 1)), jnp.ones((1,))
  params = jax.eval_shape(lambda k: net.init(k, x, sigma, None), jax.random.key(0))["params"]
  # analytic: an attention block at c channels holds qkv (3c x c) and proj (c x c) 1x1 kernels;
  # 8x8 (16 ch, one head) attends in 2 encoder blocks, dec in0 and 3 decoder blocks; 16x16 never
  per_block = 4 * 16 ** 2
  assert _attention_params_by_level(params) == {"8x8": (2 + 1 + 3) * per_block}

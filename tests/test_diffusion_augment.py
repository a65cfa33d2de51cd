"""Non-leaking augmentation of the diffusion model's training images: each image is what its
label says (a numpy mirror and reflect-padded shift), each transform drawn with probability p,
the labels reach the network, and the train step's loss is the loss of the augmented images."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tolerances as T
from conftest import load_config
from pso_jax.diffusion import augment, train_step as step_lib
from pso_jax.diffusion.loss import edm2_loss
from pso_jax.errors import UserError
from pso_jax.models import presets
from pso_jax.stages import checks

SHIFT = 2


def _numpy_augment(x, label, shift):
  """The image the label describes: mirrored left-right if label[0], then content moved by
  (label[1], label[2]) * shift whole pixels, the border reflected in."""
  if label[0]:
    x = x[:, ::-1]
  dy, dx = (int(round(v * shift)) for v in label[1:])
  padded = np.pad(x, ((shift, shift), (shift, shift), (0, 0)), mode="reflect")
  h, w = x.shape[:2]
  return padded[shift - dy:shift - dy + h, shift - dx:shift - dx + w]


def _draws(p, n=400):
  x = np.random.default_rng(0).normal(size=(8, 8, 2)).astype(np.float32)
  keys = jax.random.split(jax.random.key(3), n)
  out, labels = jax.jit(jax.vmap(lambda k: augment.augment_one(jnp.asarray(x), k, p, SHIFT)))(keys)
  return x, np.asarray(out), np.asarray(labels)


def test_each_image_is_what_its_label_says():
  x, out, labels = _draws(0.5)
  for o, label in zip(out, labels):
    np.testing.assert_array_equal(o, _numpy_augment(x, label, SHIFT))
  untouched = ~labels.any(axis=1)
  assert all(np.array_equal(o, x) for o in out[untouched])
  # every shift in [-SHIFT, SHIFT]^2 is drawn, and mirroring is a 0/1 flag
  shifts = {tuple(np.round(l[1:] * SHIFT).astype(int)) for l in labels}
  assert shifts == {(dy, dx) for dy in range(-SHIFT, SHIFT + 1) for dx in range(-SHIFT, SHIFT + 1)}
  assert set(np.unique(labels[:, 0])) == {0.0, 1.0}


@pytest.mark.parametrize("p", [0.0, 0.2, 0.6])
def test_each_transform_is_drawn_with_probability_p(p):
  n = 4000
  _, out, labels = _draws(p, n)
  mirrored = labels[:, 0].mean()
  # a shift is drawn with probability p, and is then (0, 0) once in (2 SHIFT + 1)^2
  moved = labels[:, 1:].any(axis=1).mean()
  for share, expected in ((mirrored, p), (moved, p * (1 - 1 / (2 * SHIFT + 1) ** 2))):
    bound = 4 * np.sqrt(expected * (1 - expected) / n)  # binomial, 4 standard errors
    assert abs(share - expected) <= bound, (share, expected)
  if p == 0:
    assert not labels.any()


def _open_gains(params):
  """EDM2 starts every gain at 0 (output and embedding ignored); open them as training would."""
  return jax.tree.map(lambda v: v + 1.0 if v.ndim == 0 else v, params)


def _tiny(p):
  config = load_config("tiny")
  config.train.augment_p = p
  return config


def test_the_network_sees_the_labels_and_samples_unaugmented():
  config = _tiny(0.3)
  model = presets.build_model(config)
  variables = presets.init_variables(model, jax.random.key(0), config)
  assert "emb_augment" in variables["params"]["unet"]
  variables["params"] = _open_gains(variables["params"])
  h, w, c = presets.model_input_shape(config)
  x = jax.random.normal(jax.random.key(1), (2, h, w, c))
  cond = jnp.zeros((2, model.cond_dim))
  plain, _ = model.apply(variables, x, jnp.ones(2), cond)
  zeros, _ = model.apply(variables, x, jnp.ones(2), cond, augment_labels=jnp.zeros((2, 3)))
  flipped, _ = model.apply(variables, x, jnp.ones(2), cond,
                           augment_labels=jnp.array([[1.0, 0, 0]] * 2))
  T.assert_close(plain, zeros, 1e-6)    # no labels (sampling) = the unaugmented label
  assert float(jnp.max(jnp.abs(flipped - plain))) > 1e-3
  # off: the network is the reference's, without the augmentation embedding
  off = presets.init_variables(presets.build_model(_tiny(0.0)), jax.random.key(0), config)
  assert "emb_augment" not in off["params"]["unet"]


def test_train_step_loss_is_the_augmented_images_loss():
  config = _tiny(0.5)
  config.regulariser.enabled = False   # conditions pass as given, so the loss can be rebuilt
  model = presets.build_model(config)
  state = step_lib.init_state(model, config, jax.random.key(0))
  state = state.replace(params=_open_gains(state.params))
  b = config.train.batch_size
  rng = np.random.default_rng(0)
  x = rng.normal(size=(b, *presets.model_input_shape(config))).astype(np.float32) * 0.5
  cond = rng.normal(size=(b, model.cond_dim)).astype(np.float32)
  _, metrics = jax.jit(step_lib.make_train_step(model, config))(
      state, {"x": x, "cond": cond}, jax.random.key(1))

  key = jax.random.fold_in(jax.random.key(1), 0)
  _, key_loss = jax.random.split(key)
  variables = {"params": state.params, **state.constants}
  shift = augment.max_shift(config.train, x.shape[1])
  losses, n_augmented = [], 0
  for x1, c1, k1 in zip(x, cond, jax.random.split(key_loss, b)):
    xa, label = augment.augment_one(jnp.asarray(x1), jax.random.fold_in(k1, 1), 0.5, shift)
    n_augmented += bool(np.any(label))
    loss, _ = edm2_loss(model, variables, xa[None], c1[None], k1, config,
                        augment_labels=label[None])
    losses.append(float(loss))
  assert n_augmented > 0
  T.assert_close(float(metrics["loss"]), np.mean(losses), 1e-4)


def test_out_of_range_settings_are_refused():
  for field, value in (("augment_p", 1.0), ("augment_p", -0.1), ("augment_shift", 0.0)):
    config = _tiny(0.2)
    config.train[field] = value
    with pytest.raises(UserError, match=f"config.train.{field}"):
      checks.check_train(config)

"""SmallResNet heads (embed in the orbax test, logits + GroupNorm in the ten-crop test),
augmentation properties, the sharded trainer against a 1-device run, orbax."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import tolerances as T
from pso_jax import parallel
from pso_jax.models import cnn
from pso_jax.models.batched_apply import FrozenNetwork
from pso_jax.training import augment, supervised


def _mesh(n, fsdp=1):
  return parallel.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=fsdp)), jax.devices()[:n])


def _spec(head="embed", norm="batch", out_dim=6):
  return cnn.CnnSpec("small_resnet", head, out_dim, image_size=8, channels=1, width=4,
                     blocks=(1, 1), norm=norm)


def test_preprocess_grey_and_rgb():
  images = np.full((2, 4, 4, 1), 255, np.uint8)
  np.testing.assert_allclose(cnn.preprocess(images, _spec()), (1.0 - 0.5) / 0.25)
  rgb = cnn.CnnSpec("resnet50", "embed", 4, image_size=8, channels=1)
  x = np.asarray(cnn.preprocess(images, rgb))  # grey replicated, resized, ImageNet statistics
  assert x.shape == (2, 8, 8, 3)
  np.testing.assert_allclose(x[0, 3, 3], (1 - np.array(cnn.IMAGENET_MEAN)) / cnn.IMAGENET_STD,
                             rtol=1e-5)


def test_augmentation_properties():
  x = jax.random.uniform(jax.random.key(0), (3, 8, 8, 2))
  crop = jax.jit(augment.random_resized_crop, static_argnums=(2, 3, 4))
  same = crop(x, jax.random.key(1), 8, (1.0, 1.0), (1.0, 1.0))
  np.testing.assert_allclose(same, x, atol=1e-5)  # the full-image crop at the same size
  crops = crop(x, jax.random.key(1), 6, (0.3, 0.6), (0.75, 4 / 3))
  assert crops.shape == (3, 6, 6, 2) and float(crops.min()) >= 0 and float(crops.max()) <= 1
  flipped = jax.jit(augment.random_flip)(x, jax.random.key(2))
  for i in range(3):  # each image is itself or its mirror
    assert (np.allclose(flipped[i], x[i]) or np.allclose(flipped[i], x[i, :, ::-1]))
  ten = augment.ten_crop(x, 6)
  assert ten.shape == (10, 3, 6, 6, 2)
  np.testing.assert_array_equal(ten[4], x[:, 1:7, 1:7])
  np.testing.assert_array_equal(ten[9], x[:, 1:7, 1:7][:, :, ::-1])
  np.testing.assert_array_equal(ten[3], x[:, 2:, 2:])


def _fit(mesh, norm):
  spec = _spec("logits", norm, 3)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (32, 8, 8, 1), np.uint8)
  labels = (rng.random((32, 3)) < 0.5).astype(np.float32)

  def sampler(step):
    idx = np.random.default_rng(step).choice(32, 8, replace=False)
    return {"image": images[idx], "labels": labels[idx]}

  def loss_fn(logits, batch):
    return jnp.mean((jax.nn.sigmoid(logits) - batch["labels"]) ** 2), {}

  def inputs_fn(x, key):
    x = augment.random_flip(cnn.to_unit_float(x), key)
    return cnn.normalise(x, spec)

  return supervised.fit(model=cnn.build_cnn(spec), variables=cnn.init_cnn(spec, jax.random.key(0)),
                        optimizer=supervised.make_supervised_optimizer(1e-2, 1e-4), inputs_fn=inputs_fn,
                        loss_fn=loss_fn, sampler=sampler, steps=3, key=jax.random.key(1),
                        mesh=mesh, log_every=1)


def test_sharded_fit_equals_one_device():
  # BatchNorm: the 8-device step must use the statistics of the global batch, like 1 device
  # on a (data 4, fsdp 2) mesh the batch is split over both axes, as on (data 8, fsdp 1)
  one = _fit(_mesh(1), "batch")
  for eight in (_fit(_mesh(8), "batch"), _fit(_mesh(8, fsdp=2), "batch")):
    rtol = T.training_rtol(3, 8 * 8 * 8)  # 3 steps; a gradient sums 8 images x 64 pixels
    T.assert_close([h["loss"] for h in eight.history], np.array([h["loss"] for h in one.history]),
                   rtol)
    T.assert_close_normwise(eight.variables, one.variables, rtol)


def test_orbax_round_trip_and_batched_apply(tmp_path):
  spec = _spec("embed", "batch")
  variables = cnn.init_cnn(spec, jax.random.key(3))
  supervised.save_variables(str(tmp_path / "ckpt"), variables)
  abstract = jax.eval_shape(lambda: cnn.init_cnn(spec, jax.random.key(0)))
  restored = supervised.restore_variables(str(tmp_path / "ckpt"), abstract)
  jax.tree.map(np.testing.assert_array_equal, variables, restored)
  model = cnn.build_cnn(spec)
  net = FrozenNetwork(lambda v, x: model.apply(v, cnn.preprocess(x, spec), train=False), restored,
                      batch_size=4)  # over the 8 local devices: batches of 8
  images = np.random.default_rng(0).integers(0, 256, (11, 8, 8, 1), np.uint8)
  embeddings = net(images)
  assert embeddings.shape == (11, 6) and embeddings.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, rtol=1e-5)  # embed head
  T.assert_close(embeddings, model.apply(variables, cnn.preprocess(images, spec), train=False),
                 T.network_rtol(variables))  # batches of 8 on 8 devices vs one call


def test_ten_crop_prediction_is_the_mean_over_explicit_crops():
  """Classifier.predict (batch split over the 8 devices) against explicit 1-device crops."""
  from pso_jax.evaluate.classifier import Classifier
  spec = cnn.CnnSpec("small_resnet", "logits", 8, image_size=8, channels=1, width=4,
                     blocks=(1,), norm="group")
  variables = cnn.init_cnn(spec, jax.random.key(0))
  images = np.random.default_rng(1).integers(0, 256, (3, 8, 8, 1), np.uint8)
  got = Classifier(spec, variables, ten_crop=True).predict(images)
  big = np.asarray(cnn.resize(cnn.to_unit_float(images), 9))  # Resize(256) -> crops of 224
  model = cnn.build_cnn(spec)
  apply = jax.jit(lambda x: jax.nn.sigmoid(model.apply(variables, cnn.normalise(x, spec),
                                                       train=False)))
  probs = []
  for y, x in ((0, 0), (0, 1), (1, 0), (1, 1), (0, 0)):  # 4 corners; centre of 9 -> offset 0
    crop = big[:, y:y + 8, x:x + 8]
    probs += [apply(crop), apply(np.flip(crop, axis=2).copy())]
  T.assert_close(got, np.mean(probs, axis=0), T.network_rtol(variables))


def test_plateau_matches_torch_reduce_lr_on_plateau():
  torch = pytest.importorskip("torch")
  values = [1.0, 0.9, 0.95, 0.9, 0.91, 0.92, 0.93, 0.94, 0.95, 0.8, 0.8, 0.81, 0.82, 0.83, 0.84,
            0.85, 0.86, 0.87, 0.88, 0.89, 0.7]
  opt = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=1.0)
  sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=0.1, patience=2,
                                                     threshold=1e-4)
  ours = supervised.Plateau(patience=2, factor=0.1)
  for v in values:
    sched.step(v)
    assert ours.update(v) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9)
  assert ours.scale < 1e-2  # the sequence did trigger reductions

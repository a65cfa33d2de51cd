"""Pseudo-conditioning features from a torchvision-format ResNet-50 (`features.kind == "resnet50"`).

As the reference's SwAV extractor (docs/method.md §1.5): [0,1] pixels, grey replicated to RGB,
short side resized to `features.resize`, ImageNet mean/std, global-average-pooled 2048-d output of
the backbone (no projection head), then unit-normalised as every pseudo-conditioning feature here.
"""

import functools

import jax.numpy as jnp
import numpy as np

from pso_jax.errors import UserError
from pso_jax.models import torchvision_nets
from pso_jax.models.batched_apply import FrozenNetwork


@functools.lru_cache(maxsize=2)
def _extractor(weights: str, resize: int, batch_size: int) -> FrozenNetwork:
  model, variables = torchvision_nets.load("resnet50", weights, num_classes=0)

  def features(variables, images):
    f = model.apply(variables, torchvision_nets.imagenet_preprocess(images, resize))
    return f / jnp.maximum(jnp.linalg.norm(f, axis=-1, keepdims=True), 1e-12)

  return FrozenNetwork(features, variables, batch_size=batch_size, desc="ResNet-50 features")


def extract(config, images_uint8: np.ndarray) -> np.ndarray:
  """uint8 [N,H,W,C] -> float32 [N, 2048], each row of unit norm."""
  f = config.data.features
  if not f.weights:
    raise UserError("config.data.features.kind is 'resnet50' but config.data.features.weights is "
                    "empty; point it to a torchvision-format ResNet-50 file (e.g. the SwAV 800-epoch "
                    "checkpoint, see third_party/swav_resnet50/README.md)")
  if f.dim != 2048:
    raise UserError(f"ResNet-50 features are 2048-d but config.data.features.dim is {f.dim}; "
                    "set --config.data.features.dim=2048")
  images_uint8 = np.asarray(images_uint8)
  if images_uint8.ndim != 4 or images_uint8.dtype != np.uint8:
    raise UserError(f"extract wants uint8 [N,H,W,C] images, got {images_uint8.dtype} {images_uint8.shape}")
  return _extractor(f.weights, int(f.resize), int(f.batch_size))(images_uint8)

"""torchvision's ResNet-50 and DenseNet-121 in Flax (NHWC), loading torchvision state dicts.

Module names follow torchvision (`layer1_0/conv1` is `layer1.0.conv1`, `features/denseblock1/
denselayer1/norm1` is `features.denseblock1.denselayer1.norm1`), so weights.py maps the state dict
by name. Batch-norm statistics live in the `batch_stats` collection; `train=False` uses them.
Inputs are NHWC float32 already normalised with `imagenet_preprocess`.
"""

import re
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pso_jax.errors import UserError
from pso_jax.models import weights as weights_lib

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _bn(train: bool, name: str):
  # torch momentum 0.1 == flax momentum 0.9; torch eps 1e-5
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                      use_fast_variance=False, name=name)


def _conv(features, kernel, stride=1, padding=0, name=None):
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((padding, padding), (padding, padding)), use_bias=False, name=name)


def _stem(x, train: bool, conv: str, norm: str, features: int = 64):
  """7x7/2 conv, BN, ReLU, 3x3/2 max pool (both networks start like this)."""
  x = nn.relu(_bn(train, norm)(_conv(features, 7, 2, 3, name=conv)(x)))
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


# ------------------------------------------------------------------------------ ResNet-50
class Bottleneck(nn.Module):
  width: int
  stride: int = 1
  expansion: int = 4

  @nn.compact
  def __call__(self, x, train: bool):
    out = self.width * self.expansion
    h = nn.relu(_bn(train, "bn1")(_conv(self.width, 1, name="conv1")(x)))
    h = nn.relu(_bn(train, "bn2")(_conv(self.width, 3, self.stride, 1, name="conv2")(h)))  # v1.5
    h = _bn(train, "bn3")(_conv(out, 1, name="conv3")(h))
    if self.stride != 1 or x.shape[-1] != out:
      x = _bn(train, "downsample_1")(_conv(out, 1, self.stride, name="downsample_0")(x))
    return nn.relu(x + h)


class ResNet50(nn.Module):
  """`__call__(x, train=False)`: pooled 2048-d features, or `fc` logits when num_classes > 0."""
  num_classes: int = 0
  stage_sizes: Sequence[int] = (3, 4, 6, 3)

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = _stem(x, train, "conv1", "bn1")
    for stage, blocks in enumerate(self.stage_sizes):
      for b in range(blocks):
        stride = 2 if stage > 0 and b == 0 else 1
        x = Bottleneck(64 * 2 ** stage, stride, name=f"layer{stage + 1}_{b}")(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name="fc")(x) if self.num_classes else x


# ------------------------------------------------------------------------------ DenseNet-121
class DenseLayer(nn.Module):
  growth_rate: int
  bn_size: int

  @nn.compact
  def __call__(self, x, train: bool):
    h = _conv(self.bn_size * self.growth_rate, 1, name="conv1")(nn.relu(_bn(train, "norm1")(x)))
    h = _conv(self.growth_rate, 3, 1, 1, name="conv2")(nn.relu(_bn(train, "norm2")(h)))
    return jnp.concatenate([x, h], axis=-1)


class DenseBlock(nn.Module):
  layers: int
  growth_rate: int
  bn_size: int

  @nn.compact
  def __call__(self, x, train: bool):
    for i in range(self.layers):
      x = DenseLayer(self.growth_rate, self.bn_size, name=f"denselayer{i + 1}")(x, train)
    return x


class Transition(nn.Module):
  features: int

  @nn.compact
  def __call__(self, x, train: bool):
    x = _conv(self.features, 1, name="conv")(nn.relu(_bn(train, "norm")(x)))
    return nn.avg_pool(x, (2, 2), strides=(2, 2))


class DenseNetFeatures(nn.Module):
  block_config: Sequence[int]
  growth_rate: int
  init_features: int
  bn_size: int

  @nn.compact
  def __call__(self, x, train: bool):
    x = _stem(x, train, "conv0", "norm0", self.init_features)
    ch = self.init_features
    for i, layers in enumerate(self.block_config):
      x = DenseBlock(layers, self.growth_rate, self.bn_size, name=f"denseblock{i + 1}")(x, train)
      ch += layers * self.growth_rate
      if i < len(self.block_config) - 1:
        ch //= 2
        x = Transition(ch, name=f"transition{i + 1}")(x, train)
    return _bn(train, "norm5")(x)


class DenseNet121(nn.Module):
  """`__call__(x, train=False)`: pooled 1024-d features, or `classifier` logits if num_classes > 0."""
  num_classes: int = 1000
  block_config: Sequence[int] = (6, 12, 24, 16)
  growth_rate: int = 32
  init_features: int = 64
  bn_size: int = 4

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = DenseNetFeatures(self.block_config, self.growth_rate, self.init_features, self.bn_size,
                         name="features")(x, train)
    x = jnp.mean(nn.relu(x), axis=(1, 2))
    return nn.Dense(self.num_classes, name="classifier")(x) if self.num_classes else x


ARCHS = {"resnet50": ResNet50, "densenet121": DenseNet121}


# ------------------------------------------------------------------------------ preprocessing
def imagenet_preprocess(images_uint8, size: int, *, short_side: bool = True):
  """uint8 NHWC (1 or 3 channels) -> float32 NHWC normalised with ImageNet mean/std.

  Grey is replicated to RGB. `short_side`: the short side becomes `size` (aspect kept, as
  torchvision `Resize(size)`); else the image is resized to size x size. Bilinear, antialiased.
  """
  x = jnp.asarray(images_uint8, jnp.float32) / 255.0
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  b, h, w, c = x.shape
  if short_side:
    scale = size / min(h, w)
    new_h, new_w = (size, max(1, round(w * scale))) if h <= w else (max(1, round(h * scale)), size)
  else:
    new_h = new_w = size
  if (new_h, new_w) != (h, w):
    x = jax.image.resize(x, (b, new_h, new_w, c), "bilinear", antialias=True)
  return (x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)


# ------------------------------------------------------------------------------ loading
# Prefixes that wrappers add (DataParallel `module.`, CheXNet's `densenet121.` attribute, SwAV).
_WRAPPER_PREFIXES = ("module.", "densenet121.", "backbone.")
# Heads that checkpoints carry beside the backbone and the port does not use.
_UNUSED_HEADS = {"resnet50": ("projection_head.", "prototypes.")}
# Old torchvision DenseNet files: `denselayer1.norm.1.weight` -> `denselayer1.norm1.weight`.
_OLD_DENSENET = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


def canonical_state_dict(tensors: dict[str, np.ndarray], arch: str, with_head: bool) -> dict:
  """Strips wrapper prefixes, fixes old DenseNet names, drops heads the port does not build."""
  out = {}
  for key, value in tensors.items():
    changed = True
    while changed:
      changed = False
      for p in _WRAPPER_PREFIXES:
        if key.startswith(p):
          key, changed = key[len(p):], True
    m = _OLD_DENSENET.match(key)
    if m:
      key = m.group(1) + m.group(2)
    if key.startswith("classifier.0."):  # CheXNet: Sequential(Linear, Sigmoid)
      key = "classifier." + key[len("classifier.0."):]
    if key.startswith(_UNUSED_HEADS.get(arch, ())):
      continue
    if not with_head and key.startswith(("fc.", "classifier.")):
      continue
    out[key] = value
  return out


def head_size(tensors: dict, arch: str) -> int:
  """Output classes of the file's fc/classifier (0 when it has none)."""
  key = {"resnet50": "fc.bias", "densenet121": "classifier.bias"}[arch]
  return int(tensors[key].shape[0]) if key in tensors else 0


def abstract_variables(model: nn.Module, image_size: int = 64):
  x = jnp.zeros((1, image_size, image_size, 3))
  return jax.eval_shape(lambda: model.init(jax.random.key(0), x))


def load(arch: str, path: str, *, num_classes: int | None = None) -> tuple[nn.Module, dict]:
  """(model, variables) for arch in {resnet50, densenet121} from a torchvision-format `.pth` or
  `.safetensors`, or a file written by `pso_jax.tools.convert`.

  num_classes: None keeps the file's head (if any); 0 drops it (features only); k > 0 requires the
  file's head to have k outputs.
  """
  if arch not in ARCHS:
    raise UserError(f"unknown architecture {arch!r}; choose one of {sorted(ARCHS)}")
  tensors, meta = weights_lib.read_weights(path)
  if weights_lib.is_converted(meta):
    converted = weights_lib.converted_variables(tensors, meta, path, arch)
    file_classes = int(meta.get("num_classes", "0"))
    if num_classes == 0:
      converted = {k: v for k, v in converted.items() if k[1] not in ("fc", "classifier")}
  else:
    tensors = canonical_state_dict(tensors, arch, with_head=num_classes != 0)
    file_classes = head_size(tensors, arch)
    converted = weights_lib.torch_to_flax(tensors, path)
  classes = file_classes if num_classes is None else num_classes
  if classes and file_classes != classes:
    raise UserError(f"{path} has a {file_classes}-way head but {classes} classes were asked for; "
                    "pass num_classes=0 to load the backbone only")
  model = ARCHS[arch](num_classes=classes)
  variables = weights_lib.match_to_template(converted, abstract_variables(model), path, arch)
  return model, jax.tree.map(jnp.asarray, variables)

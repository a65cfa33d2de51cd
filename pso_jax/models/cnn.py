"""Supervised CNNs: the re-identification embedder and the finding classifier.

`SmallResNet` is a compact ResNet (basic blocks, BatchNorm or GroupNorm) for the demo and tiny
configs; `build_cnn` also gives the torchvision-named ResNet-50 / DenseNet-121 ports for the
reference recipe. Every network ends in one of two heads:
  - "embed": a linear projection normalised to unit length (pair similarity = dot product);
  - "logits": a linear layer with one logit per finding.
Inputs go through `preprocess` first: uint8 NHWC -> float32, resized, normalised.
"""

import dataclasses
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

HEADS = ("embed", "logits")
ARCHS = ("small_resnet", "resnet50", "densenet121")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _norm(kind: str, train: bool, channels: int, zero_scale: bool = False):
  scale_init = nn.initializers.zeros if zero_scale else nn.initializers.ones
  if kind == "batch":
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, scale_init=scale_init)
  if kind == "group":
    return nn.GroupNorm(num_groups=min(8, channels), scale_init=scale_init)
  raise ValueError(f"norm must be 'batch' or 'group', got {kind!r}")


class BasicBlock(nn.Module):
  """Two 3x3 convs with a residual connection; the second norm starts at zero (identity block)."""
  width: int
  stride: int
  norm: str

  @nn.compact
  def __call__(self, x, train: bool):
    y = nn.Conv(self.width, (3, 3), self.stride, use_bias=False)(x)
    y = nn.relu(_norm(self.norm, train, self.width)(y))
    y = nn.Conv(self.width, (3, 3), use_bias=False)(y)
    y = _norm(self.norm, train, self.width, zero_scale=True)(y)
    if self.stride != 1 or x.shape[-1] != self.width:
      x = nn.Conv(self.width, (1, 1), self.stride, use_bias=False, name="shortcut")(x)
      x = _norm(self.norm, train, self.width)(x)
    return nn.relu(x + y)


def unit_norm(y):
  """Rows of y scaled to unit L2 norm (the embedding head's output, and means of embeddings)."""
  return y / jnp.sqrt(jnp.sum(y * y, axis=-1, keepdims=True) + 1e-12)


class Head(nn.Module):
  """Pooled features -> unit-norm embedding or logits (always float32)."""
  out_dim: int
  head: str

  @nn.compact
  def __call__(self, features):
    y = nn.Dense(self.out_dim, dtype=jnp.float32)(features.astype(jnp.float32))
    if self.head == "embed":
      y = unit_norm(y)
    return y


class SmallResNet(nn.Module):
  """Stages of basic blocks with widths width * (1, 2, 4, ...), each after the first halving H, W.

  The stem keeps full resolution for small images (<= 64 px) and downsamples by 4 for larger ones,
  so the same family serves 16 px tests and 256 px inputs.
  """
  out_dim: int
  head: str = "logits"
  width: int = 32
  blocks: Sequence[int] = (1, 1, 1)
  norm: str = "batch"

  @nn.compact
  def __call__(self, x, *, train: bool):
    big = x.shape[1] > 64
    x = nn.Conv(self.width, (7, 7) if big else (3, 3), 2 if big else 1, use_bias=False)(x)
    x = nn.relu(_norm(self.norm, train, self.width)(x))
    if big:
      x = nn.max_pool(x, (3, 3), (2, 2), padding="SAME")
    for stage, n in enumerate(self.blocks):
      for i in range(n):
        stride = 2 if stage > 0 and i == 0 else 1
        x = BasicBlock(self.width * 2 ** stage, stride, self.norm)(x, train)
    return Head(self.out_dim, self.head)(jnp.mean(x, axis=(1, 2)))


class PortedNet(nn.Module):
  """A torchvision-named backbone from pso_jax.models.torchvision_nets with our head on top."""
  arch: str
  out_dim: int
  head: str

  @nn.compact
  def __call__(self, x, *, train: bool):
    from pso_jax.models import torchvision_nets  # lazy: only the reference recipe needs it
    backbone_cls = {"resnet50": torchvision_nets.ResNet50,
                    "densenet121": torchvision_nets.DenseNet121}[self.arch]
    features = backbone_cls(num_classes=0, name="backbone")(x, train=train)
    return Head(self.out_dim, self.head)(features)


@dataclasses.dataclass(frozen=True)
class CnnSpec:
  """Everything needed to rebuild a trained network (stored beside its checkpoint)."""
  arch: str
  head: str
  out_dim: int
  image_size: int
  channels: int
  width: int = 32
  blocks: tuple = (1, 1, 1)
  norm: str = "batch"

  def to_dict(self) -> dict:
    return {**dataclasses.asdict(self), "blocks": list(self.blocks)}  # as JSON stores it

  @classmethod
  def from_dict(cls, d: dict) -> "CnnSpec":
    d = dict(d)
    d["blocks"] = tuple(d.get("blocks", (1, 1, 1)))
    return cls(**d)

  @property
  def input_channels(self) -> int:
    # the ported ImageNet nets take RGB; small nets take the data's own channels
    return self.channels if self.arch == "small_resnet" else 3


def spec_from_config(section, *, head: str, out_dim: int, channels: int) -> CnnSpec:
  """CnnSpec from config.reid or config.classifier."""
  if section.arch not in ARCHS:
    raise ValueError(f"arch must be one of {ARCHS}, got {section.arch!r}")
  return CnnSpec(arch=section.arch, head=head, out_dim=int(out_dim),
                 image_size=int(section.image_size), channels=int(channels),
                 width=int(section.width), blocks=tuple(int(b) for b in section.blocks),
                 norm=str(section.norm))


def build_cnn(spec: CnnSpec) -> nn.Module:
  if spec.head not in HEADS:
    raise ValueError(f"head must be one of {HEADS}, got {spec.head!r}")
  if spec.arch == "small_resnet":
    return SmallResNet(spec.out_dim, spec.head, spec.width, spec.blocks, spec.norm)
  return PortedNet(spec.arch, spec.out_dim, spec.head)


def init_cnn(spec: CnnSpec, key, weights: str = "") -> dict:
  """Fresh variables; for the ported nets, `weights` (torchvision-format file) sets the backbone."""
  model = build_cnn(spec)
  x = jnp.zeros((1, spec.image_size, spec.image_size, spec.input_channels), jnp.float32)
  variables = dict(jax.jit(lambda k: model.init(k, x, train=False))(key))
  if weights and spec.arch != "small_resnet":
    from pso_jax.models import torchvision_nets
    _, backbone = torchvision_nets.load(spec.arch, weights, num_classes=0)
    for collection, tree in backbone.items():
      variables[collection] = {**variables[collection], "backbone": tree}
  return variables


def to_unit_float(images) -> jax.Array:
  """uint8 (or already float in [0, 1]) NHWC -> float32 in [0, 1]."""
  if images.dtype == jnp.uint8:
    return images.astype(jnp.float32) / 255.0
  return images.astype(jnp.float32)


def resize(x, size: int):
  if x.shape[1] == size and x.shape[2] == size:
    return x
  return jax.image.resize(x, (x.shape[0], size, size, x.shape[3]), "linear", antialias=True)


def normalise(x, spec: CnnSpec):
  """[0, 1] pixels -> network input: RGB with ImageNet statistics, or grey centred at 0.5."""
  if spec.input_channels == 3:
    if x.shape[-1] == 1:
      x = jnp.repeat(x, 3, axis=-1)
    return (x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)
  return (x - 0.5) / 0.25


def preprocess(images, spec: CnnSpec):
  """Deterministic eval-time input: uint8 NHWC -> resized, normalised float32."""
  return normalise(resize(to_unit_float(images), spec.image_size), spec)

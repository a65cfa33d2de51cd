"""Parity of the Flax ports with their PyTorch originals (random weights, fp32, CPU).

The SD VAE reference is diffusers' AutoencoderKL. torchvision does not install beside this CPU
torch, so ResNet-50 and DenseNet-121 references are defined here with torchvision's module names
and state-dict layout (the loaders see exactly what a torchvision checkpoint holds).
"""

import collections

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
import jax  # noqa: E402
from torch import nn  # noqa: E402

from pso_jax.models import sd_vae, torchvision_nets  # noqa: E402

pytestmark = pytest.mark.torch
REL_TOL = 1e-4  # max |flax - torch| / max |torch|
torch.set_num_threads(1)  # the CPU is shared with other test workers


@pytest.fixture(autouse=True)
def fp32_matmuls():
  with jax.default_matmul_precision("highest"):
    yield


def report(name, flax_out, torch_out):
  diff = float(np.max(np.abs(np.asarray(flax_out) - torch_out)))
  scale = float(np.max(np.abs(torch_out)))
  print(f"[parity] {name}: max abs diff {diff:.3g} (output scale {scale:.3g})")
  assert scale > 1e-3, f"{name}: degenerate reference output"
  assert diff <= REL_TOL * scale, f"{name}: max abs diff {diff} > {REL_TOL} x {scale}"
  return np.asarray(flax_out)


def head(features, dense_params):
  """The Flax model's linear head applied to checked features (one compile per network)."""
  return features @ np.asarray(dense_params["kernel"]) + np.asarray(dense_params["bias"])


def randomise(module: nn.Module, seed: int):
  """Every parameter and batch-norm statistic random (defaults of 1/0 would hide layout bugs)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      if p.ndim == 1:
        p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g) if name.endswith("weight")
                else 0.1 * torch.randn(p.shape, generator=g))
      else:
        fan_in = p[0].numel()
        p.copy_(torch.randn(p.shape, generator=g) / np.sqrt(fan_in))
    for name, b in module.named_buffers():
      if name.endswith("running_mean"):
        b.copy_(0.1 * torch.randn(b.shape, generator=g))
      elif name.endswith("running_var"):
        b.copy_(0.5 + torch.rand(b.shape, generator=g))
  return module.eval()


def nhwc(t):
  return t.permute(0, 2, 3, 1).numpy()


# ----------------------------------------------------------------------------- SD VAE
def small_vae(tmp_path, latent_channels=4):
  vae = diffusers.AutoencoderKL(
      block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
      up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=8,
      latent_channels=latent_channels, sample_size=32)
  randomise(vae, 0)
  folder = str(tmp_path / "vae")
  vae.save_pretrained(folder)
  return vae, folder


def test_sd_vae_encode_decode_parity(tmp_path):
  vae, folder = small_vae(tmp_path)
  model, variables = sd_vae.load_vae(folder)
  x = np.random.default_rng(0).random((2, 32, 32, 3), dtype=np.float32)
  with torch.no_grad():
    post = vae.encode(torch.from_numpy(x).permute(0, 3, 1, 2)).latent_dist
    dec = vae.decode(post.mean).sample
  mean, logvar = model.apply(variables, x, method=model.encode)
  report("sd_vae encode mean", mean, nhwc(post.mean))
  report("sd_vae encode logvar", logvar, nhwc(post.logvar))
  report("sd_vae decode", model.apply(variables, mean, method=model.decode), nhwc(dec))
  # posterior sample: the same noise through diffusers' formula
  keys = jax.random.split(jax.random.key(3), 2)
  sample = sd_vae.sample_posterior(mean, logvar, keys)
  eps = np.stack([np.asarray(jax.random.normal(k, mean.shape[1:])) for k in keys])
  report("sd_vae posterior sample", sample, nhwc(post.mean) + np.exp(0.5 * nhwc(post.logvar)) * eps)


def test_vae_latents_reference_convention(tmp_path):
  """encode_images/decode_latents == diffusers on [0,1] pixels with the per-channel affine map."""
  from conftest import load_config
  from pso_jax.data import vae_latents
  vae, folder = small_vae(tmp_path)
  config = load_config("")
  config.data.latent.vae_dir = folder
  config.data.latent.sample_posterior = False
  config.data.image_size = 32
  images = np.random.default_rng(1).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
  z = vae_latents.encode_images(config, images)
  mean_c = np.asarray(config.data.latent.mean, np.float32)
  std_c = np.asarray(config.data.latent.std, np.float32)
  with torch.no_grad():
    raw = vae.encode(torch.from_numpy(images / np.float32(255)).permute(0, 3, 1, 2)).latent_dist.mean
    ref_z = (nhwc(raw) - mean_c) * (0.5 / std_c)
    report("vae_latents encode_images", z, ref_z)
    dec = vae.decode(torch.from_numpy(nhwc(raw)).permute(0, 3, 1, 2)).sample
  ref_img = np.floor(np.clip(nhwc(dec), 0, 1) * 255)
  out = vae_latents.decode_latents(config, z).astype(np.float32)
  assert out.dtype == np.float32 and out.shape == ref_img.shape
  # uint8 truncation can flip one level where the two floats straddle an integer
  assert np.max(np.abs(out - ref_img)) <= 1 and np.mean(out != ref_img) < 0.01


# ----------------------------------------------------------------------------- ResNet-50
class TorchBottleneck(nn.Module):
  def __init__(self, inplanes, width, stride):
    super().__init__()
    out = width * 4
    self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(width)
    self.conv3 = nn.Conv2d(width, out, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(out)
    self.relu = nn.ReLU()
    self.downsample = None
    if stride != 1 or inplanes != out:
      self.downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride, bias=False),
                                      nn.BatchNorm2d(out))

  def forward(self, x):
    h = self.relu(self.bn1(self.conv1(x)))
    h = self.relu(self.bn2(self.conv2(h)))
    h = self.bn3(self.conv3(h))
    return self.relu(h + (x if self.downsample is None else self.downsample(x)))


class TorchResNet50(nn.Module):
  def __init__(self, num_classes=1000):
    super().__init__()
    self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(64)
    self.relu = nn.ReLU()
    self.maxpool = nn.MaxPool2d(3, 2, 1)
    inplanes = 64
    for i, blocks in enumerate((3, 4, 6, 3)):
      width = 64 * 2 ** i
      layers = []
      for b in range(blocks):
        layers.append(TorchBottleneck(inplanes, width, 2 if i > 0 and b == 0 else 1))
        inplanes = width * 4
      setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
    self.avgpool = nn.AdaptiveAvgPool2d(1)
    self.fc = nn.Linear(2048, num_classes)

  def features(self, x):
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    for i in range(4):
      x = getattr(self, f"layer{i + 1}")(x)
    return self.avgpool(x).flatten(1)

  def forward(self, x):
    return self.fc(self.features(x))


def test_resnet50_parity_pth(tmp_path):
  """Through the public feature extractor: uint8 -> ImageNet normalisation -> unit-norm 2048-d."""
  from conftest import load_config
  from pso_jax.data import resnet_features
  net = randomise(TorchResNet50(num_classes=10), 1)
  path = str(tmp_path / "resnet50.pth")
  torch.save(net.state_dict(), path)
  images = np.random.default_rng(2).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
  x = (images / np.float32(255) - np.float32(torchvision_nets.IMAGENET_MEAN)) / np.float32(
      torchvision_nets.IMAGENET_STD)
  with torch.no_grad():
    t = torch.from_numpy(x.astype(np.float32)).permute(0, 3, 1, 2)
    ref_feat, ref_logits = net.features(t).numpy(), net(t).numpy()
  config = load_config("")
  config.data.features.weights = path
  config.data.features.resize = 64  # the images' own size: no resampling in this comparison
  ref_norm = np.linalg.norm(ref_feat, axis=1, keepdims=True)
  feat = report("resnet50 unit features", resnet_features.extract(config, images), ref_feat / ref_norm)
  model, variables = torchvision_nets.load("resnet50", path)  # with the file's 10-way fc
  assert model.num_classes == 10
  report("resnet50 logits", head(feat * ref_norm, variables["params"]["fc"]), ref_logits)


# ----------------------------------------------------------------------------- DenseNet-121
class TorchDenseLayer(nn.Module):
  def __init__(self, inp, growth=32, bn_size=4):
    super().__init__()
    self.norm1 = nn.BatchNorm2d(inp)
    self.relu1 = nn.ReLU()
    self.conv1 = nn.Conv2d(inp, bn_size * growth, 1, bias=False)
    self.norm2 = nn.BatchNorm2d(bn_size * growth)
    self.relu2 = nn.ReLU()
    self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, 1, 1, bias=False)

  def forward(self, x):
    h = self.conv1(self.relu1(self.norm1(x)))
    return torch.cat([x, self.conv2(self.relu2(self.norm2(h)))], 1)


class TorchDenseNet121(nn.Module):
  def __init__(self, num_classes=1000):
    super().__init__()
    parts = [("conv0", nn.Conv2d(3, 64, 7, 2, 3, bias=False)), ("norm0", nn.BatchNorm2d(64)),
             ("relu0", nn.ReLU()), ("pool0", nn.MaxPool2d(3, 2, 1))]
    ch = 64
    for i, n in enumerate((6, 12, 24, 16)):
      block = nn.Sequential(collections.OrderedDict(
          (f"denselayer{j + 1}", TorchDenseLayer(ch + j * 32)) for j in range(n)))
      parts.append((f"denseblock{i + 1}", block))
      ch += n * 32
      if i < 3:
        parts.append((f"transition{i + 1}", nn.Sequential(collections.OrderedDict(
            [("norm", nn.BatchNorm2d(ch)), ("relu", nn.ReLU()),
             ("conv", nn.Conv2d(ch, ch // 2, 1, bias=False)), ("pool", nn.AvgPool2d(2, 2))]))))
        ch //= 2
    parts.append(("norm5", nn.BatchNorm2d(ch)))
    self.features = nn.Sequential(collections.OrderedDict(parts))
    self.classifier = nn.Linear(ch, num_classes)

  def pooled(self, x):
    return torch.relu(self.features(x)).mean((2, 3))

  def forward(self, x):
    return self.classifier(self.pooled(x))


def test_densenet121_parity_safetensors(tmp_path):
  from safetensors.torch import save_file
  net = randomise(TorchDenseNet121(num_classes=8), 2)
  path = str(tmp_path / "densenet121.safetensors")
  save_file({k: v.contiguous() for k, v in net.state_dict().items()}, path)
  x = np.random.default_rng(3).standard_normal((2, 64, 64, 3)).astype(np.float32)
  with torch.no_grad():
    t = torch.from_numpy(x).permute(0, 3, 1, 2)
    ref_pooled, ref_logits = net.pooled(t).numpy(), net(t).numpy()
  feat_model, feat_vars = torchvision_nets.load("densenet121", path, num_classes=0)
  feat = report("densenet121 1024-d features", jax.jit(feat_model.apply)(feat_vars, x), ref_pooled)
  model, variables = torchvision_nets.load("densenet121", path)
  assert model.num_classes == 8
  report("densenet121 logits", head(feat, variables["params"]["classifier"]), ref_logits)

"""Random-weight stand-ins in the original formats, for dry runs of the real-data path and tests.

  python -m pso_jax.tools.random_weights vae DST_FOLDER [--channels=8,8,16,16] [--groups=4]
  python -m pso_jax.tools.random_weights {resnet50,densenet121} DST.safetensors

The files are what the real downloads look like (a diffusers folder; a torchvision state dict), so
`--config.data.latent.vae_dir=DST_FOLDER` etc. exercise exactly the loading code the real weights go
through. They are not pretrained: latents and features carry no meaning.
"""

import argparse
import json
import os
import sys

import numpy as np

from pso_jax import io_utils
from pso_jax.models import sd_vae, torchvision_nets, weights


def random_state_dict(template, seed: int) -> dict[str, np.ndarray]:
  """PyTorch-layout tensors for a Flax variable template: He-scaled kernels, norm scales near 1,
  small biases and running means, running variances in [0.5, 1.5]."""
  rng = np.random.default_rng(seed)
  flat = {}
  for path, spec in weights.flatten(template).items():
    shape, leaf = tuple(spec.shape), path[-1]
    if leaf == "kernel":
      fan_in = int(np.prod(shape[:-1]))
      value = rng.standard_normal(shape) * np.sqrt(1.0 / fan_in)
    elif leaf == "scale":
      value = 1.0 + 0.1 * rng.standard_normal(shape)
    elif leaf == "var":
      value = 0.5 + rng.random(shape)
    else:  # bias, mean
      value = 0.05 * rng.standard_normal(shape)
    flat[path] = value.astype(np.float32)
  return weights.flax_to_torch(weights.unflatten(flat))


def write_vae_folder(folder: str, block_out_channels=(8, 8, 16, 16), norm_num_groups: int = 4,
                     latent_channels: int = 4, layers_per_block: int = 1, seed: int = 0) -> dict:
  """A diffusers AutoencoderKL folder (config.json + diffusion_pytorch_model.safetensors)."""
  from safetensors.numpy import save
  n = len(block_out_channels)
  cfg = {"_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3,
         "block_out_channels": list(block_out_channels), "layers_per_block": layers_per_block,
         "latent_channels": latent_channels, "norm_num_groups": norm_num_groups,
         "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
         "act_fn": "silu", "scaling_factor": 0.18215}
  model = sd_vae.AutoencoderKL(sd_vae.VAEConfig.from_diffusers(cfg))
  state = random_state_dict(sd_vae.abstract_variables(model), seed)
  io_utils.write_bytes(os.path.join(folder, sd_vae.WEIGHTS_FILE), save(state))
  io_utils.write_json(os.path.join(folder, "config.json"), cfg)
  return state


def write_torchvision(arch: str, path: str, num_classes: int = 1000, seed: int = 0) -> dict:
  """A torchvision-format state dict (.safetensors) of ResNet-50 or DenseNet-121."""
  from safetensors.numpy import save
  model = torchvision_nets.ARCHS[arch](num_classes=num_classes)
  state = random_state_dict(torchvision_nets.abstract_variables(model), seed)
  io_utils.write_bytes(path, save(state))
  return state


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m pso_jax.tools.random_weights", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("kind", choices=("vae", *torchvision_nets.ARCHS))
  parser.add_argument("dst")
  parser.add_argument("--channels", default="8,8,16,16", help="vae block_out_channels")
  parser.add_argument("--groups", type=int, default=4, help="vae norm_num_groups")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  if args.kind == "vae":
    channels = tuple(int(c) for c in args.channels.split(","))
    write_vae_folder(args.dst, channels, args.groups, seed=args.seed)
  else:
    write_torchvision(args.kind, args.dst, seed=args.seed)
  print(f"wrote random {args.kind} weights to {args.dst}: {json.dumps(args.__dict__)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

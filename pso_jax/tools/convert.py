"""Converts external weights to Flax-ready `.safetensors` (keys are Flax paths, HWIO kernels).

  python -m pso_jax.tools.convert vae         SRC_DIFFUSERS_FOLDER  DST.safetensors
  python -m pso_jax.tools.convert resnet50    SRC.pth|.safetensors  DST.safetensors [--features_only]
  python -m pso_jax.tools.convert densenet121 SRC.pth|.safetensors  DST.safetensors [--features_only]

The loaders accept the original files directly too; converting once checks every tensor (name,
shape, dtype) up front and makes later loads need neither torch nor the name mapping.
"""

import argparse
import dataclasses
import json
import sys

import numpy as np

from pso_jax.errors import UserError
from pso_jax.models import sd_vae, torchvision_nets, weights


def convert(kind: str, src: str, dst: str, *, features_only: bool = False) -> dict:
  """Writes dst; returns a summary (arch, tensor count, parameter count)."""
  if not dst.endswith(".safetensors"):
    raise UserError(f"destination {dst!r} must end in .safetensors")
  if kind == "vae":
    model, variables = sd_vae.load_vae(src)
    meta = {"config": json.dumps(dataclasses.asdict(model.config))}
    arch = sd_vae.ARCH
  elif kind in torchvision_nets.ARCHS:
    model, variables = torchvision_nets.load(kind, src, num_classes=0 if features_only else None)
    meta = {"num_classes": str(model.num_classes)}
    arch = kind
  else:
    raise UserError(f"unknown network {kind!r}; choose vae, resnet50 or densenet121")
  weights.write_converted(dst, variables, arch, meta)
  flat = weights.flatten(variables)
  return {"arch": arch, "tensors": len(flat),
          "parameters": int(sum(np.size(v) for k, v in flat.items() if k[0] == "params")),
          "dst": dst}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m pso_jax.tools.convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("kind", choices=("vae", *torchvision_nets.ARCHS))
  parser.add_argument("src")
  parser.add_argument("dst")
  parser.add_argument("--features_only", action="store_true", help="drop the fc/classifier head")
  args = parser.parse_args(argv)
  try:
    summary = convert(args.kind, args.src, args.dst, features_only=args.features_only)
  except UserError as e:
    print(f"pso_jax.tools.convert: error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {summary['dst']}: {summary['arch']}, {summary['tensors']} tensors, "
        f"{summary['parameters']:,} parameters")
  return 0


if __name__ == "__main__":
  sys.exit(main())

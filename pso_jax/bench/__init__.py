"""Benchmarks: `python -m pso_jax.bench {data,train,audit,sample,cnn,vae}`."""

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def cxr_config(variant: str = ""):
  """configs/cxr.py's get_config(variant), loaded from the checkout (configs/ is no package)."""
  spec = importlib.util.spec_from_file_location("cxr_config", os.path.join(ROOT, "configs", "cxr.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)

"""Progress bars on process 0 only (tqdm); silent elsewhere and when PSO_JAX_NO_PROGRESS is set."""

import os

import jax
from tqdm.auto import tqdm


def bar(total=None, desc: str = "", unit: str = "it", **kwargs):
  disable = jax.process_index() != 0 or bool(os.environ.get("PSO_JAX_NO_PROGRESS"))
  return tqdm(total=total, desc=desc, unit=unit, disable=disable, dynamic_ncols=True,
              mininterval=1.0, **kwargs)

"""The stages of a run, in pipeline order, and where each one's code lives.

Each stage is `run(config, workdir, **options) -> dict` (a summary), reads the previous stages'
files under the workdir and writes its own, and returns at once when its outputs are complete.
"""

import dataclasses
import importlib

from pso_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Stage:
  mode: str
  module: str
  what: str


STAGES = (
    Stage("prepare", "pso_jax.stages.prepare", "phantom/filelist -> ArrayRecord splits + features"),
    Stage("train", "pso_jax.stages.train", "EDM2 diffusion model"),
    Stage("train_reid", "pso_jax.stages.train_reid", "re-identification embedder + threshold"),
    Stage("train_classifier", "pso_jax.stages.train_classifier", "finding classifier on real data"),
    Stage("sample", "pso_jax.stages.sample", "preview samples from the trained model"),
    Stage("select", "pso_jax.stages.select", "candidates -> re-id rejection -> synthetic set"),
    Stage("audit", "pso_jax.stages.audit", "all-pairs PSO audit of the released set"),
    Stage("evaluate", "pso_jax.stages.evaluate", "downstream AUROC and diversity"),
    Stage("report", "pso_jax.stages.report", "report.html + results.json"),
)
MODES = tuple(s.mode for s in STAGES) + ("pipeline",)


def get_stage(mode: str):
  """The stage's `run` function (a UserError for an unknown mode)."""
  stage = {s.mode: s for s in STAGES}.get(mode)
  if stage is None:
    raise UserError(f"unknown --mode={mode!r}; choose one of {', '.join(MODES)}")
  return importlib.import_module(stage.module).run

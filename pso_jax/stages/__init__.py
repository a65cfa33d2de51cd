"""The stages of a run, in pipeline order: the one table of what each reads and writes.

Each stage is `run(config, workdir, **options) -> dict` (a summary) in its own module, imported on
first use (`get_stage`): it reads the outputs of its `inputs` stages under the workdir, calls
libraries, and writes its own outputs into its `folder`.

One "done" protocol for every stage: the result file (JSON, what `run` returns) is written, then
the COMPLETE marker, last, in the stage's folder (`finish`); a rerun finds the marker and returns
the stored result at once (`done`). A stage without a marker (the report) is rerun every time.
"""

import dataclasses
import importlib
import os

from pso_jax import io_utils
from pso_jax.data import dataset, release
from pso_jax.diffusion import denoiser
from pso_jax.errors import UserError
from pso_jax.evaluate import classifier, synthetic_utility
from pso_jax.privacy import audit, power, reid

COMPLETE = io_utils.COMPLETE


@dataclasses.dataclass(frozen=True)
class Stage:
  mode: str           # the --mode that runs it
  module: str         # where its `run` lives (imported lazily)
  folder: str         # its output folder under the workdir ("": the workdir itself)
  result: str         # its result file in `folder` (JSON): what `run` returns once done
  inputs: tuple       # the stages whose outputs it reads
  what: str           # one line
  marker: bool = True  # False: no COMPLETE marker, the stage is redone on every run
  in_pipeline: bool = True  # False: run only by its own --mode

  @property
  def result_path(self) -> str:
    """The result file relative to the workdir."""
    return os.path.join(self.folder, self.result)


STAGES = (
    Stage("prepare", "pso_jax.stages.prepare", dataset.SUBDIR, dataset.CARD_FILE, (),
          "phantom/filelist -> ArrayRecord splits + features"),
    Stage("train", "pso_jax.stages.train", denoiser.SUBDIR, COMPLETE, ("prepare",),
          "EDM2 diffusion model"),
    Stage("train_reid", "pso_jax.stages.train_reid", reid.SUBDIR, reid.RESULT_FILE, ("prepare",),
          "re-identification embedder + threshold"),
    Stage("train_classifier", "pso_jax.stages.train_classifier", classifier.SUBDIR,
          classifier.RESULT_FILE, ("prepare",), "finding classifier on real data"),
    Stage("sample", "pso_jax.stages.sample", "samples", "summary.json", ("prepare", "train"),
          "preview samples from the trained model"),
    Stage("select", "pso_jax.stages.select", release.SUBDIR, "summary.json",
          ("prepare", "train", "train_reid", "train_classifier"),
          "candidates -> re-id rejection -> synthetic set (in release/; records stay here)"),
    Stage("audit", "pso_jax.stages.audit", audit.SUBDIR, audit.RESULT_FILE,
          ("prepare", "train_reid", "select"),
          "independent attackers' PSO and DCR audit of the released set, one verdict (into "
          "release/card.*)"),
    Stage("audit_power", "pso_jax.stages.audit_power", power.SUBDIR, power.RESULT_FILE,
          ("prepare", "train_reid", "select", "audit"),
          "the audit's false-alarm and detection rates on null and leaking releases",
          in_pipeline=False),
    # the real-data classifier is trained here too when its stage has not run
    Stage("evaluate", "pso_jax.stages.evaluate", synthetic_utility.SUBDIR,
          synthetic_utility.RESULT_FILE, ("prepare", "train_classifier", "select"),
          "downstream AUROC and diversity"),
    Stage("report", "pso_jax.stages.report", "", "results.json",
          ("prepare", "train", "train_reid", "train_classifier", "select", "audit", "evaluate"),
          "report.html + results.json", marker=False),
    # runs its own sub-pipelines (shared stages once, then each method's) in sub-workdirs
    Stage("compare", "pso_jax.stages.compare", "", "compare.json", (),
          "the paper's comparison: every method trained, released with and without selection, "
          "audited and evaluated; compare.html + compare.json", marker=False, in_pipeline=False),
)
MODES = tuple(s.mode for s in STAGES) + ("pipeline",)
PIPELINE = tuple(s.mode for s in STAGES if s.in_pipeline)  # what --mode=pipeline runs
_BY_MODE = {s.mode: s for s in STAGES}


def stage(mode: str) -> Stage:
  """The table's row of `mode`."""
  found = _BY_MODE.get(mode)
  if found is None:
    raise UserError(f"unknown --mode={mode!r}; choose one of {', '.join(MODES)}")
  return found


def output_dir(workdir: str, mode: str) -> str:
  return os.path.join(workdir, stage(mode).folder)


def done(workdir: str, mode: str):
  """The stage's stored result when it finished in this workdir (its marker exists), else None."""
  s = stage(mode)
  return io_utils.finished_result(output_dir(workdir, mode), s.result) if s.marker else None


def finish(workdir: str, mode: str, result) -> None:
  """Process 0 writes the stage's result file (unless result is None: the stage wrote it), then
  its COMPLETE marker last."""
  s = stage(mode)
  if s.marker:
    io_utils.finish_stage(output_dir(workdir, mode), s.result, result)
  elif result is not None:
    import jax
    if jax.process_index() == 0:
      io_utils.write_json(os.path.join(output_dir(workdir, mode), s.result), result)


def missing_inputs(workdir: str, mode: str) -> list:
  """'stage (what: result file)' for each input stage of `mode` not finished in the workdir."""
  missing = []
  for name in stage(mode).inputs:
    s = stage(name)
    if not os.path.exists(os.path.join(output_dir(workdir, name), COMPLETE if s.marker else s.result)):
      missing.append(f"{name} ({s.what}: {s.result_path})")
  return missing


def get_stage(mode: str):
  """The stage's `run` function (a UserError for an unknown mode)."""
  return importlib.import_module(stage(mode).module).run

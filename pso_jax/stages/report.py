"""The `report` stage: one page a person reads first, and the same numbers as results.json.

It only reads what the earlier stages wrote (it trains and samples nothing), so it is cheap and
always rewritten (no COMPLETE marker). `--compare=OTHER_WORKDIR` adds the other run's headline
numbers side by side (e.g. with and without the diversity regulariser) and the config fields that
differ. The page, figures and numbers are `report.results_page`'s.
"""

import os

import jax

from pso_jax import io_utils, stages
from pso_jax.errors import UserError
from pso_jax.report import results_page


def check_inputs(workdir: str) -> None:
  missing = stages.missing_inputs(workdir, "report")
  if missing:
    raise UserError(f"the report needs the outputs of every stage; missing in {workdir!r}: "
                    + "; ".join(missing) + ". Run --mode=pipeline (or the missing --mode=...) first")


def run(config, workdir: str, compare: str | None = None, **_) -> dict:
  check_inputs(workdir)
  result_file = stages.stage("report").result
  other = None
  if compare:
    path = os.path.join(compare, result_file)
    if not os.path.exists(path):
      raise UserError(f"--compare={compare!r} has no {result_file}; run --mode=report there first")
    other = (io_utils.read_json(path), compare)
  r = results_page.collect(workdir, {section: stages.stage(mode).result_path
                                     for section, mode in results_page.SECTIONS.items()})
  if jax.process_index() == 0:
    os.makedirs(os.path.join(workdir, results_page.SUBDIR), exist_ok=True)
    fig = lambda name: os.path.join(workdir, results_page.FIG[name])
    results_page.loss_figure(os.path.join(stages.output_dir(workdir, "train"), "metrics.jsonl"),
                             fig("loss"))
    results_page.auroc_figure(r, fig("auroc"))
    results_page.samples_figure(workdir, fig("samples"), int(config.report.grid))
  stages.finish(workdir, "report", r)  # results.json (no marker: the report is always redone)
  if jax.process_index() == 0:
    io_utils.write_text(os.path.join(workdir, results_page.REPORT_FILE),
                        results_page.render(r, other, audit_dir=stages.stage("audit").folder))
  return r["headline"]

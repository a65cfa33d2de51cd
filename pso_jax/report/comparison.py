"""The paper's comparison (`--mode=compare`): its methods, each one's config and folder, the release
of a generator with selection off, and the rows of compare.json read back from what each method's
stages wrote.

A method is a named set of config overrides on top of the run's config (`METHODS`, the one table).
Every method shares the stages that do not depend on the generator, run once:

  <workdir>/shared/              prepare, train_reid, train_classifier, and the audit's reid
                                 attacker (audit/attacker_reid/) when config.audit.attackers has it
  <workdir>/methods/<name>/      a pipeline workdir of the method: train, select, audit, evaluate,
                                 report; data/, reid/, classifier/, audit/attacker_reid/ are links
                                 into shared/
  <workdir>/unselected/<name>/   the method's generator with selection off (one sample per training
                                 image, nothing rejected: `release_unselected`), audited and
                                 evaluated; diffusion/ links to the method's
  <workdir>/sweep/<name>/g<g>/   the guidance sweep: unselected releases of config.compare.
                                 sweep_method at each config.compare.guidance, evaluated
  <workdir>/compare.json, compare.html, compare/*.png   (report.compare_page)

Every stage keeps its own done protocol in its own workdir, so a killed comparison resumes where it
stopped.
"""

import dataclasses
import json
import math
import os
import time

import jax
import numpy as np

from pso_jax import io_utils, workdir as workdir_lib
from pso_jax.errors import UserError, require
from pso_jax.report.results_page import dig

SHARED, METHODS_DIR, UNSELECTED_DIR, SWEEP_DIR = "shared", "methods", "unselected", "sweep"
RESULT_FILE, PAGE_FILE, FIG_DIR = "compare.json", "compare.html", "compare"
SHARED_MODES = ("prepare", "train_reid", "train_classifier")  # no generator in them: run once
METHOD_MODES = ("train", "select", "audit", "evaluate", "report")  # per method (no preview grid)
UNSELECTED_MODES = ("audit", "evaluate", "report")  # after release_unselected
SWEEP_MODES = ("evaluate",)
LINKED = ("data", "reid", "classifier")  # the shared stages' folders (stage table: prepare, ...)
ATTACKER_TIMING = "attacker_reid"       # timings.jsonl name of the shared attacker's training
UNSELECTED_TIMING = "release_unselected"
# config sections a method may not change: the shared stages' outputs depend on them
SHARED_SECTIONS = ("seed", "data", "reid", "classifier", "audit", "evaluate", "mesh")
REFERENCE_GUIDANCE = 1.2  # the reference's DiADM + DSE (generate_dse.sh)
# the reference's autoguidance guide saw 8,388 of the main model's 83,886 kimg
AUTOGUIDANCE_FRACTION = 0.1


@dataclasses.dataclass(frozen=True)
class Method:
  name: str
  title: str
  overrides: tuple          # ((dotted config field, value), ...) on top of the run's config
  what: str
  guided_by: str = ""       # the method whose model guides this one (sample.guide=separate)
  autoguidance: bool = False  # guided by an early checkpoint of its own training
  shows: tuple = ()         # fields it takes from the run's config, listed beside its overrides


_REFERENCE = (("regulariser.enabled", False),  # no condition dropout, jitter or k-anonymity
              ("select.cond_k", 0),            # candidates conditioned on their own image
              ("sample.ema_std", 0.0),         # the reference sampled the raw weights
              ("model.dropout", -1.0),         # the preset's dropout (xs: none)
              ("train.augment_p", 0.0))        # no training augmentation
_SEPARATE = (("sample.guide", "separate"), ("sample.guidance", REFERENCE_GUIDANCE))

METHODS = (
    Method("edm2_uncond", "EDM2 unconditional",
           (("model.cond", "uncond"),) + _REFERENCE
           + (("sample.guidance", 1.0), ("select.guidance_step", 0.0)),
           "no condition; unguided (guiding a model by itself changes nothing; retries keep g = 1); "
           "raw weights"),
    Method("edm2_class", "EDM2 class-conditional",
           (("model.cond", "class"),) + _REFERENCE + _SEPARATE,
           f"conditioned on the 8 findings; guided by the unconditional model at g = "
           f"{REFERENCE_GUIDANCE}; raw weights", guided_by="edm2_uncond"),
    Method("diadm", "DiADM (reference)",
           (("model.cond", "pseudo"),) + _REFERENCE + _SEPARATE,
           f"pseudo-conditioned, no condition dropout; guided by the separately trained "
           f"unconditional model at g = {REFERENCE_GUIDANCE}; raw weights",
           guided_by="edm2_uncond"),
    Method("diadm_autoguidance", "DiADM + autoguidance",
           (("model.cond", "pseudo"),) + _REFERENCE
           + (("sample.guide", "autoguidance"), ("sample.guidance", REFERENCE_GUIDANCE)),
           f"pseudo-conditioned, no condition dropout; guided by its own checkpoint at about "
           f"{AUTOGUIDANCE_FRACTION:.0%} of training (config.compare.autoguidance_step) at g = "
           f"{REFERENCE_GUIDANCE}; raw weights", autoguidance=True),
    Method("ours", "Ours (the config's recipe)", (),
           "the config's own settings: its condition (pseudo-features or findings), the diversity "
           "regulariser (condition dropout, jitter, k-anonymity when configured), dropout and "
           "augmentation when configured, guided by the null condition, EMA weights",
           shows=("model.cond", "model.dropout", "regulariser.cond_dropout", "regulariser.kanon_k",
                  "train.augment_p", "sample.guidance", "select.n_candidates")),
)
_BY_NAME = {m.name: m for m in METHODS}
UNCONDITIONAL = "edm2_uncond"
RELEASES = ("selected", "unselected")


# ----------------------------------------------------------------------------- folders

def shared_dir(workdir: str) -> str:
  return os.path.join(workdir, SHARED)


def method_dir(workdir: str, name: str) -> str:
  return os.path.join(workdir, METHODS_DIR, name)


def unselected_dir(workdir: str, name: str) -> str:
  return os.path.join(workdir, UNSELECTED_DIR, name)


def sweep_dir(workdir: str, name: str, guidance: float) -> str:
  return os.path.join(workdir, SWEEP_DIR, name, f"g{guidance:g}")


def _link(target: str, link: str) -> None:
  """A relative symlink `link` -> `target` (kept when it already points there)."""
  rel = os.path.relpath(target, os.path.dirname(os.path.abspath(link)))
  if os.path.islink(link):
    if os.readlink(link) == rel:
      return
    os.remove(link)
  elif os.path.exists(link):
    raise UserError(f"{link!r} exists and is not a link to {target!r}: the comparison's folders "
                    "were changed by hand; delete it (or use a new --workdir) and rerun")
  os.makedirs(os.path.dirname(os.path.abspath(link)), exist_ok=True)
  os.symlink(rel, link)


def link_shared(workdir: str, target_dir: str, attacker_dir: str | None,
                diffusion_of: str | None = None) -> None:
  """Links the shared stages' folders (and the reid attacker, and for releases of another
  workdir's generator its diffusion/ folder) into `target_dir` (process 0)."""
  if jax.process_index() != 0:
    return
  for folder in LINKED:
    _link(os.path.join(shared_dir(workdir), folder), os.path.join(target_dir, folder))
  if attacker_dir is not None:
    from pso_jax.privacy import attackers, audit
    _link(attacker_dir, os.path.join(target_dir, audit.SUBDIR, attackers.MODEL_SUBDIR))
  if diffusion_of is not None:
    from pso_jax.diffusion import denoiser
    _link(os.path.join(diffusion_of, denoiser.SUBDIR), os.path.join(target_dir, denoiser.SUBDIR))


# ----------------------------------------------------------------------------- configs

def autoguidance_step(config) -> int:
  """The autoguidance guide's checkpoint: config.compare.autoguidance_step, or (< 0) the first
  checkpoint the train stage saves at or after AUTOGUIDANCE_FRACTION of training."""
  step = int(config.compare.autoguidance_step)
  if step >= 0:
    return step
  from pso_jax.diffusion import sampling
  total, interval = sampling.checkpoint_steps(config)
  return max(interval, math.ceil(AUTOGUIDANCE_FRACTION * total / interval) * interval)


def pipeline_config(config):
  """The run's config without its compare section: what every sub-workdir holds."""
  c = config.copy_and_resolve_references()
  with c.unlocked():
    if "compare" in c:
      del c["compare"]
  return c


def guide_of(method: Method, config) -> str:
  """The method whose model guides `method`: its own `guided_by`, or, for a method that keeps the
  config's guide when that is a separate model the config does not name (the :reference
  variant's), the unconditional method."""
  if method.guided_by:
    return method.guided_by
  s, keeps = config.sample, all(f != "sample.guide" for f, _ in method.overrides)
  unnamed = keeps and s.guide == "separate" and not s.guide_workdir
  return UNCONDITIONAL if unnamed and method.name != UNCONDITIONAL else ""


def method_config(config, method: Method, workdir: str):
  c = pipeline_config(config)
  for field, value in method.overrides:
    workdir_lib.set_config_field(c, field, value)
  guide = guide_of(method, config)
  if guide:
    c.sample.guide_workdir = os.path.abspath(method_dir(workdir, guide))
  if method.autoguidance:
    c.sample.guide_step = autoguidance_step(config)
  return c


def overrides(method: Method, config, sub_config) -> dict:
  """The fields `method` sets on the run's `config` and those it shows, with their values in its
  `sub_config` (the guide's folder and step included)."""
  fields = [f for f, _ in method.overrides] + list(method.shows)
  fields += ["sample.guide_workdir"] * bool(guide_of(method, config))
  fields += ["sample.guide_step"] * method.autoguidance
  return {f: workdir_lib.config_field(sub_config, f) for f in fields}


def sweep_config(config, method: Method, workdir: str, guidance: float):
  c = method_config(config, method, workdir)
  c.sample.guidance = float(guidance)
  return c


def methods(config) -> list:
  """The configured methods in run order: a guide's method before the methods it guides."""
  names = tuple(config.compare.methods)
  unknown = [n for n in names if n not in _BY_NAME]
  require(names and not unknown and len(set(names)) == len(names),
          f"config.compare.methods={names} must name each method once, from "
          f"{tuple(_BY_NAME)}" + (f" ({', '.join(map(repr, unknown))} unknown)" if unknown else ""))
  for n in names:
    guide = guide_of(_BY_NAME[n], config)
    require(not guide or guide in names,
            f"config.compare.methods has {n!r} but not {guide!r}, whose model guides it: add "
            f"{guide!r} to config.compare.methods")
  order = []
  for n in names:  # config order, a guide moved before the first method it guides
    guide = guide_of(_BY_NAME[n], config)
    order += [g for g in (guide, n) if g and g not in order]
  return [_BY_NAME[n] for n in order]


def sweep_method(config):
  """The method whose guidance is swept, or None when config.compare.guidance is empty."""
  values = tuple(config.compare.guidance)
  if not values:
    return None
  require(all(isinstance(g, (int, float)) and not isinstance(g, bool) and math.isfinite(g)
              and g > 0 for g in values) and len(set(values)) == len(values),
          f"config.compare.guidance={values} must hold distinct positive guidance values, e.g. "
          "(0.7, 1.0, 1.2, 1.5, 1.7), or () for no sweep")
  name = str(config.compare.sweep_method)
  require(name in tuple(config.compare.methods),
          f"config.compare.sweep_method={name!r} must be one of config.compare.methods="
          f"{tuple(config.compare.methods)}")
  return _BY_NAME[name]


def configs_to_check(config, workdir: str = "<workdir>"):
  """(what, config, modes) for every sub-run of the comparison: each method's stages, its
  unselected release (sampled at its guidance like a preview) and each sweep point. A method may
  change no section that the shared stages read."""
  c = config.compare
  require(isinstance(c.unselected, bool), f"config.compare.unselected={c.unselected!r} must be "
          "True or False")
  if int(c.autoguidance_step) >= 0:
    require(isinstance(c.autoguidance_step, int), "config.compare.autoguidance_step must be an "
            "integer (a checkpoint step; < 0: the first checkpoint after a tenth of training)")
  base = pipeline_config(config).to_dict()
  out = [("the shared stages", pipeline_config(config), SHARED_MODES)]
  for m in methods(config):
    mc = method_config(config, m, workdir)
    changed = [s for s in SHARED_SECTIONS if mc.to_dict().get(s) != base.get(s)]
    if changed:
      raise UserError(f"compare method {m.name!r} changes config sections the shared stages read "
                      f"({', '.join(changed)}); a method may change the generator only")
    modes = METHOD_MODES + (("sample",) if c.unselected else ())
    out.append((f"method {m.name!r} ({m.title})", mc, modes))
  swept = sweep_method(config)
  for g in tuple(c.guidance) if swept else ():
    out.append((f"the guidance sweep of {swept.name!r} at g = {g:g}",
                sweep_config(config, swept, workdir, g), ("sample",) + SWEEP_MODES))
  return out


# ----------------------------------------------------------------------------- unselected release

def release_unselected(config, workdir: str) -> dict:
  """The workdir's generator with selection off, as a release the audit and evaluate stages read:
  `privacy.power.unselected_release` (one sample per training image at config.sample.guidance,
  its own noise stream), every image released with its training image's labels. Selection's re-id
  model still looks at each (one candidate, one round, nothing rejected), so the summary has the
  share it links to a training patient (what selection would have rejected: the first-round
  rejection rate) and the 1:1 memorisation rate, as the select stage's summary has. Writes the
  select stage's files (release/, synthetic/) but not its marker; returns its summary."""
  from pso_jax.data import dataset, release
  from pso_jax.privacy import power, selection, selection_workdir
  start = time.perf_counter()
  # the training images stay on disk (a lazy column: the re-id and classifier passes read them a
  # batch at a time); the unselected release itself, one image per training image, is held
  train = dataset.load_columns(workdir, "train", keys=("image", "labels", "patient_id", "path",
                                                       "feature"))
  images = power.unselected_release(config, workdir, train)
  n, g = len(images), float(config.sample.guidance)
  # candidate 0 of image i in round 0 has seed i: the generator hands back the images made above
  inputs = selection_workdir.build_inputs(config, workdir, train,
                                          lambda seeds, cond, guidance: images[np.asarray(seeds)])
  rule = selection.SelectionRule(n_candidates=1, guidance=g, guidance_step=0.0, guidance_floor=g,
                                 max_rounds=1, second=False)
  records, _ = selection.select_images(inputs, rule, range(n))
  seconds = time.perf_counter() - start
  summary = selection.summarise([selection.chunk_stats(records, n, seconds)], rule, inputs)
  summary.update(selection="off: one sample per training image, none rejected",
                 released=n, released_primary=n, released_second=0, skipped_images=0,
                 skipped_paths=[], image_shape=list(images.shape[1:]),
                 steps=int(config.sample.steps), guide=config.sample.guide,
                 ema_std=float(config.sample.ema_std), guidance=g)
  if jax.process_index() == 0:
    writer = release.ReleaseWriter(workdir)
    for i in range(n):
      writer.save(i, 0, images[i])
    io_utils.write_text(os.path.join(workdir, release.SUBDIR, "selection.jsonl"),
                        "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    writer.write_lists([(i, 0) for i in range(n)], inputs.paths, inputs.labels)
    card = release.selection_card(config, summary)
    card["method"] = ("NOT FOR RELEASE: a baseline of the comparison. One image was sampled per "
                      "real training image and released whatever a re-identification model "
                      "said of it (no selection).")
    writer.write_card(card)
  return summary


# ----------------------------------------------------------------------------- rows

# compare.json's columns of a row (every row has each; None where a number does not exist)
COLUMNS = ("method", "title", "release", "workdir", "released",
           "mean_auroc", "mean_auroc_ci", "real_mean_auroc", "real_mean_auroc_ci",
           "auroc_gap", "auroc_gap_ci", "within_one_point", "per_class",
           "frechet_distance", "frechet_distance_real", "image_retrieval_score",
           "image_retrieval_score_real", "diversity_space", "first_round_rejection_rate", "memorisation_1to1",
           "audit_verdict", "audit_decided_by", "dcr_share", "dcr_control_share",
           "pso_attack", "pso_control", "timings", "seconds")


def per_class(utility: dict) -> dict:
  """finding -> synthetic and real AUROC with CIs and the point gap (the paired bootstrap's CI is
  the mean's; per finding the gap is the difference of the two AUROCs)."""
  out = {}
  for f in utility.get("findings", []):
    syn = dig(utility, "models", "synthetic", "per_class", f) or {}
    real = dig(utility, "models", "real", "per_class", f) or {}
    a, b = syn.get("auroc"), real.get("auroc")
    defined = isinstance(a, float) and isinstance(b, float)
    out[f] = {"auroc": a if defined else None, "ci": syn.get("ci"),
              "real": b if defined else None, "real_ci": real.get("ci"),
              "gap": a - b if defined else None, "positives": real.get("positives")}
  return out


def release_row(results: dict, method: Method, kind: str, rel_workdir: str) -> dict:
  """One row of compare.json from a release workdir's collected results
  (`results_page.collect`)."""
  h, sel = results["headline"], results.get("selection") or {}
  t = results["timings"]
  row = {
      "method": method.name, "title": method.title, "release": kind, "workdir": rel_workdir,
      "released": sel.get("released"),
      "mean_auroc": h["synthetic_mean_auroc"], "mean_auroc_ci": h["synthetic_mean_auroc_ci"],
      "real_mean_auroc": h["real_mean_auroc"], "real_mean_auroc_ci": h["real_mean_auroc_ci"],
      "auroc_gap": h["auroc_gap"], "auroc_gap_ci": h["auroc_gap_ci"],
      "within_one_point": h["within_one_point"],
      "per_class": per_class(dig(results, "evaluate", "utility") or {}),
      "frechet_distance": h["frechet_synthetic_train"], "frechet_distance_real": h["frechet_real_train"],
      "image_retrieval_score": h["irs_synthetic"], "image_retrieval_score_real": h["irs_real"],
      "diversity_space": h.get("diversity_space"),  # where the two above were measured
      "first_round_rejection_rate": h["first_round_rejection_rate"],
      "memorisation_1to1": h["memorisation_1to1_before_selection"],
      "audit_verdict": h["pso_verdict"], "audit_decided_by": h["audit_decided_by"],
      "dcr_share": h["dcr_share"], "dcr_control_share": h["dcr_control_share"],
      "pso_attack": h["pso_attack"], "pso_control": h["pso_control"],
      "timings": t, "seconds": float(sum(t.values())),
  }
  assert tuple(row) == COLUMNS
  return row


def sweep_point(results: dict, guidance: float, rel_workdir: str) -> dict:
  h, sel = results["headline"], results.get("selection") or {}
  return {"guidance": float(guidance), "workdir": rel_workdir,
          "mean_auroc": h["synthetic_mean_auroc"], "mean_auroc_ci": h["synthetic_mean_auroc_ci"],
          "real_mean_auroc": h["real_mean_auroc"],
          "auroc_gap": h["auroc_gap"], "auroc_gap_ci": h["auroc_gap_ci"],
          "frechet_distance": h["frechet_synthetic_train"],
          "image_retrieval_score": h["irs_synthetic"],
          "first_round_rejection_rate": sel.get("first_round_rejection_rate"),
          "memorisation_1to1": sel.get("one_to_one_memorisation_rate"),
          "timings": results["timings"], "seconds": float(sum(results["timings"].values()))}

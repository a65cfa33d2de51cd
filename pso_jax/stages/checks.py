"""Every stage's config checks: `main` runs those of all the stages it is about to run before the
first one starts, so a bad value that `select` or `audit` would meet hours later stops the run at
once, before config.json is written.

A check reads only the config and the device count (how a batch splits over the mesh): no data, no
compilation. It calls the libraries' own checks where they exist and adds the ranges they leave
open. `CHECKS` holds one check per mode of the stage table.
"""

import math

from pso_jax import parallel, workdir as workdir_lib
from pso_jax.data import filelists, latents, prepare_plan
from pso_jax.diffusion import regulariser, sampling, train_setup
from pso_jax.errors import UserError, require
from pso_jax.models import cnn, presets
from pso_jax.privacy import attackers, reid, selection
from pso_jax.training import augment

_NORMS = ("batch", "group")
_AUDIT_DTYPES = ("float32", "bfloat16")


# ------------------------------------------------------------------ one field


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def count(config, field: str, low: int = 1, hint: str = "") -> None:
  """An integer field of at least `low` (steps, sizes, batch sizes, counts)."""
  v = workdir_lib.config_field(config, field)
  require(isinstance(v, int) and not isinstance(v, bool) and v >= low,
          f"config.{field}={v!r} must be an integer >= {low}{hint}")


def _interval(low, high, low_open: bool, high_open: bool):
  """(test, words) of an interval: `v -> bool` and how the message says it."""
  if high == math.inf:
    words = f"{'>' if low_open else '>='} {low:g}"
  elif low == -math.inf:
    words = f"{'<' if high_open else '<='} {high:g}"
  else:
    words = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
  test = lambda v: (_is_number(v) and (low < v if low_open else low <= v)
                    and (v < high if high_open else v <= high))
  return test, words


def number(config, field: str, low=-math.inf, high=math.inf, *, low_open=False, high_open=False,
           hint: str = "") -> None:
  """A finite number between `low` and `high` (each end excluded when marked open)."""
  v = workdir_lib.config_field(config, field)
  test, words = _interval(low, high, low_open, high_open)
  require(test(v), f"config.{field}={v!r} must be {words}{hint}")


def numbers(config, field: str, length: int | None = None, low=-math.inf, high=math.inf, *,
            low_open=False, high_open=False, hint: str = "") -> None:
  """A tuple of numbers (`length` of them when given), each between `low` and `high`."""
  v = tuple(workdir_lib.config_field(config, field))
  test, words = _interval(low, high, low_open, high_open)
  require((len(v) == length if length else len(v) >= 1) and all(test(x) for x in v),
          f"config.{field}={v!r} must hold {length or 'one or more'} values, each {words}{hint}")


def choice(config, field: str, options) -> None:
  v = workdir_lib.config_field(config, field)
  require(v in options, f"config.{field}={v!r} is unknown; use one of {', '.join(map(str, options))}")


# ------------------------------------------------------------------ one stage each


def _common(config) -> None:
  """What every stage uses: the seed (numpy generators refuse negative ones)."""
  count(config, "seed", 0)
  count(config, "data.worker_count", 0, " (0 = load in this process)")


def _batch_over_mesh(config, field: str) -> None:
  """The mesh fits the devices and the batch size `field` splits evenly over it (the stages that
  train or sample use config.mesh; a report on a laptop needs none of the training run's GPUs)."""
  shards = parallel.batch_shards(parallel.make_mesh(config.mesh))
  v = workdir_lib.config_field(config, field)
  require(v % shards == 0, f"config.{field}={v} is not divisible by the {shards} devices the mesh "
          f"splits a batch over; choose a multiple of {shards} (or a smaller --config.mesh.data)")


def check_prepare(config) -> None:
  d = "data."
  for field in ("image_size", "batch_size", "prepare_chunk", "latent.batch_size",
                "features.dim", "features.pool_size", "features.resize", "features.batch_size"):
    count(config, d + field)
  count(config, d + "split_seed", 0)
  numbers(config, d + "split_fractions", 3, 0, 1, low_open=True, high_open=True,
          hint=", summing to 1 (train, val, test), e.g. (0.8, 0.1, 0.1)")
  require(abs(sum(config.data.split_fractions) - 1) < 1e-6,
          f"config.data.split_fractions={tuple(config.data.split_fractions)} must sum to 1 "
          "(train, val, test), e.g. (0.8, 0.1, 0.1)")
  if config.data.source == "phantom":
    count(config, d + "phantom.num_patients", 3, " (train, val and test need a patient each)")
    count(config, d + "phantom.scans_per_patient")
    count(config, d + "phantom.seed", 0)
    number(config, d + "phantom.multi_label_rate", 0, 1)
  if latents.check_kind(config) == "sd_vae":
    numbers(config, d + "latent.std", 4, 0, low_open=True)
    numbers(config, d + "latent.mean", 4)
    number(config, d + "latent.final_std", 0, low_open=True)
  prepare_plan.check_config(config)


def check_train(config) -> None:
  for field in ("batch_size", "grad_accum", "total_images", "keep_checkpoints", "log_every_steps",
                "snapshot_images", "checkpoint_images", "nan_patience"):
    count(config, "train." + field)
  count(config, "train.warmup_images", 0)
  count(config, "train.t_ref_batches", 0)
  number(config, "train.lr_ref", 0, low_open=True)
  number(config, "train.adam_b1", 0, 1, high_open=True)
  number(config, "train.adam_b2", 0, 1, high_open=True)
  number(config, "train.adam_eps", 0, low_open=True)
  count(config, "mesh.fsdp_min_size", 0)
  count(config, "model.channels", 0, " (0 = the preset's)")
  number(config, "model.dropout", high=1, high_open=True, hint=" (< 0: the preset's)")
  number(config, "model.sigma_data", 0, low_open=True)
  number(config, "diffusion.p_std", 0, low_open=True)
  number(config, "diffusion.p_mean")
  number(config, "train.augment_p", 0, 1, high_open=True, hint=" (0 = off; EDM used 0.12 on CIFAR-10)")
  number(config, "train.augment_shift", 0, 0.5, low_open=True, high_open=True,
         hint=" (a share of the image side, e.g. 0.125)")
  train_setup.check_config(config)
  presets.build_model(config)  # preset, input size, dtype
  _regulariser_fits_the_model(config)
  if config.sample.guide == "autoguidance" and _guided(config):
    # the guide is one of this run's checkpoints: train must know which one to keep
    require(int(config.sample.guide_step) >= 0,
            "config.sample.guide='autoguidance' needs --config.sample.guide_step=<an earlier "
            "checkpoint step> before training, so that train keeps that checkpoint")
    sampling.check_guide_step(config)
  parallel.micro_batch_size(int(config.train.batch_size), int(config.train.grad_accum),
                            parallel.make_mesh(config.mesh))


def _regulariser_fits_the_model(config) -> None:
  """Regulariser parts that would silently do nothing, or cannot be built, are refused."""
  r = config.regulariser
  if not r.enabled:
    return
  if config.model.cond == "uncond":
    parts = [f"{name}={r[name]}" for name in ("cond_dropout", "jitter", "kanon_k") if r[name] > 0]
    require(not parts, f"config.model.cond='uncond' has no condition for the regulariser to act "
            f"on, yet config.regulariser has {', '.join(parts)}; add "
            "--config.regulariser.enabled=False")
  if regulariser.uses_kanon(r) and config.data.source == "phantom":
    p = config.data.phantom
    pool = int(p.num_patients) - int(config.data.attacker_patients)
    train_patients = pool - math.ceil((1 - float(config.data.split_fractions[0])) * pool)
    require(int(r.kanon_k) < train_patients,
            f"config.regulariser.kanon_k={r.kanon_k} needs more than {r.kanon_k} patients in the "
            f"train split, which has at most {train_patients}; lower kanon_k (0 = off)")


def _cnn(config, section: str) -> None:
  """What the re-id and classifier networks share."""
  choice(config, section + ".arch", cnn.ARCHS)
  choice(config, section + ".norm", _NORMS)
  for field in ("image_size", "width", "batch_size"):
    count(config, f"{section}.{field}")
  _batch_over_mesh(config, section + ".batch_size")
  numbers(config, section + ".blocks", None, 1)
  number(config, section + ".crop_min_scale", 0, 1, low_open=True)
  number(config, section + ".lr", 0, low_open=True)
  number(config, section + ".weight_decay", 0)


def check_train_reid(config) -> None:
  _cnn(config, "reid")
  for field in ("embed_dim", "steps", "max_pairs", "bootstrap"):
    count(config, "reid." + field)
  count(config, "reid.scans_per_patient", 2, " (positive pairs need two scans of a patient)")
  require(config.reid.batch_size % config.reid.scans_per_patient == 0,
          f"config.reid.batch_size={config.reid.batch_size} must be a multiple of "
          f"config.reid.scans_per_patient={config.reid.scans_per_patient}")
  count(config, "reid.shift", 0, " (0: off)")
  count(config, "reid.embed_shifts", 0, " (0: off)")
  choice(config, "reid.shift_mode", augment.TRANSLATE_MODES)
  number(config, "reid.intensity", 0)
  number(config, "reid.temperature", 0, low_open=True)
  choice(config, "reid.tau_mode", reid.TAU_MODES)
  number(config, "reid.target_fpr", 0, 1, low_open=True, high_open=True)


def check_train_classifier(config) -> None:
  _cnn(config, "classifier")
  count(config, "classifier.epochs")
  count(config, "classifier.steps", 0, " (0: config.classifier.epochs)")
  count(config, "classifier.eval_every", 0, " (0: once per epoch)")
  number(config, "classifier.plateau_factor", 0, 1, low_open=True)
  count(config, "evaluate.bootstrap")  # the test AUROC's confidence interval


def _sampling(config, guided: bool) -> None:
  """What the sample and select stages share: the sampler and its guide."""
  sampling.check_sample_config(config)
  parallel.make_mesh(config.mesh)
  number(config, "sample.guidance", 0)
  number(config, "sample.ema_std", 0, hint=" (0: the raw weights)")
  sampling.check_guide(config, guided)


def _sample_guided(config) -> bool:
  return float(config.sample.guidance) != 1.0


def _select_guided(config) -> bool:
  """Any selection round with g != 1 (rounds lower g by select.guidance_step from sample.guidance)."""
  return any(g != 1.0 for g in selection.SelectionRule.from_config(config).guidances())


def _guided(config) -> bool:
  """Whether sample or select would load a guide (a bad select setting counts as guided here:
  the select check names it when select is run)."""
  try:
    return _sample_guided(config) or _select_guided(config)
  except UserError:
    return True


def check_sample(config) -> None:
  count(config, "sample.grid")
  _sampling(config, guided=_sample_guided(config))


def check_select(config) -> None:
  selection.SelectionRule.from_config(config)
  count(config, "select.chunk_images")
  number(config, "select.guidance_floor", 0)
  count(config, "select.cond_k", low=0)
  count(config, "select.max_real", low=0, hint=" (0: every training image)")
  require(int(config.select.cond_k) == 0 or config.model.cond == "pseudo",
          f"config.select.cond_k={config.select.cond_k} averages feature conditions, but "
          f"config.model.cond={config.model.cond!r} has none; set --config.select.cond_k=0")
  _sampling(config, guided=_select_guided(config))


def check_audit(config) -> None:
  a = config.audit
  for field in ("top_k", "query_block", "ref_block", "count_k", "train_queries"):
    count(config, "audit." + field)
  count(config, "audit.canaries", 0)
  count(config, "audit.canary_shift", 0)
  count(config, "audit.gallery", 0)
  number(config, "audit.canary_noise", 0)
  number(config, "audit.canary_contrast", 0, low_open=True)
  choice(config, "audit.dtype", _AUDIT_DTYPES)
  choice(config, "audit.holdout_split", [s for s in filelists.SPLITS if s != "train"])
  number(config, "audit.risk_bound", 0, 1, low_open=True, high_open=True,
         hint=" (a probability: 5% is 0.05)")
  if a.weight_bound >= 0:  # < 0: 1 / the number of training patients
    number(config, "audit.weight_bound", 0, 1, low_open=True,
           hint=" (a share of patients; < 0: 1 / the number of training patients)")
  if a.tau >= 0:  # < 0: the re-id model's calibrated threshold
    number(config, "audit.tau", 0, 1, hint=" (a cosine similarity; < 0: the re-id model's)")
  number(config, "audit.chance_match_rate", 0, 1, high_open=True, hint=" (0: off)")
  attackers.check_config(config)  # the independent attackers, test size, pixel size


def check_evaluate(config) -> None:
  check_train_classifier(config)  # evaluate trains classifiers on real and synthetic images
  count(config, "evaluate.fd_dim")


def check_report(config) -> None:
  count(config, "report.grid")


def check_compare(config) -> None:
  """Every sub-run of the comparison passes the checks of the stages it runs, each with its own
  config (a method whose overrides cannot work stops here, before any model trains)."""
  from pso_jax.report import comparison
  for what, sub_config, modes in comparison.configs_to_check(config):
    try:
      check_config(sub_config, modes)
    except UserError as e:
      raise UserError(f"--mode=compare, {what}: {e}") from None


CHECKS = {"prepare": check_prepare, "train": check_train, "train_reid": check_train_reid,
          "train_classifier": check_train_classifier, "sample": check_sample,
          "select": check_select, "audit": check_audit, "audit_power": check_audit,
          "evaluate": check_evaluate,
          "report": check_report, "compare": check_compare}


def check_config(config, modes) -> None:
  """Every check of the stages in `modes`: the first bad value is a UserError."""
  _common(config)
  for mode in modes:
    CHECKS[mode](config)

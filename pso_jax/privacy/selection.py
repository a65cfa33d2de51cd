"""Candidate selection (docs/method.md §6): from n candidates per real training image keep the
one that re-identifies nobody and whose predicted findings agree best with the real image's.

Flag first, then score: a candidate that the re-id model links to ANY training patient (through the
pairwise kernel, per-patient threshold tau) is out; among the survivors the lowest consistency score
wins. The two are never added together (the reference's `score + flag` breaks when BCE > 1). When
no candidate survives, the image gets new seeds and lower guidance, down to a floor, then it is
skipped. With `per_real` = k > 1 an image stays in the rounds until k of its candidates survived,
and all k are released (best score first within a round): more synthetic images per real one. Everything here is plain numpy over the callables in `SelectionInputs`, so the rule is
testable apart from the networks; `selection_workdir.build_inputs` builds them from a workdir.
"""

import dataclasses
import json
import os
import time
from typing import Callable, Optional

import numpy as np

from pso_jax import io_utils
from pso_jax.data.release import KEPT, SECOND
from pso_jax.diffusion import regulariser
from pso_jax.errors import require

SURVIVOR, REJECTED = "survivor", "rejected"


@dataclasses.dataclass
class SelectionInputs:
  """The training set as the selection sees it, and the functions it calls.

  generate(seeds uint32 [M], cond [M, d], guidance [M]) -> uint8 images [M, H, W, C];
  embed(uint8 images) -> unit-norm re-id embeddings; predict(uint8 images) -> finding probs [M, 8];
  search(embeddings) -> (n_patients_matched [M], best_patient [M] int, best_sim [M]) over all
  training images at threshold tau.
  """
  paths: list
  labels: np.ndarray            # [N, 8] real findings (copied to the synthetic filelist)
  conditions: np.ndarray        # [N, d] what each image's candidates are conditioned on
  real_embeddings: np.ndarray   # [N, e] re-id embeddings of the real images (for the 1:1 check)
  real_probs: np.ndarray        # [N, 8] classifier outputs on the real images
  patients: np.ndarray          # [N] int patient index of each real image
  patient_names: np.ndarray     # [P] str patient id of each index
  tau: float
  generate: Callable
  embed: Callable
  predict: Callable
  search: Callable


@dataclasses.dataclass(frozen=True)
class SelectionRule:
  n_candidates: int
  guidance: float
  guidance_step: float
  guidance_floor: float
  max_rounds: int
  second: bool
  per_real: int = 1   # survivors released per real image (kept until this many survived)

  @classmethod
  def from_config(cls, config) -> "SelectionRule":
    s = config.select
    rule = cls(int(s.n_candidates), float(config.sample.guidance), float(s.guidance_step),
               float(s.guidance_floor), int(s.max_rounds), bool(s.second), int(s.per_real))
    rule.validate()
    return rule

  def validate(self) -> None:
    require(self.n_candidates >= 1, f"config.select.n_candidates={self.n_candidates} must be >= 1 "
            "(candidates per real image; the reference uses 32)")
    require(self.max_rounds >= 1, f"config.select.max_rounds={self.max_rounds} must be >= 1")
    require(self.per_real >= 1, f"config.select.per_real={self.per_real} must be >= 1 (synthetic "
            "images released per real image)")
    require(not (self.second and self.per_real > 1),
            f"config.select.second=True and config.select.per_real={self.per_real} both ask for "
            "more than one image per real one; use --config.select.per_real alone (second=True is "
            "the runner-up of the same round only)")
    require(self.guidance_step >= 0, f"config.select.guidance_step={self.guidance_step} must be "
            ">= 0 (guidance is lowered by this much per failed round)")
    require(self.guidance_floor <= self.guidance,
            f"config.select.guidance_floor={self.guidance_floor} is above the starting guidance "
            f"config.sample.guidance={self.guidance}; set the floor at or below the start, e.g. "
            f"--config.select.guidance_floor={min(0.7, self.guidance)}")

  def guidances(self) -> list:
    """Guidance of each round: start, start - step, ... not below the floor, at most max_rounds."""
    out = []
    for r in range(self.max_rounds):
      g = round(self.guidance - r * self.guidance_step, 6)
      if g < self.guidance_floor - 1e-9:
        break
      out.append(g)
    return out


def anonymous_conditions(conditions, labels, patients, k: int) -> np.ndarray:
  """k-anonymous conditions for sampling (config.select.cond_k = k > 0): per real image, the
  normalised mean of the conditions of its nearest images from k distinct patients other than its
  own with the same findings (any findings when fewer than k + 1 patients share them). A candidate
  is then conditioned on no single person's image, and on nothing of its own patient's; its labels
  stay those of the real image it stands for. [N, d] from [N, d] conditions, [N, 8] labels, [N]
  patients."""
  conditions = np.asarray(conditions, np.float32)
  patients = np.asarray(patients)
  require(conditions.ndim == 2 and conditions.shape[1] > 0,
          "config.select.cond_k > 0 needs feature conditions (config.model.cond='pseudo'); set "
          "--config.select.cond_k=0 for class-conditional or unconditional models")
  neighbours = regulariser.kanon_neighbours_by_findings(conditions, labels, patients, k)
  return regulariser.kanon_conditions(conditions, neighbours)


def candidate_seeds(index: int, round_: int, n: int, n_images: int) -> np.ndarray:
  """Globally unique seeds: candidate j of image i in round r is ((r * N) + i) * n + j."""
  return ((round_ * n_images + index) * n + np.arange(n)).astype(np.uint32)


def consistency_scores(p_real: np.ndarray, q: np.ndarray) -> np.ndarray:
  """Mean BCE over findings with the real image's outputs as input and the candidate's as soft
  target (the reference's argument order): -mean(q log p + (1 - q) log(1 - p)). Lower is better.
  Logs are clamped at -100 like torch's BCELoss."""
  p = np.asarray(p_real, np.float64)
  q = np.asarray(q, np.float64)
  with np.errstate(divide="ignore"):
    log_p = np.maximum(np.log(p), -100.0)
    log_1p = np.maximum(np.log1p(-p), -100.0)
  return -(q * log_p + (1 - q) * log_1p).mean(axis=-1)


def choose(flagged: np.ndarray, scores: np.ndarray, second: bool):
  """(winner, runner-up) candidate positions among the unflagged, lowest score first (ties: lower
  position); None where there is none."""
  survivors = np.flatnonzero(~np.asarray(flagged, bool))
  order = survivors[np.argsort(np.asarray(scores)[survivors], kind="stable")]
  first = int(order[0]) if len(order) else None
  runner_up = int(order[1]) if second and len(order) > 1 else None
  return first, runner_up



def select_images(inputs: SelectionInputs, rule: SelectionRule, indices):
  """Runs every round for the real images `indices` (candidates of all images batched together).

  Returns (records: one dict per candidate in (round, image, candidate) order; `rank` is the
           released image's place among its real image's, -1 when not released,
           chosen: {index: [released uint8 images, rank 0 (the primary) first]}).
  """
  n, n_images = rule.n_candidates, len(inputs.paths)
  pending = [int(i) for i in indices]
  records, chosen = [], {}
  for round_, guidance in enumerate(rule.guidances()):
    if not pending:
      break
    seeds = np.concatenate([candidate_seeds(i, round_, n, n_images) for i in pending])
    owner = np.repeat(np.asarray(pending), n)
    images = inputs.generate(seeds, inputs.conditions[owner],
                             np.full(len(seeds), guidance, np.float32))
    emb = np.asarray(inputs.embed(images), np.float32)
    n_matched, best_patient, best_sim = (np.asarray(a) for a in inputs.search(emb))
    self_sim = np.einsum("md,md->m", emb, inputs.real_embeddings[owner])
    scores = consistency_scores(inputs.real_probs[owner], inputs.predict(images))
    still_pending = []
    for k, i in enumerate(pending):
      rows = slice(k * n, (k + 1) * n)
      flagged = n_matched[rows] > 0
      taken = chosen.setdefault(i, [])
      rank = {}  # candidate position -> its rank among the image's released images
      if rule.per_real > 1:
        survivors = np.flatnonzero(~flagged)
        best = survivors[np.argsort(scores[rows][survivors], kind="stable")]
        for j in best[:rule.per_real - len(taken)]:
          rank[int(j)] = len(taken) + len(rank)
      else:
        first, runner_up = choose(flagged, scores[rows], rule.second)
        rank = {j: r for r, j in enumerate((first, runner_up)) if j is not None}
      taken += [images[rows][j] for j in sorted(rank, key=rank.get)]
      if len(taken) < rule.per_real and (rule.per_real > 1 or not taken):
        still_pending.append(i)
      for j in range(n):
        m = k * n + j
        outcome = (KEPT if rank.get(j) == 0 else SECOND if j in rank else
                   REJECTED if flagged[j] else SURVIVOR)
        records.append(dict(
            index=i, path=inputs.paths[i], patient=str(inputs.patient_names[inputs.patients[i]]),
            round=round_, candidate=j, seed=int(seeds[m]), guidance=float(guidance),
            n_patients_matched=int(n_matched[m]),
            nearest_patient=str(inputs.patient_names[best_patient[m]]),
            nearest_sim=round(float(best_sim[m]), 6), self_sim=round(float(self_sim[m]), 6),
            self_match=bool(self_sim[m] >= inputs.tau),
            consistency=round(float(scores[m]), 6), outcome=outcome, rank=rank.get(j, -1)))
    pending = still_pending
  chosen = {i: taken for i, taken in chosen.items() if taken}
  return records, chosen


# ------------------------------------------------------------------ resumable chunked driver

def chunk_marker(out_dir: str, k: int) -> str:
  return os.path.join(out_dir, "chunks", f"{k:06d}.done.json")


def chunk_records(out_dir: str, k: int) -> str:
  return os.path.join(out_dir, "chunks", f"{k:06d}.jsonl")


def chunk_stats(records: list, n_images: int, seconds: float) -> dict:
  first = [r for r in records if r["round"] == 0]
  kept = {r["index"]: r["round"] for r in records if r["outcome"] == KEPT}
  retries = {}
  for rounds in kept.values():
    retries[str(rounds)] = retries.get(str(rounds), 0) + 1
  indices = sorted({r["index"] for r in records})
  return dict(
      images=n_images, candidates=len(records),
      first_round_candidates=len(first),
      first_round_rejected=sum(r["outcome"] == REJECTED for r in first),
      rejected=sum(r["outcome"] == REJECTED for r in records),
      self_match=sum(r["self_match"] for r in records),
      missed_by_one_to_one=sum(r["outcome"] == REJECTED and not r["self_match"] for r in records),
      released_self_match=sum(r["self_match"] for r in records if r["outcome"] in (KEPT, SECOND)),
      kept=len(kept), second=sum(r["outcome"] == SECOND for r in records),
      retries=retries, skipped=[r for r in indices if r not in kept], seconds=seconds)


def real_indices(n_images: int, max_real: int, seed: int) -> np.ndarray:
  """The training images selection samples for, ascending: all of them, or (0 < max_real <
  n_images) a random subset of max_real drawn with `seed`."""
  require(max_real >= 0, f"config.select.max_real={max_real} must be >= 0 (0: every training image)")
  if not 0 < max_real < n_images:
    return np.arange(n_images)
  return np.sort(np.random.default_rng([seed, 0x5E1EC7]).choice(n_images, max_real, replace=False))


def run_chunks(inputs: SelectionInputs, rule: SelectionRule, out_dir: str, chunk_images: int, *,
               save: Optional[Callable] = None, stop_after: Optional[int] = None,
               progress=None, real: Optional[np.ndarray] = None) -> list:
  """Selects chunk by chunk; a chunk with its marker is done and skipped on a rerun. `real`: the
  training images to select for (`real_indices`; default all), cut into chunks in that order.

  `save(index, rank, image)` stores a released image (`data.release.ReleaseWriter.save`: under
  an opaque name, never one derived from the source path); without it (processes other than 0)
  nothing is written. Each chunk saves its images, then writes its records, then its marker (all
  atomic), so a kill leaves either a finished chunk or one that is redone from scratch with the
  same seeds. `stop_after` returns after that many newly computed chunks (for tests of
  resumption). Returns the markers.
  """
  require(chunk_images >= 1, f"config.select.chunk_images={chunk_images} must be >= 1")
  real = np.arange(len(inputs.paths)) if real is None else np.asarray(real)
  n_images = len(real)
  n_chunks = -(-n_images // chunk_images)
  stats, computed = [], 0
  for k in range(n_chunks):
    marker = chunk_marker(out_dir, k)
    if os.path.exists(marker):
      stats.append(io_utils.read_json(marker))
      if progress is not None:
        progress.update(min(chunk_images, n_images - k * chunk_images))
      continue
    if stop_after is not None and computed >= stop_after:
      break
    start = time.perf_counter()
    indices = real[k * chunk_images:(k + 1) * chunk_images].tolist()
    records, chosen = select_images(inputs, rule, indices)
    if save is not None:
      for i, taken in sorted(chosen.items()):
        for rank, image in enumerate(taken):
          save(i, rank, image)
      io_utils.write_text(chunk_records(out_dir, k), "".join(_json_line(r) for r in records))
    s = chunk_stats(records, len(indices), time.perf_counter() - start)
    if save is not None:
      io_utils.write_json(marker, s)
    stats.append(s)
    computed += 1
    if progress is not None:
      progress.update(len(indices))
  return stats


def _json_line(record: dict) -> str:
  return json.dumps(record, sort_keys=True) + "\n"


def released_images(records: list) -> list:
  """(index, rank) of every released image in source order, a primary (rank 0) first."""
  return sorted((r["index"], r.get("rank", int(r["outcome"] == SECOND))) for r in records
                if r["outcome"] in (KEPT, SECOND))  # records without a rank: before per_real


def summarise(stats: list, rule: SelectionRule, inputs: SelectionInputs) -> dict:
  """Totals over chunk markers (all deterministic except the timing fields under `throughput`)."""
  total = lambda key: int(sum(s[key] for s in stats))
  retries = {}
  for s in stats:
    for rounds, count in s["retries"].items():
      retries[rounds] = retries.get(rounds, 0) + count
  skipped = sorted(i for s in stats for i in s["skipped"])
  candidates = total("candidates")
  seconds = float(sum(s["seconds"] for s in stats))
  ratio = lambda a, b: a / b if b else 0.0
  return dict(
      train_images=len(inputs.paths), tau=float(inputs.tau),
      n_candidates=rule.n_candidates, guidance_rounds=rule.guidances(),
      candidates=candidates,
      first_round_rejection_rate=ratio(total("first_round_rejected"), total("first_round_candidates")),
      rejection_rate=ratio(total("rejected"), candidates),
      retries_histogram=dict(sorted(retries.items(), key=lambda kv: int(kv[0]))),
      skipped_images=len(skipped), skipped_paths=[inputs.paths[i] for i in skipped],
      released=total("kept") + total("second"), released_primary=total("kept"),
      released_second=total("second"),
      # the reference's 1:1 check (candidate vs its own conditioning image) on the same candidates
      one_to_one_memorisation_rate=ratio(total("self_match"), candidates),
      one_to_one_released_matches=total("released_self_match"),
      # rejected here (linked to some training patient) but passed by a 1:1-only check
      missed_by_one_to_one_rate=ratio(total("missed_by_one_to_one"), candidates),
      throughput=dict(seconds=seconds, candidates_per_s=ratio(candidates, seconds)))

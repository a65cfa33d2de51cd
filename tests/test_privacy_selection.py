"""Selection rule (flag first, then score), consistency score against torch's BCELoss, rounds with
lowered guidance, the synthetic-set files, resumption after a kill, and 1 vs 8 devices."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

import tolerances as T
from pso_jax.privacy import selection as sel
from pso_jax import io_utils
from pso_jax.privacy import selection_workdir
from pso_jax.data import release as synthetic_set
from pso_jax.errors import UserError
from tests.conftest import load_config

H, W, C = 8, 8, 1


# ------------------------------------------------------------------ a small real training set

def toy_train(n_patients=6, scans=3, seed=0):
  """Patients with a fixed random pattern; scans add noise (same-patient scans are similar)."""
  rng = np.random.default_rng(seed)
  base = rng.uniform(40, 215, (n_patients, H, W, C))
  images, patient_ids, paths = [], [], []
  for p in range(n_patients):
    for s in range(scans):
      images.append(np.clip(base[p] + rng.normal(0, 8, (H, W, C)), 0, 255).astype(np.uint8))
      patient_ids.append(f"P{p:03d}")
      paths.append(f"images/P{p:03d}_{s:03d}.png")
  labels = (rng.random((len(images), 8)) < 0.3).astype(np.float32)
  return dict(image=np.stack(images), patient_id=np.asarray(patient_ids), path=paths,
              labels=labels)


def projection_embedder(dim=16, seed=3):
  proj = np.random.default_rng(seed).normal(size=(H * W * C, dim))
  def embed(images):
    x = np.asarray(images, np.float64).reshape(len(images), -1)
    z = (x - x.mean(axis=1, keepdims=True)) @ proj
    return (z / np.linalg.norm(z, axis=1, keepdims=True)).astype(np.float32)
  return embed


def linear_classifier(seed=4):
  w = np.random.default_rng(seed).normal(size=(H * W * C, 8)) / 400
  def predict(images):
    x = np.asarray(images, np.float64).reshape(len(images), -1) / 255 - 0.5
    return 1 / (1 + np.exp(-(x @ w) * 8))
  return predict


def copying_generator(train, copy_prob):
  """Candidate = a copy of its conditioning image with probability copy_prob(guidance), else a
  fresh random image; both drawn from the candidate's seed only. Conditions are train indices."""
  def generate(seeds, cond, guidance):
    out = []
    for s, c, g in zip(seeds, cond, guidance):
      rng = np.random.default_rng(int(s))
      if rng.random() < copy_prob(float(g)):
        out.append(train["image"][int(c[0])])
      else:
        out.append(rng.integers(0, 256, (H, W, C), dtype=np.uint8))
    return np.stack(out)
  return generate


def brute_force_search(refs, patients, tau):
  def search(queries):
    sims = np.asarray(queries, np.float64) @ np.asarray(refs, np.float64).T
    n_matched = np.array([len(set(patients[row >= tau])) for row in sims])
    best = sims.argmax(axis=1)
    return n_matched, patients[best], sims.max(axis=1)
  return search


def make_inputs(train, generate, tau=0.9, search=None):
  embed, predict = projection_embedder(), linear_classifier()
  names, patients = np.unique(train["patient_id"], return_inverse=True)
  real = embed(train["image"])
  if search is None:
    from pso_jax.search.pairwise import patient_search
    def search(q):
      found = patient_search(q, real, patients.astype(np.int32), tau, 4, query_block=8, ref_block=64)
      return found.n_patients_matched, found.best_patient, found.best_sim
  return sel.SelectionInputs(
      paths=list(train["path"]), labels=train["labels"],
      conditions=np.arange(len(train["path"]), dtype=np.float32)[:, None], real_embeddings=real,
      real_probs=predict(train["image"]), patients=patients, patient_names=names, tau=tau,
      generate=generate, embed=embed, predict=predict, search=search)


RULE = sel.SelectionRule(n_candidates=4, guidance=1.2, guidance_step=0.1, guidance_floor=0.95,
                         max_rounds=6, second=True)


# ------------------------------------------------------------------ the rule

def test_consistency_score_is_torch_bce_with_real_as_input_and_candidate_as_target():
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(0)
  p_real = rng.uniform(0.001, 0.999, (5, 8))
  p_real[0, 0], p_real[1, 1] = 0.0, 1.0  # torch clamps the logs at -100
  q = rng.uniform(0, 1, (5, 8))
  ours = sel.consistency_scores(p_real, q)
  bce = torch.nn.BCELoss(reduction="none")(torch.tensor(p_real), torch.tensor(q)).mean(dim=1)
  np.testing.assert_allclose(ours, bce.numpy(), rtol=1e-10)
  # asymmetric: swapping the roles changes the score
  assert not np.allclose(sel.consistency_scores(q, p_real), ours)


def test_flag_first_then_score_never_added():
  flagged = np.array([True, False, True, False, False])
  scores = np.array([0.01, 5.0, 0.02, 3.0, 3.0])  # a survivor with BCE > 1 still beats the flagged
  assert sel.choose(flagged, scores, second=True) == (3, 4)  # ties broken by position
  assert sel.choose(flagged, scores, second=False) == (3, None)
  assert sel.choose(np.ones(3, bool), np.zeros(3), second=True) == (None, None)
  assert sel.choose(np.array([True, False]), np.array([0.0, 9.0]), second=True) == (1, None)


def test_guidance_rounds_and_bad_rules():
  assert RULE.guidances() == [1.2, 1.1, 1.0]
  assert sel.SelectionRule(2, 1.2, 0.1, 0.7, 2, False).guidances() == [1.2, 1.1]
  assert sel.SelectionRule(2, 1.0, 0.0, 1.0, 3, False).guidances() == [1.0, 1.0, 1.0]
  with pytest.raises(UserError, match="n_candidates"):
    sel.SelectionRule(0, 1.2, 0.1, 0.7, 2, False).validate()
  with pytest.raises(UserError, match="guidance_floor.*above"):
    sel.SelectionRule(2, 1.2, 0.1, 1.3, 2, False).validate()
  config = load_config("tiny")
  config.select.n_candidates = 0
  with pytest.raises(UserError, match="n_candidates=0"):
    sel.SelectionRule.from_config(config)


def test_seeds_are_unique_over_images_rounds_and_candidates():
  seeds = [sel.candidate_seeds(i, r, 4, 10) for r in range(3) for i in range(10)]
  flat = np.concatenate(seeds)
  assert len(np.unique(flat)) == len(flat) == 3 * 10 * 4


def test_selection_rejects_every_linked_candidate_and_keeps_the_best_survivor():
  train = toy_train()
  tau = 0.9
  # copies are likely at high guidance, rare once it is lowered: retries must rescue most images
  generate = copying_generator(train, lambda g: 0.97 if g > 1.05 else 0.2)
  inputs = make_inputs(train, generate, tau)
  records, chosen = sel.select_images(inputs, RULE, range(len(train["path"])))
  # independent check of every flag with a float64 brute-force search over all training images
  check = brute_force_search(inputs.real_embeddings, inputs.patients, tau)
  by_round = {}
  for r in records:
    by_round.setdefault((r["index"], r["round"]), []).append(r)
  assert any(r["round"] > 0 for r in records), "the toy should need retries"
  for (i, round_), rows in by_round.items():
    seeds = np.array([r["seed"] for r in rows])
    images = generate(seeds, inputs.conditions[[i] * len(rows)], np.full(len(rows), rows[0]["guidance"]))
    n_matched, _, best_sim = check(inputs.embed(images))
    assert [r["n_patients_matched"] for r in rows] == n_matched.tolist()
    T.assert_close([r["nearest_sim"] for r in rows], best_sim,
                   T.reduction_rtol(inputs.real_embeddings.shape[1]))  # float32 vs float64 dots
    assert rows[0]["guidance"] == RULE.guidances()[round_]
    outcomes = [r["outcome"] for r in rows]
    for r in rows:
      assert (r["outcome"] == sel.REJECTED) == (r["n_patients_matched"] > 0)
      # the 1:1 check: a copy of the own conditioning image matches it
      assert r["self_match"] == (r["self_sim"] >= tau)
    if sel.KEPT in outcomes:
      kept = rows[outcomes.index(sel.KEPT)]
      survivors = [r["consistency"] for r in rows if r["outcome"] != sel.REJECTED]
      assert kept["consistency"] == min(survivors)
      assert np.array_equal(chosen[i][0], images[kept["candidate"]])
      assert (sel.SECOND in outcomes) == (len(survivors) > 1)
    else:
      assert all(o == sel.REJECTED for o in outcomes)
  kept = {r["index"] for r in records if r["outcome"] == sel.KEPT}
  assert set(chosen) == kept
  skipped = set(range(len(train["path"]))) - kept
  for i in skipped:  # skipped only after every allowed round
    assert {r["round"] for r in records if r["index"] == i} == {0, 1, 2}


# ------------------------------------------------------------------ files, resumption, devices

def run_selection(workdir, inputs, rule, chunk_images, stop_after=None, key_from=None):
  """What the select stage does with `inputs`: internal records in <workdir>/synthetic, the set in
  <workdir>/release. key_from: a workdir whose secret key to reuse (the same names)."""
  out_dir = os.path.join(workdir, synthetic_set.SUBDIR)
  if key_from is not None and not os.path.exists(os.path.join(out_dir, synthetic_set.KEY_FILE)):
    os.makedirs(out_dir)
    shutil.copy(os.path.join(key_from, synthetic_set.SUBDIR, synthetic_set.KEY_FILE), out_dir)
  writer = synthetic_set.ReleaseWriter(workdir)
  stats = sel.run_chunks(inputs, rule, out_dir, chunk_images, stop_after=stop_after,
                         save=writer.save)
  n_chunks = -(-len(inputs.paths) // chunk_images)
  if len(stats) == n_chunks:
    selection_workdir.write_lists(out_dir, inputs, len(stats), writer)
    summary = sel.summarise(stats, rule, inputs) | dict(image_shape=[H, W, C])
    io_utils.finish_stage(out_dir, "summary.json", summary)
  return stats


def tree_files(workdir):
  """{path relative to the workdir: bytes} of the internal folder and the release."""
  out = {}
  walk = [w for folder in (synthetic_set.SUBDIR, synthetic_set.RELEASE_DIR)
          for w in os.walk(os.path.join(workdir, folder))]
  for base, _, files in walk:
    for name in files:
      path = os.path.join(base, name)
      rel = os.path.relpath(path, workdir)
      if rel.startswith(os.path.join(synthetic_set.SUBDIR, "chunks")):  # markers hold timings
        continue
      with open(path, "rb") as f:
        data = f.read()
      if name == "summary.json":
        summary = json.loads(data)
        summary.pop("throughput")
        data = json.dumps(summary, sort_keys=True).encode()
      out[rel] = data
  return out


def test_outputs_resume_after_a_kill_identically(tmp_path):
  train = toy_train()
  inputs = make_inputs(train, copying_generator(train, lambda g: 0.9 if g > 1.05 else 0.3))
  full = str(tmp_path / "full")
  stats = run_selection(full, inputs, RULE, chunk_images=5)
  # killed after 2 chunks, with a half-written third chunk's image and an atomic write's leftover
  killed = str(tmp_path / "killed")
  partial = run_selection(killed, inputs, RULE, chunk_images=5, stop_after=2, key_from=full)
  assert len(partial) == 2 and not os.path.exists(os.path.join(killed, "synthetic", "COMPLETE"))
  writer = synthetic_set.ReleaseWriter(killed)
  synthetic_set.write_png(os.path.join(killed, "release", writer.name(10, False)),
                          np.zeros((H, W, C), np.uint8))
  open(os.path.join(killed, "release", "images", ".x.png.tmp"), "w").close()
  calls = []
  counting = dict(vars(inputs))
  counting["generate"] = lambda s, c, g: calls.append(len(s)) or inputs.generate(s, c, g)
  resumed = run_selection(killed, sel.SelectionInputs(**counting), RULE, chunk_images=5)
  assert len(resumed) == len(stats) == 4
  a, b = tree_files(full), tree_files(killed)
  assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)
  records = [json.loads(l) for l in a["synthetic/selection.jsonl"].decode().splitlines()]
  # only the missing chunks (images 10..17) were generated again
  assert calls[0] == 5 * RULE.n_candidates
  assert sum(calls) == sum(r["index"] >= 10 for r in records)
  summary = json.loads(a["synthetic/summary.json"])
  assert summary["candidates"] == len(records)
  first_round_rej = [r["outcome"] == sel.REJECTED for r in records if r["round"] == 0]
  assert summary["first_round_rejection_rate"] == pytest.approx(np.mean(first_round_rej))
  assert sum(summary["retries_histogram"].values()) == summary["released_primary"]
  assert summary["skipped_images"] + summary["released_primary"] == len(train["path"])
  # the internal index: every released image (primary, then its second) in source order
  index = [json.loads(l) for l in a["synthetic/release_index.jsonl"].decode().splitlines()]
  released_records = sorted((r for r in records if r["outcome"] in (sel.KEPT, sel.SECOND)),
                            key=lambda r: (r["index"], r["outcome"] == sel.SECOND))
  assert [(e["index"], e["second"], e["path"]) for e in index] == \
      [(r["index"], r["outcome"] == sel.SECOND, r["path"]) for r in released_records]
  assert any(e["second"] for e in index)
  # the release filelist: opaque names in name order, the source image's labels
  lines = a["release/filelist.txt"].decode().splitlines()
  assert len(lines) == summary["released"] == len(index) and lines == sorted(lines)
  source = {e["name"]: e["index"] for e in index}
  for line in lines:
    name, *labels = line.split()
    assert name.startswith("images/") and name.endswith(".png") and len(name) == 7 + 32 + 4
    assert labels == [str(int(v)) for v in train["labels"][source[name]]]
  assert sorted(k for k in a if k.startswith("release/images/")) == sorted(
      "release/" + line.split()[0] for line in lines)  # the leftover .tmp is gone
  # load_released: the release's images and labels in source order
  released = synthetic_set.load_released(full)
  assert released["images"].shape == (len(lines), H, W, C)
  assert released["source_index"].tolist() == [e["index"] for e in index]
  assert np.array_equal(released["labels"], train["labels"][released["source_index"]])
  for name, image in zip(released["paths"], released["images"]):
    assert np.array_equal(synthetic_set.read_png(os.path.join(full, "release", name), C), image)


def sampler_generator(mesh, batch_size):
  """Generation through the real GuidedSampler (a small nonlinear conditional network)."""
  from pso_jax.data.latents import unit_to_pixels
  from pso_jax.diffusion import sampler as S
  from tests.test_diffusion_sampler import conditional_toy_net
  net = conditional_toy_net()
  s = S.GuidedSampler(net, S.null_condition_guide(net), key=jax.random.key(0), shape=(H, W, 4),
                      steps=3, sigma_min=0.002, sigma_max=80.0, rho=7.0, batch_size=batch_size,
                      mesh=mesh)
  def generate(seeds, cond, guidance):
    x = s(seeds, np.tile(cond, (1, 3)) / 18.0, guidance)
    return unit_to_pixels(np.tanh(x[..., :1] / 3))
  return generate


def test_one_and_eight_devices_give_the_same_synthetic_set(tmp_path):
  from pso_jax.parallel import data_mesh
  train = toy_train(n_patients=4, scans=2)
  rule = sel.SelectionRule(n_candidates=3, guidance=1.2, guidance_step=0.1, guidance_floor=1.0,
                           max_rounds=3, second=True)
  embed = projection_embedder()
  gen8 = sampler_generator(data_mesh(), 16)
  # tau between the candidates' similarities, so some are rejected and some survive
  sims = embed(gen8(np.arange(24), np.arange(24, dtype=np.float32)[:, None] % 8, np.full(24, 1.2)))
  tau = float(np.quantile((sims @ embed(train["image"]).T).max(axis=1), 0.5))
  one = make_inputs(train, sampler_generator(data_mesh(jax.devices()[:1]), 5), tau)
  eight = make_inputs(train, gen8, tau)
  run_selection(str(tmp_path / "one"), one, rule, chunk_images=3)
  run_selection(str(tmp_path / "eight"), eight, rule, chunk_images=3, key_from=str(tmp_path / "one"))
  a, b = tree_files(str(tmp_path / "one")), tree_files(str(tmp_path / "eight"))
  assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)
  records = [json.loads(l) for l in a["synthetic/selection.jsonl"].decode().splitlines()]
  outcomes = {r["outcome"] for r in records}
  assert sel.REJECTED in outcomes and sel.KEPT in outcomes


def test_source_paths_never_name_an_output_file(tmp_path):
  """An absolute or `..` source path made select write (and overwrite) files outside the workdir;
  released names no longer come from source paths."""
  train = toy_train(n_patients=2, scans=2)
  victim = tmp_path / "user" / "original.png"
  os.makedirs(victim.parent)
  victim.write_bytes(b"the user's scan")
  train["path"] = [str(victim), "../../escape.png", "images/../../../up.png", "images/P001_001.png"]
  inputs = make_inputs(train, copying_generator(train, lambda g: 0.0))
  workdir = tmp_path / "work" / "run"
  run_selection(str(workdir), inputs, RULE, chunk_images=2)
  assert victim.read_bytes() == b"the user's scan"
  outside = [os.path.join(base, f) for base, _, files in os.walk(tmp_path) for f in files
             if not os.path.join(base, f).startswith(str(workdir) + os.sep)]
  assert outside == [str(victim)]


# ------------------------------------------------------------------ k per real image, k-anonymous conditions

def test_per_real_releases_k_distinct_unlinked_images_per_real_one(tmp_path):
  """select.per_real = k: every real image that gets k survivors over its rounds has exactly k
  released images, all distinct, none linked to any training patient by an independent float64
  search; the release holds k x the accepted real images (counted from the files)."""
  train = toy_train()
  tau, k = 0.9, 3
  inputs = make_inputs(train, copying_generator(train, lambda g: 0.5), tau)
  rule = sel.SelectionRule(n_candidates=4, guidance=1.0, guidance_step=0.0, guidance_floor=1.0,
                           max_rounds=6, second=False, per_real=k)
  run_selection(str(tmp_path), inputs, rule, chunk_images=5)
  records = [json.loads(l) for l in open(tmp_path / "synthetic" / "selection.jsonl")]
  check = brute_force_search(inputs.real_embeddings, inputs.patients, tau)
  n_images = len(train["path"])
  survivors = np.zeros(n_images, int)
  for r in records:  # every candidate regenerated from its seed and searched again
    image = inputs.generate(np.array([r["seed"]]), inputs.conditions[[r["index"]]], np.ones(1))
    survivors[r["index"]] += int(check(inputs.embed(image))[0][0] == 0)
  assert (survivors >= k).all(), "the toy should give every image k survivors within its rounds"
  released = synthetic_set.load_released(str(tmp_path))
  assert len(released["paths"]) == k * n_images
  assert np.bincount(released["source_index"], minlength=n_images).tolist() == [k] * n_images
  flat = released["images"].reshape(len(released["paths"]), -1)
  assert len({row.tobytes() for row in flat}) == len(flat)  # all distinct
  assert (check(inputs.embed(released["images"]))[0] == 0).all()  # none linked to a patient
  # an image leaves the rounds once it has k: no round after the one that completed it
  for i in range(n_images):
    mine = [r for r in records if r["index"] == i]
    done = max(r["round"] for r in mine if r["rank"] >= 0)
    assert max(r["round"] for r in mine) == done
    assert sorted(r["rank"] for r in mine if r["rank"] >= 0) == list(range(k))
  with pytest.raises(UserError, match="per_real"):
    sel.SelectionRule(4, 1.0, 0.0, 1.0, 2, True, per_real=2).validate()


def test_anonymous_conditions_are_the_mean_of_k_other_patients_with_the_same_findings():
  rng = np.random.default_rng(5)
  n_patients, scans, dim, k = 12, 3, 6, 3
  patients = np.repeat(np.arange(n_patients), scans)
  cond = rng.normal(size=(len(patients), dim)).astype(np.float32)
  cond /= np.linalg.norm(cond, axis=1, keepdims=True)
  labels = np.zeros((len(patients), 8), np.float32)
  finding = rng.integers(0, 2, len(patients))  # two findings groups of many patients ...
  finding[:2] = 7                              # ... and one of a single patient: any findings
  labels[np.arange(len(patients)), finding] = 1
  ours = sel.anonymous_conditions(cond, labels, patients, k)
  for i in range(len(patients)):  # brute force: rank images by similarity, first per patient
    same = [j for j in range(len(patients)) if (labels[j] == labels[i]).all()]
    pool = same if len({patients[j] for j in same} - {patients[i]}) >= k else range(len(patients))
    order = sorted(pool, key=lambda j: -float(cond[i].astype(np.float64) @ cond[j]))
    picked, seen = [], {patients[i]}
    for j in order:
      if patients[j] not in seen:
        picked.append(j)
        seen.add(patients[j])
    mean = cond[picked[:k]].astype(np.float64).mean(axis=0)
    T.assert_close(ours[i], mean / np.linalg.norm(mean), T.reduction_rtol(k * dim))


def test_cond_k_is_refused_before_any_work_without_feature_conditions():
  from pso_jax.stages import checks
  config = load_config("tiny")
  config.select.cond_k = 2
  checks.check_config(config, ["select"])
  config.model.cond = "class"
  with pytest.raises(UserError, match="cond_k=2 averages feature conditions"):
    checks.check_config(config, ["select"])
  config.model.cond, config.select.cond_k = "pseudo", -1
  with pytest.raises(UserError, match="cond_k=-1 must be an integer >= 0"):
    checks.check_config(config, ["select"])


def test_max_real_selects_for_a_seeded_subset_only():
  """select.max_real: a sorted, duplicate-free random subset (numpy's own draw, same seed), every
  image when 0 or at least the split; run_chunks samples for those images only, chunk by chunk."""
  want = np.sort(np.random.default_rng([7, 0x5E1EC7]).choice(18, 6, replace=False))
  np.testing.assert_array_equal(sel.real_indices(18, 6, 7), want)
  assert len(set(want)) == 6 and list(want) == sorted(want)
  assert not np.array_equal(sel.real_indices(18, 6, 8), want)  # the seed moves it
  for everything in (0, 18, 40):
    np.testing.assert_array_equal(sel.real_indices(18, everything, 7), np.arange(18))
  with pytest.raises(UserError, match="max_real=-1 must be >= 0"):
    sel.real_indices(18, -1, 7)
  train = toy_train()
  inputs = make_inputs(train, copying_generator(train, lambda g: 0.3))
  subset = sel.real_indices(len(train["path"]), 6, 7)
  seen = []
  counting = dict(vars(inputs))
  counting["generate"] = lambda s, c, g: seen.extend(np.asarray(s) // RULE.n_candidates) or \
      inputs.generate(s, c, g)
  stats = sel.run_chunks(sel.SelectionInputs(**counting), RULE, "/nonexistent", 4, real=subset)
  assert len(stats) == 2  # 6 images in chunks of 4
  assert sorted(set(int(i) % len(train["path"]) for i in seen)) == subset.tolist()

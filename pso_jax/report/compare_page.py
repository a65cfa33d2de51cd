"""compare.html and its figures: the comparison's numbers (compare.json, `report.comparison`) as
one page, utility and leakage side by side for every method and release."""

import os

import numpy as np

from pso_jax import io_utils
from pso_jax.report import comparison, figures, html

FIG = {"tradeoff": "compare/utility_vs_leakage.png", "per_class": "compare/auroc_per_class.png",
       "sweep": "compare/guidance_sweep.png", "images": "compare/released_images.png"}


def _label(row: dict) -> str:
  return f"{row['method']} ({row['release']})"


def _verdict(row: dict) -> str:
  v = row["audit_verdict"]
  out = html.verdict(None if v is None else v == "pass", "pass", "FAIL")
  d = row["audit_decided_by"]
  if d:
    out += f" <span class='muted'>({html.esc(d['attacker'])} {html.esc(d['test'])}, p = {d['p']:.2g})</span>"
  return out


def _main_table(result: dict) -> str:
  rows = []
  for r in result["rows"]:
    rows.append([
        html.esc(r["title"]), html.esc(r["release"]), html.fmt(r["released"]),
        html.fmt_ci(r["mean_auroc"], r["mean_auroc_ci"]),
        html.fmt_ci(r["auroc_gap"], r["auroc_gap_ci"]),
        html.fmt(r["frechet_distance"], 4), html.fmt(r["image_retrieval_score"]),
        html.fmt(r["first_round_rejection_rate"]), html.fmt(r["memorisation_1to1"]),
        _verdict(r), f"{html.fmt(r['dcr_share'])} / {html.fmt(r['dcr_control_share'])}",
        html.fmt(r["seconds"], 0)])
  real = result["rows"][0] if result["rows"] else {}
  rows.append(["real training data", "", "", html.fmt_ci(real.get("real_mean_auroc"),
                                                         real.get("real_mean_auroc_ci")),
               "0", html.fmt(real.get("frechet_distance_real"), 4),
               html.fmt(real.get("image_retrieval_score_real")), "", "", "", "", ""])
  spaces = sorted({str(r["diversity_space"]) for r in result["rows"]})
  note = (f"<p class='muted'>Fréchet distance and image retrieval score measured in: "
          f"{html.esc(', '.join(spaces))}.</p>" if spaces else "")
  return note + html.table(
      ["method", "release", "images", "mean AUROC [95% CI]", "gap to real [95% CI]",
       "Fréchet distance", "image retrieval score", "first-round rejection", "1:1 memorisation",
       "audit verdict (independent attackers)", "DCR share / control", "wall s"], rows, left_cols=2)


def _per_class_table(result: dict, findings) -> str:
  rows = []
  for r in result["rows"]:
    rows.append([html.esc(_label(r))]
                + [html.fmt_ci(r["per_class"][f]["auroc"], r["per_class"][f]["ci"])
                   + f"<br><span class='muted'>gap {html.fmt(r['per_class'][f]['gap'])}</span>"
                   for f in findings])
  if result["rows"]:
    first = result["rows"][0]["per_class"]
    rows.append(["real training data"] + [html.fmt_ci(first[f]["real"], first[f]["real_ci"])
                                          for f in findings])
  return html.table(["method (release)"] + list(findings), rows)


def _sweep_section(sweep: dict) -> str:
  rows = [[html.fmt(p["guidance"], 2), html.fmt_ci(p["mean_auroc"], p["mean_auroc_ci"]),
           html.fmt_ci(p["auroc_gap"], p["auroc_gap_ci"]), html.fmt(p["frechet_distance"], 4),
           html.fmt(p["image_retrieval_score"]), html.fmt(p["first_round_rejection_rate"]),
           html.fmt(p["memorisation_1to1"]), html.fmt(p["seconds"], 0)] for p in sweep["points"]]
  return (f"<p>{html.esc(sweep['title'])}: one trained model, an unselected release (one sample "
          "per training image, nothing rejected) per guidance value g, each evaluated. Without "
          "selection, g is the only thing that changes: selection would lower g in its retries "
          "and pick among candidates.</p>"
          + html.figure(FIG["sweep"], "mean AUROC, Fréchet distance, image retrieval score and "
                        "the share the re-id model links to a training patient, against g")
          + html.table(["g", "mean AUROC [95% CI]", "gap to real", "Fréchet distance",
                        "image retrieval score", "linked by re-id (first-round rejection)",
                        "1:1 memorisation", "wall s"], rows))


def _timings_table(result: dict) -> str:
  runs = [("shared stages (once)", result["shared"]["timings"])]
  runs += [(_label(r), r["timings"]) for r in result["rows"]]
  if result.get("sweep"):
    runs += [(f"sweep g = {p['guidance']:g}", p["timings"]) for p in result["sweep"]["points"]]
  stages_seen = []
  for _, t in runs:
    stages_seen += [s for s in t if s not in stages_seen]
  rows = [[html.esc(name)] + [html.fmt(t.get(s), 1) if s in t else "" for s in stages_seen]
          + [html.fmt(sum(t.values()), 1)] for name, t in runs]
  return html.table(["run"] + stages_seen + ["total"], rows)


def _methods_table(result: dict) -> str:
  rows = []
  for m in result["methods"]:
    links = " · ".join(f'<a href="{html.esc(w)}/report.html">{html.esc(kind)}</a>'
                       for kind, w in m["workdirs"].items())
    overrides = ", ".join(f"{k}={v!r}" for k, v in m["overrides"].items()) or "(none)"
    rows.append([html.esc(m["title"]), html.esc(m["name"]), html.esc(m["what"]),
                 f"<code>{html.esc(overrides)}</code>", links])
  return html.table(["method", "name", "what", "config overrides", "reports"], rows, left_cols=4)


def tradeoff_points(rows: list) -> list:
  """Utility against leakage, one point per release: x is the independent audit's DCR excess (the
  headline attacker's share of released images nearer a training image than any holdout image,
  minus the same share for real holdout images; None without a DCR test), not selection's own
  re-id rate, which at a strict threshold is near 1 for every method and does not separate them."""
  marker = {"selected": "o", "unselected": "s"}
  points = []
  for r in rows:
    share, control = r["dcr_share"], r["dcr_control_share"]
    excess = None if share is None or control is None else share - control
    points.append((f"{_label(r)}: {r['audit_verdict']}", excess, r["mean_auroc"],
                   r["mean_auroc_ci"], marker[r["release"]]))
  return points


def write_figures(workdir: str, result: dict, findings, released: dict) -> None:
  """The page's PNGs under <workdir>/compare/; released: row label -> uint8 images to show."""
  os.makedirs(os.path.join(workdir, comparison.FIG_DIR), exist_ok=True)
  path = lambda name: os.path.join(workdir, FIG[name])
  rows = result["rows"]
  real = rows[0]["real_mean_auroc"] if rows else None
  figures.labelled_points(
      tradeoff_points(rows), path("tradeoff"),
      "audit: headline attacker's DCR share nearer training minus its control's (0: no leak)",
      "mean AUROC on real test (classifier trained on the release)",
      None if real is None else ("trained on real", real))
  # the selected releases only (the table has every row): ten series would hide the bars
  series = {r["title"]: [r["per_class"][f]["auroc"] for f in findings] for r in rows
            if r["release"] == "selected"}
  if rows:
    series["real training data"] = [rows[0]["per_class"][f]["real"] for f in findings]
  figures.auroc_bars(list(findings), series, path("per_class"))
  sweep = result.get("sweep")
  if sweep:
    pts = sweep["points"]
    g = [p["guidance"] for p in pts]
    col = lambda k: [p[k] for p in pts]
    figures.metric_panels(g, [
        ("mean AUROC", {"synthetic": (col("mean_auroc"), col("mean_auroc_ci"))},
         None if real is None else ("real", real)),
        ("Fréchet distance to train", {"synthetic": (col("frechet_distance"), None)}, None),
        ("image retrieval score", {"synthetic": (col("image_retrieval_score"), None)}, None),
        ("linked by re-id", {"synthetic": (col("first_round_rejection_rate"), None)}, None),
    ], path("sweep"), "guidance g")
  if released:
    figures.image_rows(released, path("images"), max_cols=8)


def render(result: dict, findings) -> str:
  body = html.section("Utility and leakage, side by side", (
      "<p>Each method trained once and released twice: <b>selected</b> (candidates the re-id model "
      "links to any training patient rejected, the most label-consistent survivor kept) and "
      "<b>unselected</b> (one sample per training image, nothing rejected). Utility: a classifier "
      "trained on the release, tested on the real test set, against the same recipe trained on "
      "real images (gap: paired bootstrap). Leakage: the share of candidates selection's re-id "
      "model links to a training patient (for unselected releases: of the released images), the "
      "1:1 memorisation rate (a candidate matching its own source image), and the audit's verdict "
      "from attackers selection never used (PSO and distance to closest record, Holm).</p>"
      + _main_table(result)
      + html.figure(FIG["tradeoff"], "utility against leakage (the audit's DCR excess over "
                                     "its control): circles selected, squares unselected "
                                     "releases")))
  body += html.section("Per-finding AUROC [95% CI] and gap to real",
                       html.figure(FIG["per_class"], "per-finding AUROC on the real test set, "
                                   "selected releases")
                       + _per_class_table(result, findings))
  if result.get("sweep"):
    body += html.section("Guidance sweep", _sweep_section(result["sweep"]))
  if result.get("figures", {}).get("images"):
    body += html.section("Released images", html.figure(
        FIG["images"], "the same training images' synthetic counterparts, one row per release"))
  body += html.section("Methods", _methods_table(result))
  body += html.section("Wall time per stage (seconds, all invocations)", _timings_table(result))
  return html.page("pso_jax: the paper's comparison",
                   f"{result['variant'] or 'reference recipe'} · {result['generated']} · "
                   f"{result['workdir']}", body)


def write(workdir: str, result: dict, findings, released: dict) -> None:
  write_figures(workdir, result, findings, released)
  io_utils.write_text(os.path.join(workdir, comparison.PAGE_FILE), render(result, findings))


def released_rows(release_dirs: dict, count: int = 8) -> dict:
  """label -> the synthetic images of the same `count` training images in every release
  (those all releases hold), for the page's image figure."""
  from pso_jax.data import release
  loaded = {label: release.load_released(w) for label, w in release_dirs.items()}
  if not loaded:
    return {}
  common = set.intersection(*(set(v["source_index"].tolist()) for v in loaded.values()))
  pick = sorted(common)[:: max(1, len(common) // count)][:count]
  out = {}
  for label, v in loaded.items():
    first = {}
    for k, s in enumerate(v["source_index"].tolist()):
      first.setdefault(s, k)
    out[label] = np.stack([v["images"][first[s]] for s in pick]) if pick else v["images"][:0]
  return out

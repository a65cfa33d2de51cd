"""The run's report: the numbers a person reads first (results.json) and one page (report.html) with
its figures, made only from what the stages wrote (it trains and samples nothing).
"""

import json
import os
import time

import numpy as np

from pso_jax import io_utils, workdir as workdir_lib
from pso_jax.report import audit_report, figures, html

SUBDIR = "report"          # figures; report.html and results.json sit at the workdir root
REPORT_FILE = "report.html"
# results.json's sections, each the result of one stage (by its mode in the stage table)
SECTIONS = {"data": "prepare", "diffusion": "train", "reid": "train_reid",
            "classifier": "train_classifier", "selection": "select", "audit": "audit",
            "evaluate": "evaluate"}
FIG = {"auroc": "report/auroc_per_class.png", "loss": "report/loss_curves.png",
       "samples": "report/real_vs_synthetic.png"}


def _read(workdir, rel):
  path = os.path.join(workdir, rel)
  return io_utils.read_json(path) if os.path.exists(path) else None


def _jsonl(path):
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def dig(d, *keys):
  """d[k0][k1]... or None where a key (or a dict on the way) is missing."""
  for k in keys:
    if not isinstance(d, dict) or k not in d:
      return None
    d = d[k]
  return d


def timings(workdir: str) -> dict:
  """Wall seconds spent per stage, summed over every invocation (resumed runs included)."""
  out = {}
  for row in _jsonl(os.path.join(workdir, "timings.jsonl")):
    out[row["stage"]] = out.get(row["stage"], 0.0) + float(row["seconds"])
  return out


def headline(r: dict) -> dict:
  """The numbers a reader compares across runs, flat and JSON-ready."""
  util = dig(r, "evaluate", "utility") or {}
  real, syn = dig(util, "models", "real") or {}, dig(util, "models", "synthetic") or {}
  audit = dig(r, "audit", "summary") or {}
  irs = dig(r, "evaluate", "diversity", "image_retrieval") or {}
  sel = r.get("selection") or {}
  risk = audit.get("residual_risk") or {}
  return {
      "real_mean_auroc": real.get("mean_auroc"), "real_mean_auroc_ci": real.get("mean_auroc_ci"),
      "synthetic_mean_auroc": syn.get("mean_auroc"),
      "synthetic_mean_auroc_ci": syn.get("mean_auroc_ci"),
      "auroc_gap": dig(util, "difference", "value"), "auroc_gap_ci": dig(util, "difference", "ci"),
      "within_one_point": util.get("within_one_point"),
      "pso_attack": dig(audit, "attack", "value"),
      "pso_attack_ci": [dig(audit, "attack", "low"), dig(audit, "attack", "high")],
      "pso_control": dig(audit, "control", "value"),
      "pso_control_ci": [dig(audit, "control", "low"), dig(audit, "control", "high")],
      "pso_residual_risk": risk.get("value"), "pso_residual_risk_ci": [risk.get("low"), risk.get("high")],
      "pso_verdict": audit.get("verdict"), "pso_verdict_rule": audit.get("verdict_rule"),
      "audit_headline_attacker": audit.get("headline_attacker"),
      "audit_decided_by": audit.get("decided_by"),
      "dcr_share": dig(audit, "dcr", "share"),
      "dcr_control_share": dig(audit, "dcr", "control_share"),
      "irs_synthetic": dig(irs, "synthetic", "share"), "irs_real": dig(irs, "real", "share"),
      "irs_ratio": irs.get("ratio"),
      "diversity_space": dig(r, "evaluate", "diversity", "feature_space"),
      "frechet_synthetic_train": dig(r, "evaluate", "diversity", "frechet_synthetic_train"),
      "frechet_real_train": dig(r, "evaluate", "diversity", "frechet_real_train"),
      "memorisation_1to1_before_selection": sel.get("one_to_one_memorisation_rate"),
      "first_round_rejection_rate": sel.get("first_round_rejection_rate"),
      "reid_auc": dig(r, "reid", "auc"), "reid_tau": dig(r, "reid", "tau"),
  }


def collect(workdir: str, files: dict) -> dict:
  """Every number of the run: files maps a section of results.json (data, diffusion, reid,
  classifier, selection, audit, evaluate) to the stage result it is read from (relative path)."""
  r = {"workdir": os.path.abspath(workdir), "generated": time.strftime("%Y-%m-%d %H:%M:%S UTC",
                                                                        time.gmtime())}
  r["config"] = _read(workdir, workdir_lib.CONFIG_FILE)
  for section, rel in files.items():
    if section == "audit":  # not the per-image evidence
      audit = _read(workdir, rel) or {}
      r["audit"] = {k: audit.get(k) for k in ("summary", "meta", "canaries") if k in audit}
    else:
      r[section] = _read(workdir, rel)
  r["timings"] = timings(workdir)
  r["headline"] = headline(r)
  return r


# ------------------------------------------------------------------ figures

def loss_figure(metrics_path: str, path: str) -> None:
  """The diffusion training loss from the train stage's metrics.jsonl."""
  rows = [x for x in _jsonl(metrics_path) if "loss" in x]
  curves = {"diffusion (EDM2 loss)": ([x["step"] for x in rows], [x["loss"] for x in rows])}
  figures.loss_curves(curves, path)


def auroc_figure(r: dict, path: str) -> None:
  util = dig(r, "evaluate", "utility") or {}
  findings = util.get("findings") or list(r["config"]["data"]["findings"])
  series = {}
  for name in ("real", "synthetic"):
    per_class = dig(util, "models", name, "per_class") or {}
    series[f"trained on {name}"] = [
        v["auroc"] if isinstance(v.get("auroc"), float) else None
        for v in (per_class.get(f, {}) for f in findings)]
  figures.auroc_bars(findings, series, path)


def samples_figure(workdir: str, path: str, n: int) -> None:
  """Released synthetic images above the real training images that conditioned them."""
  from pso_jax.data import release as synthetic_set
  from pso_jax.data import dataset
  released = synthetic_set.load_released(workdir)
  train = dataset.load_split(workdir, "train")
  pick = np.linspace(0, len(released["images"]) - 1, min(n, len(released["images"]))).astype(int)
  real = np.stack([train[int(released["source_index"][i])]["image"] for i in pick])
  figures.image_rows({"real (conditioning image)": real,
                      "synthetic (released)": released["images"][pick]}, path, max_cols=n)


# ------------------------------------------------------------------ page

def _rate(v, ci, digits=3):
  return html.fmt_ci(v, ci, digits)


def _attacker(h: dict) -> str:
  name = h.get("audit_headline_attacker")
  return f" (attacker {html.esc(name)})" if name else ""


def _space(h: dict) -> str:
  """Which feature space the diversity numbers were computed in (evaluate's feature_space)."""
  name = h.get("diversity_space")
  return f" (in {html.esc(name)} space)" if name else ""


def _decided_by(h: dict) -> str:
  d = h.get("audit_decided_by")
  return (f" decided by the {html.esc(d['attacker'])} attacker's {html.esc(d['test'])} test "
          f"(p = {d['p']:.2g})") if d else ""


def _headline_rows(h: dict) -> list:
  return [
      ["mean AUROC, classifier trained on real", _rate(h["real_mean_auroc"], h["real_mean_auroc_ci"])],
      ["mean AUROC, classifier trained on synthetic",
       _rate(h["synthetic_mean_auroc"], h["synthetic_mean_auroc_ci"])],
      ["gap synthetic - real (target: within one point)",
       _rate(h["auroc_gap"], h["auroc_gap_ci"]) + " "
       + html.verdict(h["within_one_point"], "within one point", "more than one point below")],
      ["privacy verdict (independent attackers)",
       html.verdict(None if h["pso_verdict"] is None else h["pso_verdict"] == "pass", "PASS", "FAIL")
       + _decided_by(h) + f" <span class='muted'>({html.esc(h['pso_verdict_rule'])})</span>"],
      [f"PSO attack rate (released images that single out){_attacker(h)}",
       _rate(h["pso_attack"], h["pso_attack_ci"])],
      ["PSO control rate (holdout images, chance)", _rate(h["pso_control"], h["pso_control_ci"])],
      ["PSO residual risk", _rate(h["pso_residual_risk"], h["pso_residual_risk_ci"])],
      [f"DCR: share nearer training than holdout, released / control{_attacker(h)}",
       f"{html.fmt(h.get('dcr_share'))} / {html.fmt(h.get('dcr_control_share'))}"],
      [f"image retrieval score: synthetic / real test / ratio{_space(h)}",
       f"{html.fmt(h['irs_synthetic'])} / {html.fmt(h['irs_real'])} / {html.fmt(h['irs_ratio'])}"],
      [f"Fréchet distance to train: synthetic / real test{_space(h)}",
       f"{html.fmt(h['frechet_synthetic_train'], 4)} / {html.fmt(h['frechet_real_train'], 4)}"],
      ["1:1 memorisation rate of candidates (before selection)",
       html.fmt(h["memorisation_1to1_before_selection"])],
      ["first-round rejection rate (linked to any training patient)",
       html.fmt(h["first_round_rejection_rate"])],
      ["re-identification AUC (held-out patients) / tau", f"{html.fmt(h['reid_auc'])} / "
                                                          f"{html.fmt(h['reid_tau'])}"],
  ]


def _per_class_table(r: dict) -> str:
  util = dig(r, "evaluate", "utility") or {}
  rows = []
  for f in util.get("findings", []):
    cells = [html.esc(f)]
    for name in ("real", "synthetic"):
      v = dig(util, "models", name, "per_class", f) or {}
      cells.append(_rate(v.get("auroc"), v.get("ci")) if isinstance(v.get("auroc"), float)
                   else "undefined")
    cells.append(str(dig(util, "models", "real", "per_class", f, "positives")))
    rows.append(cells)
  notes = "".join(f"<p class='muted'>{html.esc(n)}</p>" for n in util.get("notes", []))
  return html.table(["finding", "trained on real", "trained on synthetic", "test positives"],
                    rows) + notes


def _selection_table(sel: dict) -> str:
  keys = ["train_images", "candidates", "n_candidates", "first_round_rejection_rate",
          "rejection_rate", "retries_histogram", "skipped_images", "released",
          "one_to_one_memorisation_rate", "missed_by_one_to_one_rate", "tau"]
  rows = [[html.esc(k), html.esc(html.fmt(sel.get(k)))] for k in keys if k in sel]
  rows.append(["candidates per second", html.fmt(dig(sel, "throughput", "candidates_per_s"), 2)])
  return html.table(["", "value"], rows)


def _compare_section(r: dict, other: dict, other_dir: str) -> str:
  h, o = r["headline"], other["headline"]
  rows = [[html.esc(k), html.esc(html.fmt(h.get(k))), html.esc(html.fmt(o.get(k)))]
          for k in h if not k.endswith("_ci") and k != "pso_verdict_rule"]
  diff = workdir_lib._differences(workdir_lib._strip_runtime(other["config"] or {}),
                                  workdir_lib._strip_runtime(r["config"] or {}))
  return (html.table(["", "this run", f"other: {other_dir}"], rows)
          + "<p>Config fields that differ (other -> this):</p><pre>"
          + html.esc("\n".join(diff) or "(none)") + "</pre>")


def render(r: dict, compare: tuple | None = None, audit_dir: str = "audit") -> str:
  """report.html; audit_dir: the audit stage's folder (its page and figures are linked)."""
  cfg = r["config"] or {}
  body = html.section("Headline", html.table(["", "value [95% CI]"], _headline_rows(r["headline"]),
                                             left_cols=1))
  if compare:
    body += html.section("Side by side", _compare_section(r, *compare))
  body += html.section("Utility: per-class AUROC on the real test set",
                       html.figure(FIG["auroc"], "per-class AUROC, real vs synthetic training")
                       + _per_class_table(r))
  body += html.section("Real vs synthetic samples",
                       html.figure(FIG["samples"], "top: real training images; bottom: the "
                                                   "synthetic image released for each"))
  body += html.section("Selection", _selection_table(r.get("selection") or {}))
  body += html.section("Privacy audit", (
      f"<p>Full audit with figures and per-image evidence: <a href=\"{audit_dir}/audit.html\">"
      f"{audit_dir}/audit.html</a>.</p>"
      + html.figure(f"{audit_dir}/{audit_report.FIGURES['hist']}",
                    "nearest-neighbour similarity, tau marked")
      + html.figure(f"{audit_dir}/{audit_report.FIGURES['flag_rate']}",
                    "share with a training match vs threshold")))
  body += html.section("Training", html.figure(FIG["loss"], "diffusion training loss")
                       + html.table(["model", "figure"], [
                           ["re-identification (held-out patients)",
                            f"AUC {html.fmt_ci(dig(r, 'reid', 'auc'), dig(r, 'reid', 'auc_ci'))}"],
                           ["finding classifier (real)",
                            f"mean AUROC {html.fmt(dig(r, 'classifier', 'models', 'real', 'mean_auroc'))}"]]))
  t = r["timings"]
  body += html.section("Timings (wall seconds per stage, all invocations)", html.table(
      ["stage", "seconds"], [[html.esc(k), html.fmt(v, 1)] for k, v in t.items()]
      + [["total", html.fmt(sum(t.values()), 1)]]))
  body += html.section("Config", "<pre>" + html.esc(json.dumps(cfg, indent=1)) + "</pre>")
  return html.page("pso_jax run report",
                   f"{cfg.get('variant') or 'reference recipe'} · dataset "
                   f"{dig(cfg, 'data', 'name')} · {r['generated']} · {r['workdir']}", body)

"""The audit's files: audit.json (summary + per-sample evidence), PNG figures and audit.html."""

import os

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pso_jax import io_utils  # noqa: E402
from pso_jax.report import html  # noqa: E402

FIGURES = {"hist": "nn_similarity.png", "flag_rate": "flag_rate_vs_tau.png",
           "gallery": "most_similar_pairs.png"}


def _save(fig, path: str) -> None:
  with io_utils.atomic_path(path) as tmp:
    fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
  plt.close(fig)


def _curves(arrays: dict):
  return {"synthetic -> train": arrays["synthetic_nn"], "holdout -> train": arrays["holdout_nn"],
          "train -> train (other patients)": arrays["train_other_nn"]}


def similarity_histograms(arrays: dict, tau: float, path: str) -> None:
  curves = {k: np.asarray(v) for k, v in _curves(arrays).items() if len(v)}
  lo = min(float(v.min()) for v in curves.values())
  hi = max(float(v.max()) for v in curves.values())
  bins = np.linspace(min(lo, tau) - 1e-3, max(hi, tau) + 1e-3, 50)
  fig, ax = plt.subplots(figsize=(6.4, 3.6))
  for name, v in curves.items():
    ax.hist(v, bins=bins, density=True, histtype="step", lw=1.5, label=f"{name} (n={len(v)})")
  ax.axvline(tau, color="k", ls="--", lw=1, label=f"tau = {tau:.3f}")
  ax.set_xlabel("nearest-neighbour similarity")
  ax.set_ylabel("density")
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  _save(fig, path)


def flag_rate_curve(arrays: dict, tau: float, path: str) -> None:
  """Share of queries whose nearest training image reaches t, as t varies around tau."""
  curves = {k: np.sort(np.asarray(v)) for k, v in _curves(arrays).items() if len(v)}
  lo = min(float(v[0]) for v in curves.values())
  t = np.linspace(min(lo, tau - 0.1), 1.0, 200)
  fig, ax = plt.subplots(figsize=(6.4, 3.6))
  for name, v in curves.items():
    ax.plot(t, 1 - np.searchsorted(v, t, side="left") / len(v), label=name)
  ax.axvline(tau, color="k", ls="--", lw=1, label=f"tau = {tau:.3f}")
  ax.set_xlabel("threshold t")
  ax.set_ylabel("share with a training match at sim >= t")
  ax.set_yscale("symlog", linthresh=1e-3)
  ax.set_ylim(0, 1.05)
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  _save(fig, path)


def gallery(audited, train_images, evidence, n: int, path: str) -> list:
  """The n audited images most similar to a training image, each beside that image."""
  order = np.argsort([-e["similarity"] for e in evidence], kind="stable")[:n]
  fig, axes = plt.subplots(2, len(order), figsize=(1.5 * len(order), 3.4), squeeze=False)
  for c, i in enumerate(order):
    e = evidence[i]
    for r, img in enumerate((audited[i], train_images[e["nearest_train_index"]])):
      ax = axes[r][c]
      ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=255)
      ax.set_xticks([])
      ax.set_yticks([])
      if e["singles_out"] and r == 0:
        for side in ax.spines.values():
          side.set_edgecolor("red")
          side.set_linewidth(2)
    axes[0][c].set_title(f"#{i}  {e['similarity']:.3f}", fontsize=7)
    axes[1][c].set_title(f"patient {e['nearest_patient']}"[:18], fontsize=7)
  axes[0][0].set_ylabel("audited", fontsize=8)
  axes[1][0].set_ylabel("nearest real", fontsize=8)
  _save(fig, path)
  return [int(i) for i in order]


def _rate_row(name, rate):
  return [name, html.fmt(rate["value"]), html.fmt_ci(rate["center"], [rate["low"], rate["high"]]),
          f"{rate['successes']} / {rate['n']}"]


def page(result: dict, shown: list) -> str:
  s, m = result["summary"], result["meta"]
  risk = s["residual_risk"]
  rows = [_rate_row("attack: released images that single out", s["attack"]),
          _rate_row("control: holdout images that single out", s["control"]),
          _rate_row("released images re-identified (>= 1 patient)", s["reidentified"]["attack"]),
          _rate_row("holdout images re-identified", s["reidentified"]["control"])]
  if s.get("memorisation_1to1"):
    rows.append(_rate_row("1:1 memorisation (vs conditioning image)", s["memorisation_1to1"]))
  body = html.section("Verdict", (
      f"<p>{html.verdict(s['verdict'] == 'pass', 'PASS', 'FAIL')} &nbsp; residual risk "
      f"{html.fmt_ci(risk['value'], [risk['low'], risk['high']])} ({html.esc(s['verdict_rule'])}). "
      f"Cohen-Nissim baseline at the weight bound {html.fmt(s['weight_bound'], 5)}: "
      f"{html.fmt(s['baseline_at_weight_bound'])} (the chance that a fixed predicate of that "
      "weight isolates one training patient: why only predicates of negligible weight count, "
      "and why the control, not the baseline, is the reference).</p>"
      + "".join(f"<p class='muted'>{html.esc(w)}</p>" for w in s["warnings"])))
  body += html.section("Rates (Wilson 95% intervals)", html.table(
      ["", "rate", "centre [95% CI]", "count"], rows) + (
      "<p class='muted'>Each audited image s defines the predicate sim(s, z) &ge; tau in the "
      "re-identification embedding. It <b>singles out</b> when it matches exactly one training "
      "patient and the share of holdout patients it matches (its weight estimate) is below the "
      "weight bound. The <b>control</b> applies the same procedure to predicates built from real "
      "holdout images, which carry no information about the training set (weights estimated "
      "leaving their own patient out): it is the rate chance gives. Residual risk = (attack - "
      "control) / (1 - control), clipped to [0, 1].</p>"))
  if "canaries" in result:
    c = result["canaries"]
    body += html.section("Canaries", (
        f"<p>{html.verdict(c['all_flagged'], 'every canary flagged', 'canaries missed')}: "
        f"{c['named']} / {c['n']} named with their patient, {c['singled_out']} / {c['n']} "
        "singled out. A canary is flagged when the audit links it to a training patient and "
        "names its own; it singles out only when that patient is also the only one it matches.</p>"
        + html.table(
            ["kind", "planted", "named", "singled out"],
            [[k, v["n"], v["named"], v["singled_out"]] for k, v in c["by_kind"].items()])
        + html.table(
            ["row", "kind", "patient", "named", "singled out", "similarity"],
            [[r["position"], r["kind"], html.esc(r["patient"]), html.fmt(r["named"]),
              html.fmt(r["singled_out"]), html.fmt(r["similarity"])] for r in c["rows"][:50]])))
  body += html.section("Similarity to the nearest training image", (
      html.figure(FIGURES["hist"], "nearest-neighbour similarity, tau marked")
      + html.figure(FIGURES["flag_rate"], "share with a training match as a function of the threshold")
      + html.figure(FIGURES["gallery"], "most similar pairs (top: audited, red = singles out; "
                                        "bottom: nearest training image)")))
  flagged = [e for e in result["evidence"] if e["singles_out"]][:50]
  body += html.section(f"Images that single out a patient (first {len(flagged)})", html.table(
      ["#", "name", "patient", "similarity", "holdout matches", "weight"],
      [[e["index"], html.esc(e.get("name", "")), html.esc(e["nearest_patient"]),
        html.fmt(e["similarity"]), e["holdout_patients_matched"], html.fmt(e["weight_estimate"], 4)]
       for e in flagged]) if flagged else "<p>none</p>")
  meta_rows = [[html.esc(k), html.esc(v)] for k, v in sorted(m.items())
               if not isinstance(v, dict)]
  body += html.section("Run", html.table(["field", "value"], meta_rows, left_cols=2))
  return html.page("pso_jax privacy audit",
                   f"{m['n_audited']} audited images vs {m['n_train']} training images of "
                   f"{m['n_train_patients']} patients; tau = {m['tau']:.4f}", body)


def write(out_dir: str, result: dict, audited, train_images) -> None:
  os.makedirs(out_dir, exist_ok=True)
  arrays, tau = result["arrays"], result["meta"]["tau"]
  similarity_histograms(arrays, tau, os.path.join(out_dir, FIGURES["hist"]))
  flag_rate_curve(arrays, tau, os.path.join(out_dir, FIGURES["flag_rate"]))
  shown = gallery(audited, train_images, result["evidence"], result["meta"]["gallery"],
                  os.path.join(out_dir, FIGURES["gallery"]))
  io_utils.write_json(os.path.join(out_dir, "audit.json"),
                      {k: v for k, v in result.items() if k != "arrays"})
  io_utils.write_text(os.path.join(out_dir, "audit.html"), page(result, shown))

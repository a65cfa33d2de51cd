"""The audit's files: audit.json (the verdict, every attacker's figures and per-image evidence), PNG
figures and audit.html; audit_power's table and figure, shown in the same page.

audit.html is internal (it names training patients beside their nearest released images); what
leaves with the release is the card's aggregates (`data.release.add_audit`).
"""

import os

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pso_jax import io_utils  # noqa: E402
from pso_jax.report import html  # noqa: E402

FIGURES = {"hist": "nn_similarity.png", "flag_rate": "flag_rate_vs_tau.png", "dcr": "dcr.png",
           "power": "power.png"}
PAIRS = "closest_pairs_{}.png"   # per attacker
PAGE, RESULT = "audit.html", "audit.json"


def _save(fig, path: str) -> None:
  with io_utils.atomic_path(path) as tmp:
    fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
  plt.close(fig)


def _panels(names, height: float = 3.0, rows: int = 1):
  fig, axes = plt.subplots(rows, len(names), figsize=(4.2 * len(names), height * rows),
                           squeeze=False)
  return fig, axes


def _title(name: str) -> str:
  return "self-check (selection's model)" if name == "self_check" else f"attacker: {name}"


def _curves(arrays: dict) -> dict:
  return {"released -> train": arrays["synthetic_nn"], "holdout -> train": arrays["holdout_nn"],
          "train -> other patients": arrays["train_other_nn"]}


def _tau_panels(result: dict, path: str, draw, xlabel: str, ylabel: str = "") -> None:
  """One panel per attacker: draw(ax, its sorted nearest-training similarity curves, tau)."""
  names = list(result["attackers"])
  fig, axes = _panels(names)
  for ax, name in zip(axes[0], names):
    r = result["attackers"][name]
    tau = r["meta"]["tau"]
    draw(ax, {k: np.sort(np.asarray(v)) for k, v in _curves(r["arrays"]).items() if len(v)}, tau)
    ax.axvline(tau, color="k", ls="--", lw=1, label=f"tau {tau:.3f}")
    ax.set_title(_title(name), fontsize=9)
    ax.set_xlabel(xlabel)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel(ylabel)
  _save(fig, path)


def similarity_histograms(result: dict, path: str) -> None:
  """Per attacker: nearest-training similarity of released, holdout and training images, tau."""
  def draw(ax, curves, tau):
    lo, hi = min(v[0] for v in curves.values()), max(v[-1] for v in curves.values())
    bins = np.linspace(min(lo, tau) - 1e-3, max(hi, tau) + 1e-3, 40)
    for label, v in curves.items():
      ax.hist(v, bins=bins, density=True, histtype="step", lw=1.4, label=f"{label} ({len(v)})")
  _tau_panels(result, path, draw, "nearest-neighbour similarity", "density")


def flag_rate_curves(result: dict, path: str) -> None:
  """Per attacker: share of images with a training match at similarity >= t, around tau."""
  def draw(ax, curves, tau):
    t = np.linspace(min(min(float(v[0]) for v in curves.values()), tau - 0.1), 1.0, 200)
    for label, v in curves.items():
      ax.plot(t, 1 - np.searchsorted(v, t, side="left") / len(v), label=label)
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_ylim(0, 1.05)
  _tau_panels(result, path, draw, "threshold t", "share with a match at sim >= t")


def dcr_histograms(result: dict, path: str) -> None:
  """Per attacker: the released images' nearest training and nearest holdout similarities (top),
  and the margin nearest-training - nearest-holdout of released vs control images (bottom)."""
  names = list(result["attackers"])
  fig, axes = _panels(names, rows=2)
  for c, name in enumerate(names):
    r = result["attackers"][name]
    a, d = r["arrays"], r["dcr"]
    t, h = np.asarray(a["synthetic_nn"]), np.asarray(a["synthetic_holdout_nn"])
    ct, ch = np.asarray(a["holdout_nn"]), np.asarray(a["control_holdout_nn"])
    bins = np.linspace(min(t.min(), h.min()) - 1e-3, max(t.max(), h.max()) + 1e-3, 40)
    ax = axes[0][c]
    ax.hist(t, bins=bins, histtype="step", lw=1.4, label="nearest training")
    ax.hist(h, bins=bins, histtype="step", lw=1.4, label="nearest holdout")
    ax.set_title(f"{_title(name)}\ncloser to training: {d['share']:.3f} "
                 f"(control {d['control_share']:.3f})", fontsize=9)
    ax.set_xlabel("released image's similarity")
    ax.legend(fontsize=7)
    margins = {"released": t - h, "control (holdout)": ct - ch}
    lo = min(float(v.min()) for v in margins.values())
    hi = max(float(v.max()) for v in margins.values())
    bins = np.linspace(lo - 1e-3, hi + 1e-3, 40)
    ax = axes[1][c]
    for label, v in margins.items():
      ax.hist(v, bins=bins, density=True, histtype="step", lw=1.4, label=f"{label} ({len(v)})")
    ax.axvline(0, color="k", lw=0.8)
    ax.set_xlabel("nearest training - nearest holdout")
    ax.legend(fontsize=7)
  _save(fig, path)


def closest_pairs(images, train_images, holdout_images, res: dict, n: int, path: str) -> list:
  """The n released images nearest a training image, each above that image and its nearest
  holdout image (a leak looks like the top two rows, not like the top and bottom ones)."""
  ev = res["evidence"]
  order = np.argsort([-e["similarity"] for e in ev], kind="stable")[:n]
  fig, axes = plt.subplots(3, max(len(order), 1), figsize=(1.5 * max(len(order), 1), 5.0),
                           squeeze=False)
  for c, i in enumerate(order):
    e = ev[i]
    row_images = (images[i], train_images[e["nearest_train_index"]],
                  holdout_images[e["nearest_holdout_index"]])
    for r, img in enumerate(row_images):
      ax = axes[r][c]
      ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=255)
      ax.set_xticks([])
      ax.set_yticks([])
      if e["singles_out"] and r == 0:
        for side in ax.spines.values():
          side.set_edgecolor("red")
          side.set_linewidth(2)
    axes[0][c].set_title(f"#{i}", fontsize=7)
    # a patient id is text: a "$" in it must not start matplotlib's math mode
    axes[1][c].set_title(f"{e['similarity']:.3f} {e['nearest_patient']}"[:18], fontsize=7,
                         parse_math=False)
    axes[2][c].set_title(f"{e['holdout_similarity']:.3f}", fontsize=7)
  axes[0][0].set_ylabel("released", fontsize=8)
  axes[1][0].set_ylabel("nearest train", fontsize=8)
  axes[2][0].set_ylabel("nearest holdout", fontsize=8)
  _save(fig, path)
  return [int(i) for i in order]


# ----------------------------------------------------------------------------- the page

def _ci(rate: dict) -> str:
  return html.fmt_ci(rate["value"], [rate["low"], rate["high"]])


def _attacker_rows(rows: dict, rejected: dict) -> list:
  out = []
  for name, r in rows.items():
    risk = r["residual_risk"]
    out.append([html.esc(name), html.esc(r["what"]), html.fmt(r["tau"]),
                html.fmt_ci(r["dcr_share"], r["dcr_share_ci"]), html.fmt(r["dcr_binomial_p"], 4),
                html.fmt(r["dcr_control_share"]), html.fmt(r["dcr_p"], 4),
                _ci(r["attack"]), _ci(r["control"]),
                html.fmt_ci(risk["value"], [risk["low"], risk["high"]]), html.fmt(r["pso_p"], 4),
                html.fmt(r["risk_below_bound"]),
                html.esc(", ".join(rejected.get(name, [])) or "none")])
  return out


ATTACKER_HEADER = ["attacker", "space", "tau", "DCR share closer to train [95% CI]",
                   "binomial p (vs 0.5)", "control share", "DCR p (vs control)",
                   "PSO attack [CI]", "PSO control [CI]", "residual risk [CI]", "PSO p",
                   "risk below bound", "tests rejected (Holm)"]


def _decided(decided) -> str:
  return (f", decided by the <b>{html.esc(decided['attacker'])}</b> attacker's "
          f"{html.esc(decided['test'])} test (p = {decided['p']:.3g}, Holm-adjusted "
          f"{decided['p_holm']:.3g})" if decided else ": no independent attacker's test rejected")


def _verdict_section(s: dict) -> str:
  return html.section("Verdict", (
      f"<p>{html.verdict(s['verdict'] == 'pass', 'PASS', 'FAIL')}{_decided(s['decided_by'])}. "
      "Rule: "
      f"{html.esc(s['verdict_rule'])}, so a release that does not leak fails with probability at "
      f"most {s['test_size']:g}. Headline attacker: {html.esc(s['headline_attacker'])} (attack "
      f"{_ci(s['attack'])}, control {_ci(s['control'])}).</p>"
      "<p class='muted'>Each independent attacker has its own embedding space and its own tau, "
      "calibrated on val pairs without looking at the release. Its <b>PSO game</b> compares the "
      "share of released images whose predicate sim &ge; tau singles out one training patient "
      "(matches exactly one, and under the weight bound of holdout patients) with the same share "
      "for real holdout images (the control). Its <b>DCR test</b> compares the share of released "
      "images nearer a training image than any holdout image with the control's share (holdout "
      "images, own patient left out), errors clustered by patient. The binomial test against 0.5 "
      "is shown for reference only: real unseen images do not reach 0.5 exactly (audit_power "
      "measures how often it fires on them).</p>"
      + "".join(f"<p class='muted'>{html.esc(w)}</p>" for w in s["warnings"])))


def page(result: dict, power: dict | None = None) -> str:
  s, m = result["summary"], result["meta"]
  rejected = {}
  for t in s["tests"]:
    if t["rejected"]:
      rejected.setdefault(t["attacker"], []).append(t["test"])
  body = _verdict_section(s)
  body += html.section("Independent attackers", html.table(
      ATTACKER_HEADER, _attacker_rows(s["attackers"], rejected), left_cols=2) + html.table(
      ["attacker", "test", "p", "Holm-adjusted p", "rejected"],
      [[html.esc(t["attacker"]), html.esc(t["test"]), html.fmt(t["p"], 4),
        html.fmt(t["p_holm"], 4), html.fmt(t["rejected"])] for t in s["tests"]], left_cols=2))
  body += html.section("Self-check: selection's own re-id model (outside the verdict)", (
      "<p class='muted'>Selection rejected every candidate this model linked to a training "
      "patient, so it can pass by construction; it is shown to see how far the independent "
      "attackers see past it.</p>"
      + html.table(ATTACKER_HEADER, _attacker_rows(s["self_check"], {}), left_cols=2)))
  if s.get("memorisation_1to1"):
    body += f"<p>1:1 memorisation (self-check, each image vs its conditioning image): " \
            f"{_ci(s['memorisation_1to1'])}</p>"
  body += html.section("Distance to closest record", html.figure(
      FIGURES["dcr"], "top: each released image's nearest training and nearest holdout "
                      "similarity; bottom: the margin, released vs control"))
  body += html.section("Similarity to the nearest training image", (
      html.figure(FIGURES["hist"], "nearest-neighbour similarity per attacker, tau marked")
      + html.figure(FIGURES["flag_rate"], "share with a training match vs the threshold")))
  body += html.section("Released images closest to training", "".join(
      html.figure(PAIRS.format(name), f"{_title(name)}: released (red: singles out), nearest "
                                      "training image (similarity, patient), nearest holdout image")
      for name in result["attackers"]))
  if "canaries" in result:
    body += html.section("Canaries", "<p>Planted copies of training images, named with their "
                         "patient (linked to it at tau) and singled out, per attacker.</p>"
                         + html.table(["attacker", "planted", "named", "singled out", "all named"],
                                      [[html.esc(n), c["n"], c["named"], c["singled_out"],
                                        html.fmt(c["all_flagged"])]
                                       for n, c in result["canaries"].items()]))
  for name, r in result["attackers"].items():
    flagged = [e for e in r["evidence"] if e["singles_out"]][:20]
    if flagged:
      body += html.section(f"{_title(name)}: images that single out (first {len(flagged)})",
                           html.table(["#", "name", "patient", "similarity", "holdout matches",
                                       "weight"],
                                      [[e["index"], html.esc(e.get("name", "")),
                                        html.esc(e["nearest_patient"]), html.fmt(e["similarity"]),
                                        e["holdout_patients_matched"],
                                        html.fmt(e["weight_estimate"], 4)] for e in flagged]))
  if power is not None:
    body += power_section(power, os.path.join("..", power["folder"]))
  meta_rows = [[html.esc(k), html.esc(v)] for k, v in sorted(m.items()) if not isinstance(v, dict)]
  body += html.section("Run", html.table(["field", "value"], meta_rows, left_cols=2))
  return html.page("pso_jax privacy audit",
                   f"{m['n_audited']} audited images vs {m['n_train']} training images of "
                   f"{m['n_train_patients']} patients and {m['n_holdout']} holdout images; "
                   f"attackers {', '.join(m['independent'])} and the self-check", body)


def write(out_dir: str, result: dict, images, train: dict, holdout: dict) -> None:
  os.makedirs(out_dir, exist_ok=True)
  similarity_histograms(result, os.path.join(out_dir, FIGURES["hist"]))
  flag_rate_curves(result, os.path.join(out_dir, FIGURES["flag_rate"]))
  dcr_histograms(result, os.path.join(out_dir, FIGURES["dcr"]))
  for name, res in result["attackers"].items():
    closest_pairs(images, train["image"], holdout["image"], res, result["meta"]["gallery"],
                  os.path.join(out_dir, PAIRS.format(name)))
  saved = {**result, "attackers": {n: {k: v for k, v in r.items() if k != "arrays"}
                                   for n, r in result["attackers"].items()}}
  io_utils.write_json(os.path.join(out_dir, RESULT), saved)
  io_utils.write_text(os.path.join(out_dir, PAGE), page(saved))


# ----------------------------------------------------------------------------- audit_power

def power_figure(power: dict, path: str) -> None:
  """Rejection rate against the share of near copies, per attacker and for the verdict; q = 0 is
  the false-alarm rate (dashed: the nominal test size)."""
  shares = [0.0] + [arm["share"] for arm in power["leaking"]]
  x = np.arange(len(shares), dtype=float)  # evenly spaced shares, labelled
  fig, ax = plt.subplots(figsize=(6.4, 3.8))
  for i, who in enumerate(power["who"]):
    rates = [power["null"]["rejected"][who]] + [arm["rejected"][who] for arm in power["leaking"]]
    value = np.array([r["value"] for r in rates])
    err = np.array([[r["value"] - r["low"] for r in rates],
                    [r["high"] - r["value"] for r in rates]])
    ax.errorbar(x + 0.04 * (i - len(power["who"]) / 2), value, yerr=err, marker="o", capsize=3,
                lw=2.2 if who == "verdict" else 1.0, label=who)
  ax.axhline(power["test_size"], color="k", ls="--", lw=1,
             label=f"test size {power['test_size']:g}")
  ax.set_xticks(x, ["null"] + [f"{q:.1%}" for q in shares[1:]])
  ax.set_xlabel("near copies of training images in the release")
  ax.set_ylabel("share of releases failed")
  ax.set_ylim(-0.02, 1.02)
  ax.legend(fontsize=7)
  ax.grid(alpha=0.3)
  _save(fig, path)


def power_section(power: dict, prefix: str = ".") -> str:
  """The power table and figure (prefix: the folder of power.png, relative to the page)."""
  who = power["who"]
  rate = lambda r: f"{html.fmt_ci(r['value'], [r['low'], r['high']])} ({r['successes']}/{r['n']})"
  rows = [["0 (null: real unseen images)"] + [rate(power["null"]["rejected"][w]) for w in who]]
  rows += [[f"{arm['share']:.1%} ({arm['copies']} copies)"]
           + [rate(arm["rejected"][w]) for w in who] for arm in power["leaking"]]
  extra = [[html.esc(k), rate(v)] for k, v in power["null"].get("descriptive", {}).items()]
  unselected = ""
  if power.get("unselected"):
    u = power["unselected"]
    unselected = (f"<p>The workdir's generator with selection off (one sample per training image, "
                  f"released as is): {html.verdict(u['verdict'] == 'pass', 'PASS', 'FAIL')}"
                  f"{_decided(u['decided_by'])}.</p>")
  return html.section("The audit's power and false-alarm rate (audit_power)", (
      f"<p>{power['draws']} releases of {power['size']} images per row, "
      f"null images from {html.esc(power['null_source'])}; near copies of training images: "
      f"{html.esc(', '.join(power['kinds']))}. Rates of releases failed with "
      f"{power['interval']} 95% intervals: the first row is the false-alarm rate (nominal "
      f"{power['test_size']:g}), the others the detection rate.</p>"
      + html.table(["near copies"] + list(who), rows)
      + html.figure(f"{prefix}/{FIGURES['power']}", "share of releases failed vs near copies")
      + unselected
      + (html.table(["reference test on null releases (not in the verdict)", "rejection rate"],
                    extra, left_cols=1) if extra else "")))


def write_power(out_dir: str, power: dict, audit_dir: str) -> None:
  """audit_power's files (power.json by the stage), its page, and the power section added to
  audit.html."""
  os.makedirs(out_dir, exist_ok=True)
  power_figure(power, os.path.join(out_dir, FIGURES["power"]))
  io_utils.write_text(os.path.join(out_dir, "audit_power.html"), html.page(
      "pso_jax audit power", f"releases of {power['size']} images", power_section(power)))
  audit_json = os.path.join(audit_dir, RESULT)
  if os.path.exists(audit_json):
    io_utils.write_text(os.path.join(audit_dir, PAGE),
                        page(io_utils.read_json(audit_json), power))

"""Report figures (matplotlib, Agg backend): loss curves, per-class AUROC bars, sample grids."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pso_jax import io_utils  # noqa: E402


def _save(fig, path: str) -> None:
  with io_utils.atomic_path(path) as tmp:
    fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
  plt.close(fig)


def loss_curves(curves: dict, path: str, ylabel: str = "loss") -> None:
  """curves: name -> (steps, values). One panel, log-scaled x when it spans decades."""
  fig, ax = plt.subplots(figsize=(6.4, 3.6))
  for name, (steps, values) in curves.items():
    if len(steps):
      ax.plot(steps, values, label=name, lw=1.2)
  ax.set_xlabel("step")
  ax.set_ylabel(ylabel)
  ax.grid(alpha=0.3)
  ax.legend()
  _save(fig, path)


def auroc_bars(findings, series: dict, path: str) -> None:
  """series: name -> per-class AUROC list (None = undefined). Grouped bars per finding."""
  names = list(series)
  x = np.arange(len(findings))
  width = 0.8 / max(len(names), 1)
  fig, ax = plt.subplots(figsize=(8.5, 3.8))
  for i, name in enumerate(names):
    vals = [np.nan if v is None else v for v in series[name]]
    ax.bar(x + (i - (len(names) - 1) / 2) * width, vals, width, label=name)
  ax.axhline(0.5, color="grey", lw=0.8, ls="--")
  ax.set_xticks(x, findings, rotation=30, ha="right")
  ax.set_ylim(0.0, 1.0)
  ax.set_ylabel("AUROC (real test)")
  ax.legend(loc="lower right")
  ax.grid(axis="y", alpha=0.3)
  _save(fig, path)


def image_rows(rows: dict, path: str, max_cols: int = 8) -> None:
  """rows: label -> uint8 images [N,H,W,C]; one row per label, columns aligned (real vs synthetic)."""
  labels = list(rows)
  cols = min(max_cols, max(len(v) for v in rows.values()))
  fig, axes = plt.subplots(len(labels), cols, figsize=(1.3 * cols, 1.45 * len(labels)),
                           squeeze=False)
  for r, label in enumerate(labels):
    for c in range(cols):
      ax = axes[r][c]
      ax.axis("off")
      if c < len(rows[label]):
        img = np.asarray(rows[label][c])
        ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=255)
    axes[r][0].set_title(label, fontsize=8, loc="left")
  _save(fig, path)


def _interval(ax, x, value, ci, **style):
  """A line with a shaded 95% interval where one exists (None values are gaps)."""
  v = np.array([np.nan if a is None else a for a in value], float)
  line, = ax.plot(x, v, marker="o", **style)
  if ci is not None:
    low = np.array([np.nan if c is None or c[0] is None else c[0] for c in ci], float)
    high = np.array([np.nan if c is None or c[1] is None else c[1] for c in ci], float)
    ax.fill_between(x, low, high, color=line.get_color(), alpha=0.18, lw=0)


def metric_panels(x, panels: list, path: str, xlabel: str) -> None:
  """One panel per metric against a shared x: panels are (title, {series: (values, cis or None)},
  reference line or None)."""
  fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 3.2), squeeze=False)
  for ax, (title, series, reference) in zip(axes[0], panels):
    for name, (values, cis) in series.items():
      _interval(ax, x, values, cis, label=name, lw=1.3)
    if reference is not None:
      ax.axhline(reference[1], color="grey", lw=0.9, ls="--", label=reference[0])
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3)
    if len(series) > 1 or reference is not None:
      ax.legend(fontsize=7)
  fig.tight_layout()
  _save(fig, path)


def labelled_points(points: list, path: str, xlabel: str, ylabel: str, reference=None) -> None:
  """points: (label, x, y, (y_low, y_high) or None, marker); labels written beside the points,
  a dashed horizontal reference line (label, y) when given."""
  fig, ax = plt.subplots(figsize=(6.8, 4.4))
  for label, x, y, ci, marker in points:
    if x is None or y is None:
      continue
    yerr = None if not ci or ci[0] is None else [[y - ci[0]], [ci[1] - y]]
    ax.errorbar([x], [y], yerr=yerr, fmt=marker, ms=6, capsize=3)
    ax.annotate(label, (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
  if reference is not None:
    ax.axhline(reference[1], color="grey", lw=0.9, ls="--")
    ax.annotate(reference[0], (ax.get_xlim()[0], reference[1]), fontsize=7, xytext=(2, 3),
                textcoords="offset points", color="grey")
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.grid(alpha=0.3)
  _save(fig, path)

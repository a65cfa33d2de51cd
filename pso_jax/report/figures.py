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

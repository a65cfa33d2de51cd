"""Procedural chest radiographs ("phantom"): the embedded default dataset.

Every patient has fixed anatomy (thorax and lung shape, heart, ribs, clavicles, spine) and a
low-frequency "biometric" texture, so their scans can be re-identified; every scan varies pose,
exposure, breathing and noise; the 7 findings change the image where a radiologist would look.
Everything is a deterministic function of (config seed, patient, scan), rendered in numpy,
vectorised over a chunk of scans, so any subset of the dataset can be drawn alone (chunked,
resumable preparation) and thousands of 64x64 images take seconds.

Image brightness is density, as on a radiograph: air (lungs) dark, bone and fluid bright.
"""

import dataclasses

import numpy as np

from pso_jax.errors import UserError

NUM_FINDINGS = 8
_BIO_WAVES = 8  # sinusoids in the biometric texture


@dataclasses.dataclass(frozen=True)
class PhantomIndex:
  """What the dataset holds, before any pixel is drawn: one entry per scan."""
  patient: np.ndarray   # int64 [N]
  scan: np.ndarray      # int64 [N]
  labels: np.ndarray    # float32 [N, 8], No Finding first
  paths: np.ndarray     # str [N], ChestX-ray14 style `images/00000012_003.png`
  patient_ids: np.ndarray  # str [N], `00000012`

  def __len__(self):
    return len(self.patient)


def _rng(seed: int, *keys: int) -> np.random.Generator:
  return np.random.default_rng(np.random.SeedSequence([int(seed), *map(int, keys)]))


def _draw_labels(rng: np.random.Generator, prevalence, multi_label_rate: float) -> np.ndarray:
  """One primary finding (or No Finding), and sometimes a second, distinct finding."""
  p = np.asarray(prevalence, np.float64)[1:]
  labels = np.zeros(NUM_FINDINGS, np.float32)
  first = rng.choice(NUM_FINDINGS, p=np.concatenate([[1 - p.sum()], p]))
  labels[first] = 1
  if first > 0 and rng.random() < multi_label_rate:
    rest = p.copy()
    rest[first - 1] = 0
    labels[1 + rng.choice(NUM_FINDINGS - 1, p=rest / rest.sum())] = 1
  return labels


def index(phantom_config) -> PhantomIndex:
  """The scans of the phantom dataset, their labels and reference-style paths."""
  c = phantom_config
  p = np.asarray(c.prevalence, np.float64)
  if len(p) != NUM_FINDINGS or p.min() < 0 or p[1:].sum() >= 1:
    raise UserError(f"config.data.phantom.prevalence={tuple(c.prevalence)} must hold 8 values >= 0 "
                    "(No Finding first, implied) whose 7 findings sum below 1")
  n_pat, n_scan = int(c.num_patients), int(c.scans_per_patient)
  patient = np.repeat(np.arange(n_pat), n_scan)
  scan = np.tile(np.arange(n_scan), n_pat)
  labels = np.stack([_draw_labels(_rng(c.seed, 1, p, s), c.prevalence, c.multi_label_rate)
                     for p, s in zip(patient, scan)]) if n_pat * n_scan else np.zeros((0, 8), np.float32)
  # patient numbers start at 1 like ChestX-ray14's
  ids = np.array([f"{p + 1:08d}" for p in patient], dtype=str)
  paths = np.array([f"images/{i}_{s:03d}.png" for i, s in zip(ids, scan)], dtype=str)
  return PhantomIndex(patient, scan, labels, paths, ids)


# ---------------------------------------------------------------- parameters


def _patient_params(seed: int, patients: np.ndarray) -> dict:
  """Fixed anatomy of each patient, as arrays [N] (or [N, K] for the texture)."""
  rows = []
  for p in patients:
    r = _rng(seed, 2, p)
    rows.append(dict(
        body_w=r.uniform(0.80, 0.95), body_h=r.uniform(0.95, 1.10),
        lung_x=r.uniform(0.30, 0.42), lung_y=r.uniform(-0.12, 0.02),
        lung_w=r.uniform(0.20, 0.30), lung_h=r.uniform(0.48, 0.62),
        lung_p=r.uniform(1.7, 2.6),                 # superellipse exponent: boxy or oval lungs
        heart_x=r.uniform(0.04, 0.16), heart_y=r.uniform(0.22, 0.36),
        heart_r=r.uniform(0.20, 0.27), heart_e=r.uniform(0.75, 1.0),
        rib_spacing=r.uniform(0.12, 0.19), rib_curv=r.uniform(0.25, 0.65),
        rib_phase=r.uniform(0, 1), rib_width=r.uniform(0.25, 0.45),
        clav_angle=r.uniform(0.10, 0.45), clav_y=r.uniform(-0.72, -0.55),
        spine_w=r.uniform(0.05, 0.10), density=r.uniform(0.40, 0.55),
        bio_fx=r.uniform(-4.5, 4.5, _BIO_WAVES), bio_fy=r.uniform(-4.5, 4.5, _BIO_WAVES),
        bio_phase=r.uniform(0, 2 * np.pi, _BIO_WAVES), bio_amp=r.uniform(0.02, 0.06, _BIO_WAVES),
    ))
  return {k: np.array([row[k] for row in rows], np.float32) for k in rows[0]}


def _scan_params(seed: int, patients: np.ndarray, scans: np.ndarray) -> dict:
  """Per-scan pose, exposure, breathing, noise and where each finding sits."""
  rows = []
  for p, s in zip(patients, scans):
    r = _rng(seed, 3, p, s)
    rows.append(dict(
        dx=r.normal(0, 0.025), dy=r.normal(0, 0.025), rot=r.normal(0, 0.03),
        zoom=1 + r.normal(0, 0.025), gain=r.uniform(0.85, 1.15), offset=r.normal(0, 0.03),
        gamma=r.uniform(0.85, 1.15), breath=1 + r.normal(0, 0.03), noise=r.uniform(0.01, 0.03),
        side=r.choice([-1.0, 1.0]), both=float(r.random() < 0.4),
        blob_x=r.uniform(0.2, 0.8), blob_y=r.uniform(0.1, 0.8), band_tilt=r.normal(0, 0.15),
        severity=r.uniform(0.8, 1.2), noise_seed=r.integers(2 ** 31),
    ))
  return {k: np.array([row[k] for row in rows], np.float32 if k != "noise_seed" else np.int64)
          for k in rows[0]}


# ---------------------------------------------------------------- drawing helpers


def _soft(x, edge):
  """Soft step: 1 where x > 0, 0 where x < 0, over a width `edge` (a logistic, via tanh)."""
  return 0.5 + 0.5 * np.tanh(x * (0.5 / edge))


def _col(a):
  return a[:, None, None]


def _lung_masks(u, v, pp, breath, edge):
  """Left and right lung masks [N,H,W] (image left = patient right) and their radial coordinate."""
  masks, radii = [], []
  for sign in (-1.0, 1.0):
    cx, cy = sign * _col(pp["lung_x"]), _col(pp["lung_y"])
    w, h = _col(pp["lung_w"]), _col(pp["lung_h"]) * breath
    du, dv = (u - cx) / w, (v - cy) / h
    e = _col(pp["lung_p"])
    r = (np.abs(du) ** e + np.abs(dv) ** e) ** (1 / e)
    masks.append(_soft(1 - r, edge))
    radii.append((du, dv))
  return masks, radii


def render(phantom_config, idx: PhantomIndex, image_size: int, channels: int,
           select: np.ndarray | None = None, block: int = 32) -> np.ndarray:
  """uint8 [n, S, S, channels] images of the scans `select` (positions in `idx`; all if None).

  Drawn `block` scans at a time: the temporaries then stay in cache, which is several times
  faster than one pass over all scans. With phantom_config.render_size = r in (0, image_size) the
  anatomy and findings are drawn at r x r and interpolated (bilinear) to image_size, where the
  exposure and the detector noise are applied: large images (the scale variant: 256-512 px) then
  cost about (r / image_size)^2 of a full-resolution drawing.
  """
  sel = np.arange(len(idx)) if select is None else np.asarray(select)
  size = int(image_size)
  drawn = int(phantom_config.get("render_size", 0) or 0)
  if drawn < 0:
    raise UserError(f"config.data.phantom.render_size={drawn} must be >= 0 (0: draw at "
                    "config.data.image_size)")
  drawn = size if drawn == 0 or drawn >= size else drawn
  out = np.zeros((len(sel), size, size, channels), np.uint8)
  for start in range(0, len(sel), block):
    out[start:start + block] = _render_block(phantom_config, idx, drawn, channels,
                                             sel[start:start + block], out_size=size)
  return out


def interpolation_matrix(out_size: int, in_size: int) -> np.ndarray:
  """[out, in] bilinear weights between pixel grids covering the same extent (pixel centres at
  (i + 0.5) / size; edges clamped): rows sum to 1."""
  pos = np.clip((np.arange(out_size) + 0.5) * in_size / out_size - 0.5, 0, in_size - 1)
  lo = np.floor(pos).astype(np.int64)
  hi = np.minimum(lo + 1, in_size - 1)
  w = (pos - lo).astype(np.float32)
  a = np.zeros((out_size, in_size), np.float32)
  np.add.at(a, (np.arange(out_size), lo), 1 - w)
  np.add.at(a, (np.arange(out_size), hi), w)
  return a


def _render_block(phantom_config, idx, size, channels, sel, out_size=None):
  seed = int(phantom_config.seed)
  pp = _patient_params(seed, idx.patient[sel])
  sp = _scan_params(seed, idx.patient[sel], idx.scan[sel])
  lab = idx.labels[sel]
  edge = 2.0 / size  # one pixel of soft edge at any resolution

  # pixel grid in [-1, 1], then the scan's pose maps it into the patient's anatomy frame
  g = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
  y0, x0 = np.meshgrid(g, g, indexing="ij")
  cos, sin, z = _col(np.cos(sp["rot"])), _col(np.sin(sp["rot"])), _col(sp["zoom"])
  xs, ys = x0[None] - _col(sp["dx"]), y0[None] - _col(sp["dy"])
  u = (cos * xs + sin * ys) / z
  v = (-sin * xs + cos * ys) / z

  body = _soft(1 - np.sqrt((u / _col(pp["body_w"])) ** 2 + (v / _col(pp["body_h"])) ** 2), edge * 3)
  (lung_r, lung_l), ((ru, rv), (lu, lv)) = _lung_masks(u, v, pp, _col(sp["breath"]), edge)
  lungs = np.clip(lung_r + lung_l, 0, 1)
  thorax = _soft(1 - np.sqrt((u / (_col(pp["lung_x"] + pp["lung_w"]) * 1.12)) ** 2 +
                             ((v - _col(pp["lung_y"])) / (_col(pp["lung_h"]) * 1.1)) ** 2), edge * 2)

  heart_scale = 1 + 0.4 * _col(lab[:, 2] * sp["severity"])  # cardiomegaly
  hr = _col(pp["heart_r"]) * heart_scale
  heart = _soft(1 - np.sqrt(((u - _col(pp["heart_x"])) / hr) ** 2 +
                            ((v - _col(pp["heart_y"])) / (hr * _col(pp["heart_e"]))) ** 2), edge * 2)

  phase = (v - _col(pp["rib_curv"]) * u ** 2) / _col(pp["rib_spacing"]) + _col(pp["rib_phase"])
  ribs = _soft(np.cos(2 * np.pi * phase) - np.cos(np.pi * _col(pp["rib_width"])), 0.15) * thorax
  spine = _soft(_col(pp["spine_w"]) - np.abs(u), edge) * (0.8 + 0.2 * np.cos(2 * np.pi * v / 0.11))
  clav = np.zeros_like(u)
  for sign in (-1.0, 1.0):
    a = _col(pp["clav_angle"])
    line = v - (_col(pp["clav_y"]) - np.tan(a) * (sign * u - 0.08))  # rising away from the midline
    reach = _soft(sign * u - 0.06, edge) * _soft(0.62 - sign * u, edge * 2)
    clav += _soft(0.035 - np.abs(line), edge) * reach

  bio = np.zeros_like(u)
  for k in range(_BIO_WAVES):
    bio += _col(pp["bio_amp"][:, k]) * np.cos(np.pi * (_col(pp["bio_fx"][:, k]) * u +
                                                       _col(pp["bio_fy"][:, k]) * v) +
                                              _col(pp["bio_phase"][:, k]))

  d = body * _col(pp["density"]) + 0.12 * thorax
  d = d - 0.38 * lungs * (1 - 0.5 * heart) + 0.22 * heart + 0.16 * ribs * (0.6 + 0.4 * lungs)
  d = d + 0.18 * spine * body + 0.20 * clav + bio * body
  ill = np.flatnonzero(lab[:, [1, 3, 4, 5, 6, 7]].any(axis=1))  # drawn only where present
  if len(ill):
    pick = lambda params: {k: a[ill] for k, a in params.items()}
    d[ill] += _findings(u[ill], v[ill], lab[ill], pick(sp), pick(pp), (lung_r[ill], lung_l[ill]),
                        ((ru[ill], rv[ill]), (lu[ill], lv[ill])))

  if out_size is not None and out_size != size:  # drawn small: density up to the image's grid
    a = interpolation_matrix(out_size, size)
    d = np.einsum("oi,nij,pj->nop", a, d.astype(np.float32), a, optimize=True)
    size = out_size
  # exposure and detector noise
  img = np.clip(d, 0, None) ** _col(sp["gamma"]) * _col(sp["gain"]) + _col(sp["offset"])
  noise = np.stack([np.random.default_rng(int(s)).standard_normal((size, size), np.float32)
                    for s in sp["noise_seed"]])
  img = img + _col(sp["noise"]) * noise
  img = np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)
  return np.repeat(img[..., None], channels, axis=-1)


def _findings(u, v, lab, sp, pp, lungs, radii):
  """Density added by the 7 findings (cardiomegaly acts on the heart size in `render`)."""
  lung_r, lung_l = lungs
  (ru, rv), (lu, lv) = radii
  side = _col(sp["side"])           # +1: finding in the image-right lung
  both = _col(sp["both"])
  one = np.where(side > 0, lung_l, lung_r)
  ou, ov = np.where(side > 0, lu, ru), np.where(side > 0, lv, rv)  # lung-local coordinates in [-1,1]
  sev = _col(sp["severity"])
  f = lambda k: _col(lab[:, k]) * sev
  bx = (2 * _col(sp["blob_x"]) - 1) * 0.6
  by = (2 * _col(sp["blob_y"]) - 1) * 0.6
  d = np.zeros_like(u)

  # atelectasis: a thin, slightly tilted linear band in the lower lung
  band = np.exp(-(((ov - 0.45 - _col(sp["band_tilt"]) * ou) / 0.07) ** 2))
  d += 0.50 * f(1) * band * one
  # consolidation: one dense, well-defined lobar opacity
  blob = _soft(0.32 - np.sqrt((ou - bx) ** 2 + (ov - by) ** 2), 0.06)
  d += 0.40 * f(3) * blob * one
  # edema: bilateral perihilar ("bat wing") haze
  hilum = sum(np.exp(-(((u - s * _col(pp["lung_x"] * 0.65)) / 0.22) ** 2 +
                       ((v - _col(pp["lung_y"])) / 0.3) ** 2)) for s in (-1.0, 1.0))
  d += 0.26 * f(4) * hilum * (lung_r + lung_l)
  # pleural effusion: fluid fills the lung base under a meniscus that rises laterally
  def meniscus(lu_, lv_, lateral_sign):
    lateral = lateral_sign * lu_ * 0.5 + 0.5
    return _soft(lv_ - (0.45 - 0.4 * lateral ** 2), 0.05)
  fluid_r, fluid_l = meniscus(ru, rv, -1.0) * lung_r, meniscus(lu, lv, 1.0) * lung_l
  fluid = np.where(side > 0, fluid_l, fluid_r)
  d += 0.45 * f(5) * np.clip(fluid + both * (fluid_r + fluid_l), 0, 1)
  # pneumonia: several small, soft patches in the lower half of one lung
  patches = sum(np.exp(-(((ou - (bx * 0.5 + px)) / 0.18) ** 2 + ((ov - (0.35 + py)) / 0.16) ** 2))
                for px, py in ((-0.35, 0.0), (0.3, 0.1), (0.0, 0.35), (0.15, -0.2)))
  d += 0.40 * f(6) * patches * one
  # pneumothorax: the apical lung collapses away from the chest wall: no markings, a pleural line
  apex = np.sqrt((ou * 0.9) ** 2 + (ov + 0.1) ** 2)
  gap = _soft(apex - 0.55, 0.03) * _soft(-ov + 0.2, 0.08) * one
  line = np.exp(-(((apex - 0.55) / 0.03) ** 2)) * _soft(-ov + 0.2, 0.08) * one
  d += f(7) * (-0.35 * gap + 0.25 * line)
  return d


def generate(config, select: np.ndarray | None = None) -> tuple[PhantomIndex, np.ndarray]:
  """(index, images) of the phantom dataset described by `config.data`."""
  idx = index(config.data.phantom)
  return idx, render(config.data.phantom, idx, config.data.image_size, config.data.channels, select)

"""DICOM radiographs -> float grey levels in 0..1 (or RGB), the way a viewer would show them.

One frame, in this order (DICOM PS3.3 C.7.6.3, C.11.1, C.11.2):
  1. the stored values (pydicom's pixel_array: bit depth, signedness, byte order as stored);
  2. the modality transform: x * RescaleSlope + RescaleIntercept (or the Modality LUT);
  3. the VOI transform to 0..1:
       - a VOI LUT Sequence: pydicom's table lookup, then scaled by the table's output range;
       - else WindowCenter/WindowWidth (the first pair when several are stored), by the header's
         VOILUTFunction: LINEAR (default), LINEAR_EXACT or SIGMOID;
       - else no window in the file: (x - min) / (max - min) of the rescaled values of this image;
  4. MONOCHROME1 (white = low values) inverted: y -> 1 - y, so every image is MONOCHROME2.
RGB files keep their three channels (scaled by their bit depth, no window). Each image is scaled
by its own header, so files of different bit depths (8, 12, 16 bits stored) end on the same 0..1
scale; the dataset card counts images per rule (images.SCALING).

Refused with a UserError naming the file: no pixel data, a compressed transfer syntax no
installed decoder handles (the plugins to install are named), several frames, photometric
interpretations other than MONOCHROME1/2, RGB and YBR (pydicom converts YBR to RGB).
pydicom is imported on first use.
"""

import os

import numpy as np

from pso_jax.errors import UserError

EXTENSIONS = (".dcm", ".dicom")
RULES = {  # images.SCALING rule -> how
    "dicom window": "rescale, then the file's window centre/width (MONOCHROME1 inverted)",
    "dicom VOI LUT": "rescale, then the file's VOI LUT table (MONOCHROME1 inverted)",
    "dicom range": "rescale, then (x - min) / (max - min): no window in the file (MONOCHROME1 inverted)",
}
_GREY = ("MONOCHROME1", "MONOCHROME2")
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422")


def is_dicom(path: str) -> bool:
  """By extension, or by the `DICM` marker after the 128-byte preamble (files without one)."""
  if os.path.splitext(path)[1].lower() in EXTENSIONS:
    return True
  try:
    with open(path, "rb") as f:
      head = f.read(132)
  except OSError:
    return False
  return len(head) == 132 and head[128:] == b"DICM"


def _read(path: str, pixels: bool):
  import pydicom
  try:
    # large values (the pixel data) are read only when used: the header check stays cheap
    return pydicom.dcmread(path, force=False, defer_size=None if pixels else 1024)
  except (pydicom.errors.InvalidDicomError, OSError, EOFError, ValueError, KeyError) as e:
    raise UserError(f"is not a readable DICOM file ({e}); replace it or remove its line from the "
                    "filelist") from None


def header_problem(path: str) -> str | None:
  """Why the file cannot become an image, from its header alone (None: it can)."""
  from pydicom.pixels import get_decoder
  try:
    ds = _read(path, pixels=False)
  except UserError as e:
    return str(e)
  if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
    kind = ds.get("SOPClassUID", None)
    return (f"holds no pixel data (a DICOM object without an image{', SOP class ' + kind.name if kind else ''}, "
            "e.g. a structured report or a presentation state); list image files only")
  meta = getattr(ds, "file_meta", None)
  tsyntax = meta.get("TransferSyntaxUID") if meta is not None else None
  if tsyntax is None:
    return ("has no transfer syntax in its file meta information; rewrite it with a DICOM tool "
            "(e.g. as Explicit VR Little Endian)")
  try:
    decoder = get_decoder(tsyntax)
    available, missing = decoder.is_available, decoder.missing_dependencies
  except NotImplementedError:
    available, missing = False, []
  if not available:
    need = f" (install one of: {'; '.join(missing)})" if missing else ""
    return (f"uses the transfer syntax {tsyntax.name} ({tsyntax}), which no installed decoder "
            f"handles{need}; install the plugin or convert the file to an uncompressed one "
            "(Explicit VR Little Endian)")
  frames = int(ds.get("NumberOfFrames", 1) or 1)
  if frames != 1:
    return f"holds {frames} frames; a radiograph has one: export the frame you mean"
  photometric = str(ds.get("PhotometricInterpretation", ""))
  if photometric not in _GREY + _COLOUR:
    return (f"has PhotometricInterpretation {photometric or '(none)'}; pso_jax reads "
            f"{', '.join(_GREY + _COLOUR)}")
  return None


def _window(x: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
  """VOI window to 0..1 (PS3.3 C.11.2.1.2 with y_min = 0, y_max = 1)."""
  if function == "SIGMOID":
    return 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
  if function == "LINEAR_EXACT":
    return np.clip((x - center) / width + 0.5, 0.0, 1.0)
  # LINEAR: width >= 1, centre shifted by half a step; width 1 is a threshold
  if width <= 1.0:
    return (x > center - 0.5).astype(np.float64)
  return np.clip((x - (center - 0.5)) / (width - 1.0) + 0.5, 0.0, 1.0)


def _first(value) -> float:
  """WindowCenter/Width may hold several values (alternative windows): the first is used."""
  try:
    return float(value[0])
  except TypeError:
    return float(value)


def read_unit(path: str) -> tuple[np.ndarray, str]:
  """(float64 [H, W] grey or [H, W, 3] RGB in 0..1, the rule used); bad files raise UserError."""
  from pydicom.pixels import apply_modality_lut, apply_voi_lut
  problem = header_problem(path)
  if problem:
    raise UserError(f"image {path!r} {problem}")
  try:
    ds = _read(path, pixels=True)
  except UserError as e:
    raise UserError(f"image {path!r} {e}") from None
  try:
    stored = ds.pixel_array
  except Exception as e:  # a decoder's own error types: the file is damaged or truncated
    raise UserError(f"image {path!r}: its DICOM pixel data cannot be decoded ({e}); replace it or "
                    "remove its line from the filelist") from None
  if str(ds.PhotometricInterpretation) in _COLOUR:
    bits = int(ds.get("BitsStored", 8))
    return np.asarray(stored, np.float64) / (2 ** bits - 1), "dicom range"
  x = np.asarray(apply_modality_lut(stored, ds), np.float64)
  if not np.isfinite(x).all():
    raise UserError(f"image {path!r} holds non-finite pixel values (NaN or infinity) that no "
                    "window can map; fix or replace the file, or remove its line from the filelist")
  if "VOILUTSequence" in ds:
    item = ds.VOILUTSequence[0]
    out_bits = int(item.LUTDescriptor[2])
    table_input = np.rint(x).astype(np.int64)  # a LUT is indexed by integers
    y = np.asarray(apply_voi_lut(table_input, ds, prefer_lut=True), np.float64) / (2 ** out_bits - 1)
    rule = "dicom VOI LUT"
  elif "WindowCenter" in ds and "WindowWidth" in ds and _first(ds.WindowWidth) > 0:
    function = str(ds.get("VOILUTFunction", "LINEAR")).upper() or "LINEAR"
    y, rule = _window(x, _first(ds.WindowCenter), _first(ds.WindowWidth), function), "dicom window"
  else:
    lo, hi = x.min(), x.max()
    y, rule = (x - lo) / ((hi - lo) or 1.0), "dicom range"  # a constant image becomes black
  y = np.clip(y, 0.0, 1.0)
  if str(ds.PhotometricInterpretation) == "MONOCHROME1":
    y = 1.0 - y
  return y, rule

"""Reference filelists, patient ids and patient-disjoint splits.

A filelist line is `<relative image path> l0 ... l7` (reference format, findings in the order of
`config.data.findings`). The patient id comes from the path (ChestX-ray14, CheXpert, MIMIC-CXR
styles, auto-detected) or from the `patient_id` column of a generic CSV. Splits follow the
reference recipe (docs/method.md §1.3): unique patients are shuffled and cut 80/20 (seed 42), the
20% cut 50/50 into val/test; rows without any positive label are dropped; train and val keep only
single-label rows, test keeps multi-label rows too. `config.data.filter_order` says whether rows
without a positive label are dropped after the patient split (`split_then_filter`, pso_jax's
default: a patient's unlabelled rows take part in the shuffle) or before it (`filter_then_split`,
the reference notebook: patients with no labelled row are not shuffled at all, which moves the
cut). Fixed splits (`config.data.split_files`: train, val, test[, attacker] filelists, e.g. the
reference's) are used as given, checked for patient disjointness, and only the label rules apply.

Paths are checked as they are read: relative and without `..` (nothing outside
config.data.image_root is read, and no later stage can be led outside its folder), without
whitespace (the filelists prepare writes must read back), and normalised (`./images/a.png` and
`images//a.png` are `images/a.png`), so one image is one record.
"""

import csv
import dataclasses
import io
import math
import os
import posixpath
import re

import numpy as np

from pso_jax.errors import UserError

NUM_LABELS = 8
SPLITS = ("train", "val", "test")
# patients set aside for the audit's independent re-identification attacker
# (config.data.attacker_patients): in none of the reference splits, so no model of the pipeline
# and no holdout of the audit sees them
ATTACKER = "attacker"
ALL_SPLITS = SPLITS + (ATTACKER,)
FILTER_ORDERS = ("split_then_filter", "filter_then_split")
BEFORE_SPLIT = "before_split"  # key of split_rows' dropped counts: rows that reached no split
_SHOWN = 5  # offending patients named in a message (then a count)

PATH_STYLES = {
    # images/00000006_000.png -> 00000006
    "cxr8": re.compile(r"(?:^|/)(\d+)_\d+\.\w+$"),
    # CheXpert-v1.0/train/patient00006/study1/view1_frontal.jpg -> patient00006
    "chexpert": re.compile(r"(?:^|/)(patient\d+)/study\d+/"),
    # files/p19/p19994586/s54820351/<dicom>.jpg -> p19994586
    "mimic": re.compile(r"(?:^|/)p\d\d/(p\d+)/s\d+/"),
}
_EXAMPLES = {"cxr8": "images/00000006_000.png",
             "chexpert": "CheXpert-v1.0/train/patient00006/study1/view1_frontal.jpg",
             "mimic": "files/p19/p19994586/s54820351/<dicom>.jpg"}


@dataclasses.dataclass(frozen=True)
class Table:
  """Rows of a dataset: relative paths, 0/1 labels [N, 8] and patient ids, in file order."""
  paths: np.ndarray        # str [N]
  labels: np.ndarray       # float32 [N, 8]
  patient_ids: np.ndarray  # str [N]
  source: str = ""         # file the rows came from (for messages)
  lines: np.ndarray | None = None  # int [N]: each row's line in `source` (None: not from a file)
  files: np.ndarray | None = None  # str [N]: each row's file when the rows come from several

  def __len__(self):
    return len(self.paths)

  def take(self, rows) -> "Table":
    rows = np.asarray(rows, dtype=np.int64)
    lines = None if self.lines is None else self.lines[rows]
    files = None if self.files is None else self.files[rows]
    return Table(self.paths[rows], self.labels[rows], self.patient_ids[rows], self.source, lines,
                 files)

  def where(self, row: int) -> str:
    """`file:line` of a row, for messages."""
    source = self.source if self.files is None else self.files[row]
    return source if self.lines is None else f"{source}:{self.lines[row]}"


def _parse_labels(fields, where: str) -> list[float]:
  if len(fields) != NUM_LABELS:
    raise UserError(f"{where}: expected {NUM_LABELS} labels after the path, found {len(fields)} "
                    f"({' '.join(fields) or 'none'}); each line must be `<relative path> l0 ... l7` "
                    "with 0/1 labels in the order of config.data.findings")
  bad = [x for x in fields if x not in ("0", "1", "0.0", "1.0")]
  if bad:
    raise UserError(f"{where}: label {bad[0]!r} is not 0 or 1; map uncertain (-1) and missing "
                    "labels to 0 before preparing (reference rule)")
  return [float(x) for x in fields]


def clean_path(raw: str, where: str) -> str:
  """A path relative to the image root, normalised; a path that could leave the root, or that a
  written filelist could not hold, is refused."""
  fix = "paths must be relative to config.data.image_root, e.g. images/00000001_000.png; fix the line"
  if raw.startswith("/") or os.path.isabs(raw):
    raise UserError(f"{where}: path {raw!r} is absolute; {fix}")
  if ".." in raw.split("/"):
    raise UserError(f"{where}: path {raw!r} contains '..' and could leave the image root; {fix}")
  if any(c.isspace() for c in raw):
    raise UserError(f"{where}: path {raw!r} contains whitespace, which the filelists prepare "
                    "writes (`<path> l0 ... l7`) cannot hold; rename the file (or link it under a "
                    "name without whitespace) and fix the line")
  return posixpath.normpath(raw)


def _check_duplicates(paths: list[str], where_of) -> None:
  seen = {}
  for i, p in enumerate(paths):
    if p in seen:
      raise UserError(f"{where_of(i)}: duplicate path {p!r} (first at {where_of(seen[p])}; paths "
                      "are compared normalised: ./a/b.png and a//b.png are a/b.png); each image "
                      "may appear once: remove the repeated line")
    seen[p] = i


def _read_text(path: str, what: str) -> str:
  """The file's text; a UTF-8 byte order mark (as spreadsheet programs write) is dropped."""
  try:
    with open(path, "r", encoding="utf-8-sig", newline="") as f:
      return f.read()
  except UnicodeDecodeError as e:
    raise UserError(f"{what} {path!r} is not UTF-8 text ({e.reason} at byte {e.start}); save it "
                    "as UTF-8") from None


def patient_id(path: str, style: str) -> str | None:
  m = PATH_STYLES[style].search(path)
  return m.group(1) if m else None


def detect_path_style(paths, source: str = "", lines=None) -> str:
  """The first path style that every path matches; otherwise the error names the first path
  that the style matching most paths does not match (`lines`: each path's line in `source`)."""
  paths = [str(p) for p in paths]
  misses = {style: [i for i, p in enumerate(paths) if patient_id(p, style) is None]
            for style in PATH_STYLES}
  for style, missed in misses.items():
    if not missed:
      return style
  i = min(misses.values(), key=len)[0]
  where = f"{source or 'filelist'}:{i + 1 if lines is None else lines[i]}"
  examples = "; ".join(f"{k}: {v}" for k, v in _EXAMPLES.items())
  raise UserError(f"{where}: cannot tell the patient id from path {paths[i]!r} (known styles: "
                  f"{examples}); fix the line, set --config.data.path_style or use a CSV with a "
                  "patient_id column (--config.data.source=csv)")


def patient_ids_for(paths, style: str = "auto", source: str = "", lines=None) -> np.ndarray:
  if style == "auto":
    style = detect_path_style(paths, source, lines)
  if style not in PATH_STYLES:
    raise UserError(f"config.data.path_style={style!r} is unknown; use auto, "
                    f"{', '.join(PATH_STYLES)} (or source=csv for explicit patient ids)")
  ids = []
  for i, p in enumerate(map(str, paths)):
    pid = patient_id(p, style)
    if pid is None:
      raise UserError(f"{source}:{i + 1 if lines is None else lines[i]}: path {p!r} does not "
                      f"follow the {style} style (e.g. {_EXAMPLES[style]}); fix the line or set "
                      "config.data.path_style")
    ids.append(pid)
  return np.array(ids, dtype=str)


def _parse_filelist(path: str, flag: str = "--config.data.filelist"):
  """(paths, labels, line numbers) of a reference filelist; malformed lines named."""
  if not os.path.isfile(path):
    raise UserError(f"filelist {path!r} does not exist; set {flag} to a file of "
                    "`<relative path> l0 ... l7` lines")
  paths, labels, lines = [], [], []
  for n, line in enumerate(_read_text(path, "filelist").splitlines(), start=1):
    fields = line.split()
    if not fields:
      continue
    labels.append(_parse_labels(fields[1:], f"{path}:{n}"))
    paths.append(clean_path(fields[0], f"{path}:{n}"))
    lines.append(n)
  if not paths:
    raise UserError(f"filelist {path!r} has no lines; expected `<relative path> l0 ... l7` per line")
  return paths, labels, lines


def read_filelist(path: str, style: str = "auto", flag: str = "--config.data.filelist") -> Table:
  """Parses a reference filelist; every malformed line is reported with its line number."""
  paths, labels, lines = _parse_filelist(path, flag)
  _check_duplicates(paths, lambda i: f"{path}:{lines[i]}")
  ids = patient_ids_for(paths, style, path, lines)
  return Table(np.array(paths, dtype=str), np.array(labels, np.float32), ids, path, np.array(lines))


def read_split_files(files, style: str = "auto") -> tuple[Table, dict[str, np.ndarray]]:
  """Fixed splits: train, val, test (and optionally attacker) filelists -> one Table in that file
  order and the rows of each split. Patients shared by two files are refused, all of them counted
  and the first few named with their files, before any image is read."""
  files = split_files_of(files)
  names = ALL_SPLITS[:len(files)]
  tables = [read_filelist(path, style, f"--config.data.split_files ({name})")
            for name, path in zip(names, files)]
  owner = np.concatenate([[name] * len(t) for name, t in zip(names, tables)])
  source_of = dict(zip(names, files))
  table = Table(np.concatenate([t.paths for t in tables]),
                np.concatenate([t.labels for t in tables]),
                np.concatenate([t.patient_ids for t in tables]), " + ".join(files),
                np.concatenate([t.lines for t in tables]),
                np.concatenate([[t.source] * len(t) for t in tables]).astype(str))
  _check_split_files_disjoint(table, owner, source_of)
  _check_duplicates(list(table.paths), table.where)  # (one image in two files is caught above)
  return table, {name: np.flatnonzero(owner == name) for name in names}


def _check_split_files_disjoint(table: Table, owner: np.ndarray, source_of: dict) -> None:
  splits_of = {}
  for pid, name in zip(table.patient_ids, owner):
    splits_of.setdefault(str(pid), []).append(str(name))
  shared = {pid: tuple(dict.fromkeys(s)) for pid, s in splits_of.items() if len(set(s)) > 1}
  if not shared:
    return
  shown = "; ".join(f"{pid} ({', '.join(s)})" for pid, s in list(shared.items())[:_SHOWN])
  more = f" and {len(shared) - _SHOWN} more" if len(shared) > _SHOWN else ""
  involved = sorted({name for s in shared.values() for name in s}, key=ALL_SPLITS.index)
  named = ", ".join(f"{name}={source_of[name]}" for name in involved)
  raise UserError(f"config.data.split_files are not patient-disjoint: {len(shared)} patient(s) "
                  f"have images in more than one split: {shown}{more} (files: {named}). One "
                  "patient's scans in two splits leak between them; move each patient's lines "
                  "into one file, or drop split_files and let prepare split by patient")


def read_csv(path: str) -> Table:
  """Generic CSV with a header: path, patient_id, then the 8 label columns."""
  if not os.path.isfile(path):
    raise UserError(f"CSV {path!r} does not exist; set --config.data.csv to a file with columns "
                    "path,patient_id,<8 labels>")
  rows = list(csv.reader(io.StringIO(_read_text(path, "CSV"))))
  if not rows:
    raise UserError(f"CSV {path!r} is empty; expected a header path,patient_id,<8 labels> and rows")
  header = [h.strip().lower() for h in rows[0]]
  if header[:2] != ["path", "patient_id"] or len(header) != 2 + NUM_LABELS:
    raise UserError(f"{path}:1: header {rows[0]} must be path,patient_id followed by "
                    f"{NUM_LABELS} label columns")
  paths, ids, labels, lines = [], [], [], []
  for n, row in enumerate(rows[1:], start=2):
    if not any(cell.strip() for cell in row):
      continue
    if len(row) < 2 or not row[0].strip() or not row[1].strip():
      raise UserError(f"{path}:{n}: a row needs a path and a patient_id, found {row}")
    labels.append(_parse_labels([c.strip() for c in row[2:]], f"{path}:{n}"))
    paths.append(clean_path(row[0].strip(), f"{path}:{n}"))
    ids.append(row[1].strip())
    lines.append(n)
  if not paths:
    raise UserError(f"CSV {path!r} has a header but no rows")
  _check_duplicates(paths, lambda i: f"{path}:{lines[i]}")
  return Table(np.array(paths, dtype=str), np.array(labels, np.float32), np.array(ids, dtype=str),
               path, np.array(lines))


def write_filelist(path_or_file, table: Table) -> None:
  """Reference format: `<relative path> l0 ... l7`."""
  lines = [f"{p} " + " ".join(str(int(x)) for x in row) for p, row in zip(table.paths, table.labels)]
  text = "\n".join(lines) + ("\n" if lines else "")
  with open(path_or_file, "w", encoding="utf-8") as f:
    f.write(text)


def unique_in_order(values) -> np.ndarray:
  _, first = np.unique(values, return_index=True)
  return np.asarray(values)[np.sort(first)]


def _shuffle_split(items: np.ndarray, test_size: float, seed: int):
  """(train, test) like scikit-learn's train_test_split(items, test_size, random_state=seed)."""
  n_test = math.ceil(test_size * len(items))
  perm = np.random.RandomState(seed).permutation(len(items))
  return items[perm[n_test:]], items[perm[:n_test]]


def split_patients(patient_ids, fractions=(0.8, 0.1, 0.1), seed: int = 42,
                   attacker_patients: int = 0) -> dict[str, np.ndarray]:
  """Unique patient ids (in order of first appearance) -> {split: ids}, reference procedure.

  The last `attacker_patients` patients in input order form the attacker split; the reference
  procedure splits the others, so a phantom grown by that many patients keeps its splits."""
  f_train, f_val, f_test = (float(x) for x in fractions)
  if min(f_train, f_val, f_test) <= 0 or abs(f_train + f_val + f_test - 1) > 1e-6:
    raise UserError(f"config.data.split_fractions={tuple(fractions)} must be three positive "
                    "fractions summing to 1, e.g. (0.8, 0.1, 0.1)")
  ids = unique_in_order(patient_ids)
  n_attacker = int(attacker_patients)
  if not 0 <= n_attacker <= len(ids) - 3:
    raise UserError(f"config.data.attacker_patients={attacker_patients} must be between 0 and "
                    f"{max(len(ids) - 3, 0)}: the {len(ids)} patients must leave at least 3 for "
                    "train/val/test")
  ids, attacker = ids[:len(ids) - n_attacker], ids[len(ids) - n_attacker:]
  if len(ids) < 3:
    raise UserError(f"only {len(ids)} patient(s): a patient-disjoint train/val/test split needs "
                    "at least 3 patients")
  train, rest = _shuffle_split(ids, f_val + f_test, seed)
  val, test = _shuffle_split(rest, f_test / (f_val + f_test), seed)
  return {"train": train, "val": val, "test": test, ATTACKER: attacker}


def check_patient_disjoint(splits: dict[str, Table]) -> None:
  owner = {}
  for name, table in splits.items():
    for pid in map(str, np.unique(table.patient_ids)):
      if owner.setdefault(pid, name) != name:
        raise UserError(f"patient {pid!r} is in both the {owner[pid]} and the {name} split; splits "
                        "must be patient-disjoint (one patient's scans would leak between them). "
                        "Let prepare split by patient, or fix the patient ids")


def keep_rows(labels: np.ndarray, split: str, single_label_train_val: bool = True) -> np.ndarray:
  """Reference rule: rows need a positive label; train/val keep exactly one (and the attacker
  split, which is trained on like train)."""
  positives = labels.sum(axis=1)
  if single_label_train_val and split in ("train", "val", ATTACKER):
    return positives == 1
  return positives >= 1


def split_files_of(value) -> tuple[str, ...]:
  """config.data.split_files as a tuple of paths: `a,b,c` on the command line arrives as one
  string (ml_collections reads a bare comma list as one element) and is split at the commas."""
  files = tuple(str(f) for f in value)
  if len(files) == 1 and "," in files[0]:
    files = tuple(f.strip() for f in files[0].split(","))
  if len(files) not in (3, 4):
    raise UserError(f"config.data.split_files has {len(files)} file(s) {files}; give the train, "
                    "val and test filelists (and optionally a fourth for the attacker split), "
                    "e.g. --config.data.split_files=\"('train.txt','val.txt','test.txt')\"")
  return files


def check_split_config(data_config) -> None:
  """The split settings' own checks (before any file is read)."""
  d = data_config
  if d.filter_order not in FILTER_ORDERS:
    raise UserError(f"config.data.filter_order={d.filter_order!r} is unknown; use "
                    f"{' or '.join(FILTER_ORDERS)} (filter_then_split: the reference's order, rows "
                    "without a positive label dropped before the patient split)")
  if d.split_files:
    split_files_of(d.split_files)
    if d.source != "filelist":
      raise UserError(f"config.data.split_files is set but config.data.source={d.source!r}; fixed "
                      "splits are read from filelists: use --config.data.source=filelist")
    if d.filelist:
      raise UserError("config.data.split_files and config.data.filelist are both set; give either "
                      "one filelist to split, or the split files to use as they are")
    if int(d.attacker_patients):
      raise UserError(f"config.data.attacker_patients={d.attacker_patients} cannot carve an "
                      "attacker split out of fixed split files (it would change the given "
                      "splits); give the attacker patients as a fourth file in "
                      "config.data.split_files, or set --config.data.attacker_patients=0")


def split_rows(table: Table, data_config, fixed: dict[str, np.ndarray] | None = None
               ) -> tuple[dict[str, np.ndarray], dict[str, int]]:
  """Row positions of each patient-disjoint split (in table order) and rows dropped by the rules
  (per split, and BEFORE_SPLIT: rows that reached no split).

  fixed: the rows of each split as given (read_split_files), instead of a patient split."""
  d = data_config
  if fixed is not None:
    owner = np.full(len(table), "", dtype=object)
    for name, r in fixed.items():
      owner[r] = name
    member = {name: owner == name for name in ALL_SPLITS}
  else:
    ids = table.patient_ids
    if d.filter_order == "filter_then_split":  # the reference: only labelled rows' patients split
      ids = ids[table.labels.sum(axis=1) >= 1]
    by_split = split_patients(ids, d.split_fractions, d.split_seed, d.attacker_patients)
    member = {name: np.isin(table.patient_ids, by_split[name]) for name in ALL_SPLITS}
  rows, dropped = {}, {}
  for name in ALL_SPLITS:
    mine = member[name]
    keep = mine & keep_rows(table.labels, name, d.single_label_train_val)
    rows[name] = np.flatnonzero(keep)
    dropped[name] = int(mine.sum() - keep.sum())
  # rows in no split: filter_then_split drops unlabelled patients' rows before splitting
  dropped[BEFORE_SPLIT] = int(len(table) - sum(int(m.sum()) for m in member.values()))
  check_patient_disjoint({name: table.take(r) for name, r in rows.items()})
  return rows, dropped

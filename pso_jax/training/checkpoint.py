"""Orbax checkpoints of the train state with the grain iterator state, plus EMA snapshots.

Layout under `diffusion/`:
  checkpoints/<step>/{state, data_iter, meta}   orbax, atomic (written to a temporary folder and
                                                renamed when complete), the newest N kept
                                                and any step named in keep_steps;
  ema_snapshots/ema-<nimg>-<std>.npz            EMA weights every snapshot_images, kept for
                                                post-hoc reconstruction of any EMA width;
  corrupt_checkpoints/<step>/                   checkpoints that did not restore (a truncated
                                                file, a broken JSON), set aside by a resume.
A checkpoint at step s holds the state after s updates; training resumes with update s + 1.
Every process calls save and restore (orbax coordinates them); process 0 writes the snapshots.
Arrays are restored straight into the shardings of the target (any mesh, any process count);
data_iter holds one grain state per process, which only the same process layout can use, so meta
also records the sample stream's layout and start (the train loop in stages/train.py: a resume on
another layout starts the loaders at global batch s instead). A resume or a sampler takes the newest
checkpoint that restores (`restore_newest`), naming each one it passes over.
"""

import errno
import glob
import os
import re

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from pso_jax import io_utils, parallel
from pso_jax.errors import UserError


def _handlers():
  return dict(state=ocp.StandardCheckpointHandler(),
              data_iter=grain.checkpoint.CheckpointHandler(),
              meta=ocp.JsonCheckpointHandler())


class Checkpointer:
  """The run's CheckpointManager: save(step, state, iterator, meta) / restore(step, target, it)."""

  def __init__(self, directory: str, *, keep: int, keep_steps=(), async_save: bool = True):
    """keep: the newest this many checkpoints survive each save; keep_steps: these steps survive
    too, whatever their age (autoguidance's guide, which sampling loads after training)."""
    self.directory = os.path.abspath(directory)
    self._failed = False
    policies = [ocp.checkpoint_managers.LatestN(max(1, int(keep)))]
    if keep_steps:
      policies.append(ocp.checkpoint_managers.CustomSteps([int(s) for s in keep_steps]))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies), create=True,
        cleanup_tmp_directories=True, enable_async_checkpointing=bool(async_save))
    self.manager = ocp.CheckpointManager(self.directory, item_handlers=_handlers(),
                                         options=options)

  def latest_step(self):
    return self.manager.latest_step()

  def all_steps(self):
    return list(self.manager.all_steps())

  def save(self, step: int, state, data_iter, meta: dict) -> None:
    items = dict(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    if data_iter is not None:
      items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
    try:
      self.manager.save(int(step), args=ocp.args.Composite(**items), force=True)
    except Exception as e:  # noqa: BLE001 (tensorstore reports OS errors as ValueError)
      error = self._save_error(step, e)
      if error is e:
        raise
      raise error from e

  def wait(self) -> None:
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001 (an async save's error surfaces here)
      error = self._save_error(None, e)
      if error is e:
        raise
      raise error from e

  def _save_error(self, step, e: Exception) -> Exception:
    """A UserError for disk errors (orbax leaves only a temporary folder, never a partial step)."""
    code = getattr(e, "errno", None)
    found = re.search(r"os_error_code='?(\d+)", str(e))
    code = int(found.group(1)) if found and code is None else code
    if code is None and not isinstance(e, OSError):
      return e
    self._failed = True
    what = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
            errno.EFBIG: "a file-size limit was reached"}.get(code, os.strerror(code) if code else str(e))
    latest = self.latest_step()
    kept = (f"the last complete checkpoint (step {latest}) is kept" if latest is not None
            else "no complete checkpoint exists yet")
    return UserError(f"saving the checkpoint{'' if step is None else f' of step {step}'} to "
                     f"{self.directory} failed: {what}; {kept}. Free space (or move the workdir) "
                     "and rerun the same command to resume")

  def check_compatible(self, step: int, abstract_state) -> None:
    """UserError naming the leaves whose shape or structure differ from the checkpoint's."""
    stored = self.manager.item_metadata(step)["state"]
    stored = ocp.tree.to_flat_dict(getattr(stored, "tree", stored))
    wanted = ocp.tree.to_flat_dict(ocp.tree.serialize_tree(abstract_state, keep_empty_nodes=True))
    stored = {k: tuple(v.shape) for k, v in stored.items() if hasattr(v, "shape")}
    wanted = {k: tuple(v.shape) for k, v in wanted.items() if hasattr(v, "shape")}
    name = "/".join
    order = lambda keys: sorted(keys, key=lambda k: (k[0] != "params", k))  # weights first
    problems = [f"{name(k)}: checkpoint {stored[k]} vs config {wanted[k]}"
                for k in order(set(stored) & set(wanted)) if stored[k] != wanted[k]]
    problems += [f"{name(k)}: only in the checkpoint" for k in order(set(stored) - set(wanted))]
    problems += [f"{name(k)}: only in this config" for k in order(set(wanted) - set(stored))]
    if problems:
      shown = "\n  ".join(problems[:12]) + ("\n  ..." if len(problems) > 12 else "")
      raise UserError(
          f"the checkpoint at {self.directory}/{step} was written by a model of another shape "
          f"({len(problems)} leaves differ):\n  {shown}\nResume with the config that wrote it "
          f"(the 'config' entry of {os.path.join(self.directory, str(step), 'meta')}), or train "
          "this config in a new --workdir")

  def restore(self, step: int, abstract_state, data_iter=None):
    """(state, meta): state restored straight into the shardings of `abstract_state`."""
    self.check_compatible(step, abstract_state)
    items = dict(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
    if data_iter is not None:
      items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
    out = self.manager.restore(int(step), args=ocp.args.Composite(**items))
    return out["state"], out["meta"]

  def read_meta(self, step: int) -> dict:
    return self.manager.restore(int(step), args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore_newest(self, restore_step):
    """(step, restore_step(step), corrupt) for the newest checkpoint that restores.

    A checkpoint that does not read back (a truncated data file, a broken JSON file: any error
    but a UserError, which says the files are sound but do not fit this run) is passed over for
    the one before it; `corrupt` lists (step, reason) of those, newest first. (None, None, [])
    when there is no checkpoint; a UserError naming each one when none restores.
    """
    corrupt = []
    for step in sorted(self.all_steps(), reverse=True):
      try:
        return step, restore_step(step), corrupt
      except UserError:
        raise
      except Exception as e:  # noqa: BLE001 (tensorstore, orbax, grain and json raise many types)
        corrupt.append((step, _reason(e)))
    if corrupt:
      raise UserError(f"no checkpoint in {self.directory} restores: "
                      + "; ".join(f"step {s}: {why}" for s, why in corrupt)
                      + ". Move that folder away to train from the start")
    return None, None, []

  def set_aside(self, steps) -> str:
    """Moves checkpoints that do not restore out of the manager's folder, into corrupt/ beside it
    (nothing is deleted), so training can save those steps again. Returns that folder."""
    aside = os.path.join(os.path.dirname(self.directory), "corrupt_checkpoints")
    if jax.process_index() == 0:
      os.makedirs(aside, exist_ok=True)
      for step in steps:
        target, n = os.path.join(aside, str(step)), 1
        while os.path.exists(target):  # the same step went bad before
          target, n = os.path.join(aside, f"{step}.{n}"), n + 1
        os.replace(os.path.join(self.directory, str(step)), target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("pso_jax checkpoints set aside")
    self.manager.reload()
    return aside

  def close(self) -> None:
    try:
      self.wait()
    except UserError:
      if not self._failed:
        raise
    finally:
      self.manager.close()


def _reason(e: BaseException) -> str:
  """The first line of the innermost error (orbax wraps tensorstore's, which names the file)."""
  while (e.__cause__ or e.__context__) is not None:
    e = e.__cause__ or e.__context__
  lines = str(e).strip().splitlines()
  return f"{type(e).__name__}: {lines[0][:300] if lines else ''}"


# ------------------------------------------------------------------ EMA snapshots

_SNAPSHOT = re.compile(r"ema-(\d+)-([0-9.]+)\.npz$")


def _leaf_name(path) -> str:
  parts = []
  for entry in path:
    for attr in ("key", "name", "idx"):
      if hasattr(entry, attr):
        parts.append(str(getattr(entry, attr)))
        break
  return "/".join(parts)


def _flat(tree) -> dict:
  return {_leaf_name(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def save_ema_snapshots(directory: str, ema_by_std: dict, nimg: int) -> None:
  """Writes one npz per EMA width (all processes gather; process 0 writes)."""
  host = {std: parallel.to_host(tree) for std, tree in ema_by_std.items()}
  if jax.process_index() != 0:
    return
  for std, tree in host.items():
    path = os.path.join(directory, f"ema-{int(nimg):012d}-{float(std):.4f}.npz")
    with io_utils.atomic_path(path) as tmp:
      with open(tmp, "wb") as f:
        np.savez(f, **_flat(tree))


def list_ema_snapshots(directory: str) -> list[tuple[int, float, str]]:
  """(nimg, std, path) of every snapshot, oldest first."""
  out = []
  for path in glob.glob(os.path.join(directory, "ema-*.npz")):
    m = _SNAPSHOT.search(os.path.basename(path))
    if m:
      out.append((int(m.group(1)), float(m.group(2)), path))
  return sorted(out)


def load_ema_snapshot(path: str, like):
  """The params tree of a snapshot, in the structure of `like`."""
  with np.load(path) as z:
    flat = dict(z)
  paths, treedef = jax.tree_util.tree_flatten_with_path(like)
  names = [_leaf_name(p) for p, _ in paths]
  missing = [n for n in names if n not in flat]
  if missing:
    raise UserError(f"EMA snapshot {path} does not match this model ({len(missing)} missing "
                    f"leaves, e.g. {missing[0]}); it was written by another config")
  leaves = [flat[n] for n in names]
  return jax.tree.unflatten(treedef, leaves)

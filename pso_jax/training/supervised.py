"""A small sharded supervised trainer, shared by the re-id embedder and the finding classifier.

The train step is one jitted pure function `(state, batch, key) -> (state, metrics)`: parameters
and optimizer state replicated, the batch split over the mesh's batch axes (`parallel.batch_spec`;
GSPMD inserts the gradient all-reduce, and BatchNorm statistics are those of the global batch).
The names say "supervised" (`SupervisedState`, `make_supervised_step`, `make_supervised_optimizer`)
to keep them apart from the diffusion model's (`diffusion.train_step`, `diffusion.optim`).
The caller supplies three pieces:
  - `sampler(step) -> dict of numpy arrays`: the global batch, a deterministic function of step,
    so every process of a multi-host run builds the same batch and keeps its own shard. With
    `images` (a lazy column, `data.dataset.RecordColumn`, or an array) the sampler returns record
    indices ("index") instead of images, and each process decodes only the images of its own rows
    of the batch, step by step (streaming: memory holds one batch);
  - `inputs_fn(images, key) -> float inputs`: in-graph augmentation from the step key;
  - `loss_fn(outputs, batch) -> (loss, metrics)`.
`val_fn(variables) -> float` (lower is better) picks the best checkpoint.
"""

import dataclasses
import json
import os
import time
from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from pso_jax import io_utils, parallel, progress
from pso_jax.errors import UserError


@flax.struct.dataclass
class SupervisedState:
  step: jax.Array
  params: Any
  model_state: Any  # non-trained collections (BatchNorm statistics); {} when there are none
  opt_state: Any
  lr_scale: jax.Array  # multiplies the optimizer's updates (= its learning rate, for Adam)

  @property
  def variables(self) -> dict:
    return {"params": self.params, **self.model_state}


@dataclasses.dataclass
class Plateau:
  """torch's ReduceLROnPlateau (mode min, relative threshold): the learning rate is multiplied by
  `factor` once the validation value has not improved for more than `patience` evaluations."""
  patience: int
  factor: float = 0.1
  threshold: float = 1e-4
  best: float = float("inf")
  bad: int = 0
  scale: float = 1.0

  def update(self, value: float) -> float:
    if value < self.best * (1 - self.threshold):
      self.best, self.bad = value, 0
    else:
      self.bad += 1
      if self.bad > self.patience:
        self.scale, self.bad = self.scale * self.factor, 0
    return self.scale


@dataclasses.dataclass
class FitResult:
  variables: dict           # final weights (host numpy)
  best_variables: dict      # weights with the lowest validation value (final when no val_fn)
  best_step: int
  best_val: Optional[float]
  history: list             # {"step", "loss", ...} every log_every steps, plus val entries
  seconds: float


def make_supervised_optimizer(lr: float, weight_decay: float = 0.0, steps: int = 0,
                   schedule: str = "constant") -> optax.GradientTransformation:
  """Adam with L2 weight decay added to the gradient (torch.optim.Adam's weight_decay, as in the
  reference classifier), constant or cosine-decayed learning rate."""
  if schedule == "cosine":
    warmup = max(1, steps // 20)
    lr = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), lr * 0.01)
  parts = [optax.add_decayed_weights(weight_decay)] if weight_decay else []
  return optax.chain(*parts, optax.adam(lr))


def create_state(variables: dict, optimizer) -> SupervisedState:
  variables = dict(variables)
  params = variables.pop("params")
  return SupervisedState(step=jnp.zeros((), jnp.int32), params=params, model_state=variables,
                         opt_state=optimizer.init(params), lr_scale=jnp.ones((), jnp.float32))


def make_supervised_step(model, optimizer, inputs_fn: Callable, loss_fn: Callable, mesh):
  """The jitted `(state, batch, key) -> (state, metrics)` on `mesh` (state replicated, batch split
  over the batch axes; the state is donated)."""
  replicated = parallel.replicated(mesh)

  def train_step(state: SupervisedState, batch: dict, key):
    step_key = jax.random.fold_in(key, state.step)
    x = inputs_fn(batch["image"], step_key)
    mutable = list(state.model_state) or False

    def objective(params):
      result = model.apply({"params": params, **state.model_state}, x, train=True, mutable=mutable)
      outputs, updates = result if mutable else (result, {})
      loss, metrics = loss_fn(outputs, batch)
      return loss, (updates, metrics)

    (loss, (updates, metrics)), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
    deltas, opt_state = optimizer.update(grads, state.opt_state, state.params)
    deltas = jax.tree.map(lambda d: d * state.lr_scale, deltas)
    state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, deltas),
                          model_state={**state.model_state, **updates}, opt_state=opt_state)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), **metrics}
    return state, metrics

  return jax.jit(train_step, in_shardings=(replicated, parallel.batch_sharding(mesh), replicated),
                 out_shardings=(replicated, replicated), donate_argnums=0)


def batch_reader(sampler: Callable[[int], dict], images, batch_sharding, batch_size: int):
  """step -> this process's rows of the global batch as host numpy: the sampler's small arrays cut
  to the process's rows, and `images[index]` decoded for those rows only (or, without `images`,
  the sampler's own "image" rows)."""
  from pso_jax.data import pipeline  # the rows a process loads: the loaders' rule
  rows = np.asarray(pipeline.process_rows(batch_sharding, batch_size)[jax.process_index()])

  def read(step: int) -> dict:
    batch = sampler(step)
    local = {k: np.asarray(v)[rows] for k, v in batch.items() if k != "index"}
    if images is not None:
      local["image"] = np.asarray(images[np.asarray(batch["index"])[rows]])
    return local

  return read


def fit(*, model, variables: dict, optimizer, inputs_fn: Callable, loss_fn: Callable,
        sampler: Callable[[int], dict], steps: int, key, mesh, desc: str = "train",
        val_fn: Optional[Callable[[dict], float]] = None, eval_every: int = 0,
        log_every: int = 50, plateau: Optional[Plateau] = None, images=None) -> FitResult:
  """Runs `steps` train steps; evaluates `val_fn` every `eval_every` steps and at the end
  (and lowers the learning rate on a plateau of the validation value when `plateau` is given).
  images: the training images the sampler's "index" refers to (None: it returns "image")."""
  first = sampler(0)
  if (images is None) == ("image" not in first):
    raise ValueError("the sampler returns images or record indices: pass `images` exactly when "
                     "it returns 'index'")
  batch_size = len(first["image" if images is None else "index"])
  shards = parallel.batch_shards(mesh)
  if batch_size % shards:
    raise UserError(f"{desc}: batch size {batch_size} is not divisible by the {shards} devices the "
                    f"mesh splits a batch over; choose a batch size that is a multiple of {shards}")
  replicated, batch_sharding = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  read = batch_reader(sampler, images, batch_sharding, batch_size)
  step_fn = make_supervised_step(model, optimizer, inputs_fn, loss_fn, mesh)
  state = jax.device_put(create_state(variables, optimizer), replicated)
  key = jax.device_put(key, replicated)
  history, best = [], (None, 0, None)  # (best value, step, host variables)
  start = time.time()
  eval_every = eval_every or steps
  # batches are read in this thread: a reader thread decoding the next batch while XLA ran this
  # one was followed once by a native abort in the full suite (not reproduced alone), and at the
  # batch sizes here a batch decodes in milliseconds
  with progress.bar(total=steps, desc=desc, unit="step") as pbar:
    for step in range(steps):
      local = read(step)
      batch = parallel.local_rows_to_global(local, batch_sharding)
      state, metrics = step_fn(state, batch, key)
      if (step + 1) % log_every == 0 or step + 1 == steps:
        entry = {"step": step + 1, **{k: float(v) for k, v in jax.device_get(metrics).items()}}
        history.append(entry)
        pbar.set_postfix(loss=f"{entry['loss']:.4f}")
      if val_fn is not None and ((step + 1) % eval_every == 0 or step + 1 == steps):
        value = float(val_fn(state.variables))
        entry = {"step": step + 1, "val": value}
        if best[0] is None or value < best[0]:
          best = (value, step + 1, jax.device_get(state.variables))
        if plateau is not None:
          entry["lr_scale"] = plateau.update(value)
          state = state.replace(lr_scale=jax.device_put(jnp.float32(entry["lr_scale"]), replicated))
        history.append(entry)
      pbar.update(1)
  final = jax.device_get(state.variables)
  if best[2] is None:
    best = (None, steps, final)
  return FitResult(variables=final, best_variables=best[2], best_step=best[1], best_val=best[0],
                   history=history, seconds=time.time() - start)


# ------------------------------------------------------------------ checkpoints (orbax)

def save_variables(directory: str, variables: dict) -> None:
  """Writes a variables tree with orbax (every process calls it; the write is atomic)."""
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.abspath(directory), variables, force=True)
  checkpointer.wait_until_finished()


def restore_variables(directory: str, abstract: dict) -> dict:
  """Restores into the structure of `abstract` (e.g. `jax.eval_shape` of the init), on device 0."""
  if not os.path.isdir(directory):
    raise UserError(f"no checkpoint at {directory!r}; run the stage that trains it first")
  sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                        abstract)
  return ocp.StandardCheckpointer().restore(os.path.abspath(directory), target)


def write_history(path: str, history: list) -> None:
  if jax.process_index() == 0:
    io_utils.write_text(path, "".join(json.dumps(h) + "\n" for h in history))

"""The train state and one pure, jitted train step of the EDM2 diffusion model.

train_step(state, batch, key) -> (state, metrics):
  conditions regularised (diffusion/regulariser.py) -> images augmented with their labels when
  train.augment_p > 0 (diffusion/augment.py) -> EDM2 loss and gradient, accumulated over
  `grad_accum` micro-batches with lax.scan -> non-finite gradients zeroed -> Adam -> forced weight
  normalisation of the MP weights -> power-function EMA update.

Randomness does not depend on how the batch is laid out: the regulariser draws for the whole
global batch, and every image gets its own loss key (split from the step key), so 1 device, 8
devices, FSDP and any grad_accum see the same noise for the same image.
"""

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec as P

from pso_jax.diffusion import augment
from pso_jax.diffusion import ema as ema_lib
from pso_jax.diffusion import regulariser
from pso_jax.diffusion.loss import edm2_loss
from pso_jax.models.mp_layers import project_mp_weights
from pso_jax.models import presets
from pso_jax import parallel
from pso_jax.diffusion import optim


@struct.dataclass
class TrainState:
  step: jax.Array      # updates applied so far (int32); images seen = step * global batch
  params: Any          # fp32 master weights (MP weights kept forced-normalised)
  opt_state: Any
  ema: tuple           # one fp32 params copy per config.train.ema_stds width
  constants: Any       # non-trainable collections (Fourier features), passed to apply unchanged


def init_state(model, config, key) -> TrainState:
  """Pure in `key`: jit it with out_shardings to create the state directly sharded."""
  variables = dict(presets.init_variables(model, key, config))
  params = variables.pop("params")
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=optim.make_optimizer(config.train).init(params),
                    ema=ema_lib.phema_init(params, tuple(config.train.ema_stds)),
                    constants=variables)


def _micro_batches(tree, accum: int):
  """[B, ...] -> [accum, B/accum, ...]; micro-batch i holds images b with b % accum == i, so each
  device keeps its own images in every micro-batch (no data moves)."""
  def split(a):
    a = a.reshape(a.shape[0] // accum, accum, *a.shape[1:])
    return jnp.swapaxes(a, 0, 1)
  return jax.tree.map(split, tree)


def make_train_step(model, config):
  """The pure step function (not jitted; see `jit_train_step`)."""
  tx = optim.make_optimizer(config.train)
  lr_fn = optim.learning_rate(config.train)
  stds = tuple(config.train.ema_stds)
  batch_size = int(config.train.batch_size)
  accum = int(config.train.grad_accum)
  augment_p = float(config.train.augment_p)
  shift = augment.max_shift(config.train, presets.model_input_shape(config)[0])

  def mean_loss(params, constants, x, cond, keys):
    variables = {"params": params, **constants}

    def one_image(x1, c1, k1):  # per-image keys: draws independent of the batch layout
      c1 = None if c1 is None else c1[None]
      labels = None
      if augment_p > 0:  # its own key folded from the image's, so the loss draws are unchanged
        x1, labels = augment.augment_one(x1, jax.random.fold_in(k1, 1), augment_p, shift)
        labels = labels[None]
      return edm2_loss(model, variables, x1[None], c1, k1, config, train=True,
                       augment_labels=labels)
    losses, aux = jax.vmap(one_image)(x, cond, keys)
    return jnp.mean(losses), jax.tree.map(jnp.mean, aux)

  grad_fn = jax.value_and_grad(mean_loss, has_aux=True)

  def train_step(state: TrainState, batch: dict, key):
    key = jax.random.fold_in(key, state.step)
    key_reg, key_loss = jax.random.split(key)
    cond = regulariser.regularise(batch.get("cond"), key_reg, config.regulariser,
                                  batch.get("kanon_cond"))
    inputs = (batch["x"], cond, jax.random.split(key_loss, batch["x"].shape[0]))
    if accum == 1:
      (loss, aux), grads = grad_fn(state.params, state.constants, *inputs)
    else:
      def accumulate(total, micro):
        out = grad_fn(state.params, state.constants, *micro)
        return jax.tree.map(jnp.add, total, out), None
      zeros = jax.eval_shape(grad_fn, state.params, state.constants,
                             *jax.tree.map(lambda a: a[0], _micro_batches(inputs, accum)))
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zeros)
      total, _ = jax.lax.scan(accumulate, zeros, _micro_batches(inputs, accum))
      (loss, aux), grads = jax.tree.map(lambda t: t / accum, total)
    grads = optim.zero_nonfinite(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = project_mp_weights(optax.apply_updates(state.params, updates))
    nimg = (state.step.astype(jnp.float32) + 1) * batch_size
    ema = ema_lib.phema_update(state.ema, params, nimg, batch_size, stds)
    metrics = dict(aux, loss=loss, grad_norm=optax.tree.norm(grads), lr=lr_fn(state.step))
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema=ema)
    return new_state, metrics

  return train_step


def jit_train_step(step_fn, state_shardings, mesh):
  """jax.jit with the state in its FSDP shardings (donated), the batch split over every device."""
  return jax.jit(step_fn,
                 in_shardings=(state_shardings, parallel.batch_sharding(mesh),
                               NamedSharding(mesh, P())),
                 out_shardings=(state_shardings, NamedSharding(mesh, P())),
                 donate_argnums=(0,), compiler_options=parallel.compiler_options(mesh))

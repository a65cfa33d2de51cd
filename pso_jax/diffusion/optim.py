"""Adam with the EDM2 reference learning-rate schedule, and zeroed non-finite gradients.

lr(t) = lr_ref / sqrt(max(t / (t_ref_batches * B), 1)) * min(t / warmup_images, 1), with t the
number of images seen including the batch being applied (so the very first update is not
wasted at lr 0) and B the global batch. No weight decay (EDM2's weights are normalised anyway).
"""

import jax
import jax.numpy as jnp
import optax


def learning_rate(train_config):
  """step (number of updates already applied) -> learning rate of the next update."""
  lr_ref = float(train_config.lr_ref)
  batch = int(train_config.batch_size)
  decay_images = float(train_config.t_ref_batches) * batch
  warmup = float(train_config.warmup_images)

  def schedule(step):
    t = (jnp.asarray(step, jnp.float32) + 1.0) * batch
    lr = lr_ref / jnp.sqrt(jnp.maximum(t / decay_images, 1.0)) if decay_images > 0 else lr_ref
    if warmup > 0:
      lr = lr * jnp.minimum(t / warmup, 1.0)
    return jnp.asarray(lr, jnp.float32)
  return schedule


def zero_nonfinite(tree):
  return jax.tree.map(lambda g: jnp.where(jnp.isfinite(g), g, jnp.zeros_like(g)), tree)


def force_finite() -> optax.GradientTransformation:
  """Replaces NaN and +-Inf gradient entries by 0 (EDM2's nan_to_num before every update)."""
  def update(updates, state, params=None):
    del params
    return zero_nonfinite(updates), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(train_config) -> optax.GradientTransformation:
  return optax.chain(
      force_finite(),
      optax.adam(learning_rate(train_config), b1=float(train_config.adam_b1),
                 b2=float(train_config.adam_b2), eps=float(train_config.adam_eps)))

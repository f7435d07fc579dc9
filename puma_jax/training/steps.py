"""The parts every stage's train step is made of (jitted and sharded by the loop).

A step takes the trainable parameters, the optimizer state and a global batch, and returns the
new ones plus metrics. Frozen parameters (CLIP, VAE) come in separately and never get a
gradient. Gradient accumulation (`accumulate`) splits the batch into microbatches inside the
step (`lax.scan`); a stage's per-microbatch loss is normalized by the *whole* batch, so the sum
over microbatches is the same update as one big batch. `apply` is the guarded optimizer update.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
  step: jax.Array
  params: Any      # trainable parameters (pure dict)
  opt_state: Any


def split_micro(batch: dict, n: int) -> dict:
  """(B, ...) leaves -> (n, B / n, ...): the microbatches `accumulate` scans over."""
  def one(x):
    if x.shape[0] % n:
      raise ValueError(f"batch of {x.shape[0]} does not split into {n} microbatches "
                       "(train.grad_accum_steps)")
    return x.reshape((n, x.shape[0] // n) + x.shape[1:])
  return jax.tree.map(one, batch)


def accumulate(loss_fn: Callable, params, batch: dict, n: int):
  """Sum of (loss, grads, metrics) of `loss_fn(params, microbatch) -> (loss, metrics)` over n
  microbatches; loss_fn is already normalized so that its values add up to the full-batch loss.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if n == 1:
    (loss, metrics), grads = grad_fn(params, batch)
    return loss, grads, metrics
  micro = split_micro(batch, n)
  first = jax.tree.map(lambda x: x[0], micro)
  (l0, m0), g0 = grad_fn(params, first)

  def body(carry, mb):
    loss, grads, metrics = carry
    (l, m), g = grad_fn(params, mb)
    return (loss + l, jax.tree.map(jnp.add, grads, g), jax.tree.map(jnp.add, metrics, m)), None

  rest = jax.tree.map(lambda x: x[1:], micro)
  (loss, grads, metrics), _ = jax.lax.scan(body, (l0, g0, m0), rest)
  return loss, grads, metrics


def apply(state: TrainState, tx: optax.GradientTransformation, loss, grads, metrics):
  """Optimizer update, skipped (parameters kept) when the loss or gradients are not finite, so
  a saved checkpoint never holds a non-finite update. Adds loss, grad_norm, finite to metrics."""
  gnorm = optax.global_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(gnorm)
  updates, new_opt = tx.update(grads, state.opt_state, state.params)
  new_params = optax.apply_updates(state.params, updates)
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
  new_state = TrainState(step=state.step + 1, params=keep(new_params, state.params),
                         opt_state=keep(new_opt, state.opt_state))
  metrics = dict(metrics, loss=loss, grad_norm=gnorm, finite=finite.astype(jnp.float32))
  return new_state, metrics

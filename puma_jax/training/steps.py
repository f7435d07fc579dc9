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
  params: Any  # trainable parameters (pure dict), float32 master weights
  opt_state: Any
  # precision.DynamicLossScale: dynamic for float16 compute, a fixed 1 otherwise
  loss_scale: Any = None


def split_micro(batch: dict, n: int) -> dict:
  """(B, ...) leaves -> (n, B / n, ...), strided: microbatch i holds rows i, i + n, i + 2n, ...

  The batch is sharded over devices in contiguous blocks of rows; a strided split gives every
  microbatch the same share of every device's block, so no row moves between devices (a
  contiguous split needs an all-to-all). Losses are normalized by the whole batch, so which rows
  share a microbatch does not change the update."""

  def one(x):
    if x.shape[0] % n:
      raise ValueError(
        f"batch of {x.shape[0]} does not split into {n} microbatches (train.grad_accum_steps)"
      )
    return jnp.swapaxes(x.reshape((x.shape[0] // n, n) + x.shape[1:]), 0, 1)

  return jax.tree.map(one, batch)


def accumulate(loss_fn: Callable, params, batch: dict, n: int, loss_scale=None):
  """Sum of (loss, grads, metrics) of `loss_fn(params, microbatch) -> (loss, metrics)` over n
  microbatches, all inside one `lax.scan` (the model is traced once); loss_fn is already
  normalized so that its values add up to the full-batch loss. With a dynamic `loss_scale`
  (float16) the loss is scaled before differentiation: the returned loss and gradients are
  scaled too, and `apply` unscales them."""
  if loss_scale is not None:
    inner = loss_fn

    def loss_fn(p, mb):
      loss, metrics = inner(p, mb)
      return loss_scale.scale_loss(loss), metrics

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if n == 1:
    (loss, metrics), grads = grad_fn(params, batch)
    return loss, grads, metrics
  micro = split_micro(batch, n)
  shapes = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro))
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

  def body(carry, mb):
    ((loss, metrics), grads) = carry
    (l, m), g = grad_fn(params, mb)
    return ((loss + l, jax.tree.map(jnp.add, metrics, m)), jax.tree.map(jnp.add, grads, g)), None

  ((loss, metrics), grads), _ = jax.lax.scan(body, zeros, micro)
  return loss, grads, metrics


def apply(state: TrainState, tx: optax.GradientTransformation, loss, grads, metrics):
  """Optimizer update, skipped (parameters kept) when the loss or gradients are not finite, so
  a saved checkpoint never holds a non-finite update. Adds loss, grad_norm, finite to metrics.

  With a dynamic loss scale (float16) the loss and gradients arrive scaled and are unscaled
  here. A gradient overflow is then expected now and then: the step is skipped, the scale
  lowered and the step counted in `overflow`, and `finite` stays 1 so the run goes on; only a
  non-finite loss, or overflows that persist at the smallest scale, clear `finite` (the loop's
  guard stops the run). `loss_scale` is reported with the metrics."""
  ls = state.loss_scale
  dynamic = ls is not None and ls.dynamic
  if dynamic:
    loss = loss / ls.scale
    grads = ls.unscale(grads)
  gnorm = optax.global_norm(grads)
  loss_ok, grads_ok = jnp.isfinite(loss), jnp.isfinite(gnorm)
  ok = loss_ok & grads_ok
  updates, new_opt = tx.update(grads, state.opt_state, state.params)
  new_params = optax.apply_updates(state.params, updates)
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
  new_ls = ls.adjust(grads_ok) if dynamic else ls
  new_state = TrainState(
    step=state.step + 1,
    params=keep(new_params, state.params),
    opt_state=keep(new_opt, state.opt_state),
    loss_scale=new_ls,
  )
  finite = ok
  extra = {}
  if dynamic:
    finite = loss_ok & (grads_ok | (ls.scale > ls.min_scale))
    extra = {"overflow": (~grads_ok).astype(jnp.float32), "loss_scale": ls.scale}
  metrics = dict(metrics, loss=loss, grad_norm=gnorm, finite=finite.astype(jnp.float32), **extra)
  return new_state, metrics


def mean_loss_step(loss_fn: Callable, seed: int, n: int, size_key: str, tx):
  """The train step of a stage whose loss is a mean over examples (the VAE and decoder
  stages): `loss_fn(params, microbatch, frozen, rest, key) -> (loss, metrics)` with one step
  key (from `seed` and the step) and `microbatch["_index"]`, each example's index in the batch
  (for per-example keys). Each of the `n` microbatches' means is divided by n, so they add up
  to the batch's mean; then `apply`."""
  base = jax.random.key(seed)

  def step(state, frozen, rest, batch):
    key = jax.random.fold_in(base, state.step)
    batch = dict(batch, _index=jnp.arange(batch[size_key].shape[0]))

    def per_micro(params, mb):
      loss, m = loss_fn(params, mb, frozen, rest, key)
      return loss / n, jax.tree.map(lambda x: x / n, m)

    loss, grads, m = accumulate(per_micro, state.params, batch, n, state.loss_scale)
    return apply(state, tx, loss, grads, m)

  return step

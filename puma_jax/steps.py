"""Pure train and eval step functions (jitted and sharded by `train.py`).

A step takes the trainable parameters, the optimizer state and a global batch, and returns the
new ones plus metrics. Frozen parameters (CLIP, VAE) come in separately and never get a
gradient. Gradient accumulation splits the batch into microbatches inside the step (`lax.scan`),
and normalizes every loss term by the *whole* batch's token counts, so accumulating gives the
same update as one big batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from puma_jax import losses


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
  step: jax.Array
  params: Any      # trainable nnx.State
  opt_state: Any


def _split_micro(batch: dict, n: int) -> dict:
  def one(x):
    if x.shape[0] % n:
      raise ValueError(f"batch of {x.shape[0]} does not split into {n} microbatches "
                       "(train.grad_accum_steps)")
    return x.reshape((n, x.shape[0] // n) + x.shape[1:])
  return jax.tree.map(one, batch)


def _accumulate(loss_fn: Callable, params, batch: dict, n: int):
  """Sum of (loss, grads, metrics) over n microbatches; loss_fn is already normalized so that
  its values add up to the full-batch loss."""
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if n == 1:
    (loss, metrics), grads = grad_fn(params, batch)
    return loss, grads, metrics
  micro = _split_micro(batch, n)
  first = jax.tree.map(lambda x: x[0], micro)
  (l0, m0), g0 = grad_fn(params, first)

  def body(carry, mb):
    loss, grads, metrics = carry
    (l, m), g = grad_fn(params, mb)
    return (loss + l, jax.tree.map(jnp.add, grads, g), jax.tree.map(jnp.add, metrics, m)), None

  rest = jax.tree.map(lambda x: x[1:], micro)
  (loss, grads, metrics), _ = jax.lax.scan(body, (l0, g0, m0), rest)
  return loss, grads, metrics


def _apply(state: TrainState, tx: optax.GradientTransformation, loss, grads, metrics):
  """Optimizer update, skipped (parameters kept) when the loss or gradients are not finite."""
  gnorm = optax.global_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(gnorm)
  updates, new_opt = tx.update(grads, state.opt_state, state.params)
  new_params = optax.apply_updates(state.params, updates)
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
  new_state = TrainState(step=state.step + 1, params=keep(new_params, state.params),
                         opt_state=keep(new_opt, state.opt_state))
  metrics = dict(metrics, loss=loss, grad_norm=gnorm, finite=finite.astype(jnp.float32))
  return new_state, metrics


# ----------------------------------------------------------------------------------------------
# MLLM (pretraining and unified tuning)


def mllm_totals(batch: dict) -> dict:
  return {"text": jnp.maximum(jnp.sum(batch["text_mask"].astype(jnp.float32)), 1.0),
          "image": jnp.maximum(jnp.sum((batch["feature_weight"] > 0).astype(jnp.float32)), 1.0),
          "router": jnp.maximum(jnp.sum((batch["router_label"] >= 0).astype(jnp.float32)), 1.0)}


def mllm_objective(graphdef, frozen, rest, loss_cfg: dict):
  """loss_fn(params, microbatch) -> (loss normalized by the full batch's counts, metric sums)."""

  def loss_fn(params, mb):
    totals = mb.pop("_totals")
    model = nnx.merge(graphdef, frozen, params, rest)
    out = model(mb)
    _, m = losses.mllm_loss(out["logits"], out["feature_pred"], out["features"], mb,
                            router_logits=out.get("router_logits"))
    loss = (loss_cfg["text_weight"] * m["text_ce_sum"] / totals["text"]
            + loss_cfg["image_weight"] * m["image_mse_sum"] / totals["image"]
            + loss_cfg["router_weight"] * m["router_ce_sum"] / totals["router"])
    return loss, m

  return loss_fn


def mllm_train_step(state: TrainState, frozen, rest, batch: dict, *, graphdef,
                    tx: optax.GradientTransformation, loss_cfg: dict, grad_accum: int = 1):
  totals = mllm_totals(batch)
  n = grad_accum
  batch = dict(batch, _totals=jax.tree.map(
      lambda x: jnp.broadcast_to(x, (batch["tokens"].shape[0],)), totals))
  loss_fn = mllm_objective(graphdef, frozen, rest, loss_cfg)

  def per_micro(params, mb):
    mb = dict(mb)
    mb["_totals"] = jax.tree.map(lambda x: x[0], mb["_totals"])
    return loss_fn(params, mb)

  loss, grads, metrics = _accumulate(per_micro, state.params, batch, n)
  return _apply(state, tx, loss, grads, metrics)


def mllm_eval_step(params, frozen, rest, batch: dict, *, graphdef, loss_cfg: dict):
  batch = dict(batch, _totals=mllm_totals(batch))
  loss, m = mllm_objective(graphdef, frozen, rest, loss_cfg)(params, batch)
  return dict(m, loss=loss)

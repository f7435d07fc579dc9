"""PUMA's training losses (docs/DESIGN.md §7) and the diffusion loss.

MLLM: loss = 0.02 * text_CE + 1.0 * image_MSE, where text_CE is the mean cross-entropy over the
batch's supervised text positions, and image_MSE is the mean over the batch's supervised image
feature tokens of (scale weight x the token's mean squared error over feature dims); weights
f4..f0 = 1024, 512, 64, 8, 1. Both means are over the whole batch (not per sequence), so packing
examples into rows leaves the loss unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

TEXT_WEIGHT = 0.02
IMAGE_WEIGHT = 1.0
NUM_SCALES = 5
NUM_TASKS = 7


def mllm_loss(logits: jax.Array, feature_pred: jax.Array, features: jax.Array, batch: dict, *,
              text_weight: float = TEXT_WEIGHT, image_weight: float = IMAGE_WEIGHT,
              router_logits: jax.Array | None = None, router_weight: float = 0.0):
  """Returns (loss, metrics); metrics hold sums and counts so they add across microbatches.

  logits (B, T, V); feature_pred (B, T, D): the head's prediction at each position of the
  *next* slot's feature; features (B, T, D): the input features at feature slots (teacher
  forcing), whose shift by one position is the target. `batch` holds `text_target`,
  `text_mask`, `feature_weight`, `target_scale`, `task_id` (see puma_jax.sequence).
  With `router_logits` (B, T, 5), adds `router_weight` x the mean router cross-entropy at the
  positions with a `router_label` (ours, docs/DESIGN.md §7: the router is not in the paper's loss).
  """
  f32 = jnp.float32
  text_mask = batch["text_mask"].astype(f32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(f32), batch["text_target"])
  ce_sum = jnp.sum(ce * text_mask)
  n_text = jnp.sum(text_mask)

  target = jnp.concatenate([features[:, 1:], jnp.zeros_like(features[:, :1])], axis=1)
  tok_mse = jnp.mean(jnp.square(feature_pred.astype(f32) - target.astype(f32)), axis=-1)
  w = batch["feature_weight"].astype(f32)
  feat_mask = (w > 0).astype(f32)
  mse_sum = jnp.sum(w * tok_mse)
  n_feat = jnp.sum(feat_mask)

  text_ce = ce_sum / jnp.maximum(n_text, 1.0)
  image_mse = mse_sum / jnp.maximum(n_feat, 1.0)
  loss = text_weight * text_ce + image_weight * image_mse
  router_sum = router_count = jnp.zeros((), f32)
  if router_logits is not None:
    label = batch["router_label"]
    rmask = (label >= 0).astype(f32)
    rce = optax.softmax_cross_entropy_with_integer_labels(router_logits.astype(f32),
                                                          jnp.maximum(label, 0))
    router_sum, router_count = jnp.sum(rce * rmask), jnp.sum(rmask)
    loss = loss + router_weight * router_sum / jnp.maximum(router_count, 1.0)

  scale = batch["target_scale"]
  task = batch["task_id"]
  metrics = {
      "text_ce_sum": ce_sum, "text_count": n_text,
      "image_mse_sum": mse_sum, "image_count": n_feat,
      "router_ce_sum": router_sum, "router_count": router_count,
      # unweighted per-scale MSE (what each scale's regression achieves)
      "scale_mse_sum": jnp.stack([jnp.sum(tok_mse * feat_mask * (scale == s))
                                  for s in range(NUM_SCALES)]),
      "scale_count": jnp.stack([jnp.sum(feat_mask * (scale == s)) for s in range(NUM_SCALES)]),
      "task_text_ce_sum": jnp.stack([jnp.sum(ce * text_mask * (task == t))
                                     for t in range(NUM_TASKS)]),
      "task_text_count": jnp.stack([jnp.sum(text_mask * (task == t)) for t in range(NUM_TASKS)]),
      "task_image_mse_sum": jnp.stack([jnp.sum(w * tok_mse * (task == t))
                                       for t in range(NUM_TASKS)]),
      "task_image_count": jnp.stack([jnp.sum(feat_mask * (task == t)) for t in range(NUM_TASKS)]),
  }
  return loss, metrics


def summarize(metrics: dict, text_weight: float = TEXT_WEIGHT,
              image_weight: float = IMAGE_WEIGHT, router_weight: float = 0.0) -> dict[str, float]:
  """Sums and counts (possibly accumulated) -> readable means, per scale and per task."""
  from puma_jax.models.pooling import SCALE_NAMES
  from puma_jax.sequence import TASKS
  m = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), metrics)
  div = lambda a, b: float(a / jnp.maximum(b, 1.0))
  text_ce = div(m["text_ce_sum"], m["text_count"])
  image_mse = div(m["image_mse_sum"], m["image_count"])
  out = {"loss": text_weight * text_ce + image_weight * image_mse, "text_ce": text_ce,
         "image_mse": image_mse}
  if float(m["router_count"]) > 0:
    out["router_ce"] = div(m["router_ce_sum"], m["router_count"])
    out["loss"] += router_weight * out["router_ce"]
  for s, name in enumerate(SCALE_NAMES):
    if float(m["scale_count"][s]) > 0:
      out[f"mse_{name}"] = div(m["scale_mse_sum"][s], m["scale_count"][s])
  for t, name in enumerate(TASKS):
    if float(m["task_text_count"][t]) > 0:
      out[f"text_ce/{name}"] = div(m["task_text_ce_sum"][t], m["task_text_count"][t])
    if float(m["task_image_count"][t]) > 0:
      out[f"image_mse/{name}"] = div(m["task_image_mse_sum"][t], m["task_image_count"][t])
  return out


def diffusion_loss(pred: jax.Array, target: jax.Array) -> jax.Array:
  """Epsilon (or v) prediction MSE, mean over all elements, in float32."""
  return jnp.mean(jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32)))

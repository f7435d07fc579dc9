"""PUMA's training losses (docs/DESIGN.md §7) and the diffusion loss.

MLLM: loss = text_weight * text_CE + image_weight * image_MSE (+ router_weight * router_CE),
with the weights from `config.loss` (the paper: 0.02 and 1.0). text_CE is the mean
cross-entropy over the batch's supervised text positions; image_MSE the mean over the batch's
supervised image feature tokens of (scale weight x the token's mean squared error over feature
dims), weights f4..f0 = 1024, 512, 64, 8, 1. Both means are over the whole batch (not per
sequence), so packing examples into rows leaves the loss unchanged.

The formula is written once, in `mllm_objective`: it takes per-position sums (`mllm_sums`) and
the full batch's normalizers (`mllm_normalizers`). Because it is linear in the sums, the
microbatches of an accumulated step each add their share and the total equals one big batch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from puma_jax import sequence
from puma_jax.models.pooling import SCALE_NAMES

# Keys of the weights `mllm_objective` reads (the fields of `config.loss`).
WEIGHT_KEYS = ("text_weight", "image_weight", "router_weight")


def loss_weights(loss_cfg, has_router: bool) -> dict[str, float]:
  """The MLLM loss weights from `config.loss`; no router head -> no router term."""
  return {
    "text_weight": float(loss_cfg.text_weight),
    "image_weight": float(loss_cfg.image_weight),
    "router_weight": float(loss_cfg.router_weight) if has_router else 0.0,
  }


def text_ce(
  logits_fn: Callable[[jax.Array], jax.Array],
  hidden: jax.Array,
  target: jax.Array,
  mask: jax.Array,
  chunk: int = 0,
) -> jax.Array:
  """Per-position text cross-entropy (B, T) in float32, 0 where `mask` is 0.

  `logits_fn` maps hidden states (B, c, D) to logits (B, c, V) (the LM head; the identity when
  `hidden` already holds logits). With `chunk` > 0 the positions are cut into chunks of `chunk`
  and the logits of one chunk at a time exist, in forward and backward (`lax.map` over a
  rematerialized body): at the paper's vocabulary 128k x 2048 positions the float32 logits of
  every position are most of the head's activation memory. 0 (or >= T) is one chunk: no remat,
  the logits are saved for the backward pass as without chunking.

  A chunk without a supervised position costs nothing (a `lax.cond` skips its head). With several
  chunks each row's supervised positions are first moved to its front (a stable sort), so in
  image-heavy rows the trailing chunks are empty in every row and skipped.
  """
  b, t = target.shape
  c = t if chunk <= 0 else min(int(chunk), t)
  n = -(-t // c)
  mask = mask.astype(bool)
  if n > 1:
    order = jnp.argsort(~mask, axis=1, stable=True)
    hidden = jnp.take_along_axis(hidden, order[..., None], axis=1)
    target = jnp.take_along_axis(target, order, axis=1)
    mask = jnp.take_along_axis(mask, order, axis=1)
  pad = n * c - t
  if pad:
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    target = jnp.pad(target, ((0, 0), (0, pad)))
    mask = jnp.pad(mask, ((0, 0), (0, pad)))

  def ce(h, y, m):
    logits = logits_fn(h).astype(jnp.float32)
    return jnp.where(m, optax.softmax_cross_entropy_with_integer_labels(logits, y), 0.0)

  def one(xs):
    h, y, m = xs
    return jax.lax.cond(jnp.any(m), ce, lambda *_: jnp.zeros(m.shape, jnp.float32), h, y, m)

  split = lambda x: jnp.moveaxis(x.reshape((b, n, c) + x.shape[2:]), 1, 0)
  out = jax.lax.map(
    jax.checkpoint(one) if n > 1 else one, (split(hidden), split(target), split(mask))
  )
  out = jnp.moveaxis(out, 0, 1).reshape(b, n * c)[:, :t]
  if n > 1:
    out = jnp.take_along_axis(out, jnp.argsort(order, axis=1), axis=1)
  return out


def mllm_sums(
  ce: jax.Array,
  feature_pred: jax.Array,
  features: jax.Array,
  batch: dict,
  *,
  router_logits: jax.Array | None = None,
) -> dict[str, jax.Array]:
  """Per-position loss sums and counts of a (micro)batch; they add across microbatches.

  ce (B, T): the per-position text cross-entropy, 0 where `text_mask` is 0 (`text_ce`);
  feature_pred (B, T, D): the head's prediction at each position of the *next* slot's feature;
  features (B, T, D): the input features at feature slots (teacher forcing), whose shift by one
  position is the target. `batch` holds `text_target`, `text_mask`, `feature_weight`,
  `target_scale`, `kind_id` (see puma_jax.sequence). With `router_logits` (B, T, scales), the
  router cross-entropy at the positions with a `router_label` (ours, docs/DESIGN.md §7: the
  router is not in the paper's loss).
  """
  f32 = jnp.float32
  if ce.shape != batch["text_mask"].shape:
    raise ValueError(
      f"mllm_sums: the text cross-entropy must be per position "
      f"{tuple(batch['text_mask'].shape)} (losses.text_ce), got {tuple(ce.shape)}"
    )
  text_mask = batch["text_mask"].astype(f32)
  ce = ce.astype(f32)
  ce_sum = jnp.sum(ce)
  n_text = jnp.sum(text_mask)

  target = jnp.concatenate([features[:, 1:], jnp.zeros_like(features[:, :1])], axis=1)
  tok_mse = jnp.mean(jnp.square(feature_pred.astype(f32) - target.astype(f32)), axis=-1)
  w = batch["feature_weight"].astype(f32)
  feat_mask = (w > 0).astype(f32)
  mse_sum = jnp.sum(w * tok_mse)
  n_feat = jnp.sum(feat_mask)

  router_sum = router_count = jnp.zeros((), f32)
  if router_logits is not None:
    label = batch["router_label"]
    rmask = (label >= 0).astype(f32)
    rce = optax.softmax_cross_entropy_with_integer_labels(
      router_logits.astype(f32), jnp.maximum(label, 0)
    )
    router_sum, router_count = jnp.sum(rce * rmask), jnp.sum(rmask)

  scale = batch["target_scale"]
  kind = batch["kind_id"]
  scales, kinds = range(len(SCALE_NAMES)), range(len(sequence.KINDS))
  return {
    "text_ce_sum": ce_sum,
    "text_count": n_text,
    "image_mse_sum": mse_sum,
    "image_count": n_feat,
    "router_ce_sum": router_sum,
    "router_count": router_count,
    # unweighted per-scale MSE (what each scale's regression achieves)
    "scale_mse_sum": jnp.stack([jnp.sum(tok_mse * feat_mask * (scale == s)) for s in scales]),
    "scale_count": jnp.stack([jnp.sum(feat_mask * (scale == s)) for s in scales]),
    "task_text_ce_sum": jnp.stack([jnp.sum(ce * (kind == t)) for t in kinds]),
    "task_text_count": jnp.stack([jnp.sum(text_mask * (kind == t)) for t in kinds]),
    "task_image_mse_sum": jnp.stack([jnp.sum(w * tok_mse * (kind == t)) for t in kinds]),
    "task_image_count": jnp.stack([jnp.sum(feat_mask * (kind == t)) for t in kinds]),
  }


def mllm_normalizers(batch: dict) -> dict[str, jax.Array]:
  """The full batch's counts that every microbatch's sums are divided by (at least 1, so an
  empty term contributes 0 instead of NaN)."""
  f32 = jnp.float32
  return {
    "text": jnp.maximum(jnp.sum(batch["text_mask"].astype(f32)), 1.0),
    "image": jnp.maximum(jnp.sum((batch["feature_weight"] > 0).astype(f32)), 1.0),
    "router": jnp.maximum(jnp.sum((batch["router_label"] >= 0).astype(f32)), 1.0),
  }


def counts_as_normalizers(sums: Mapping) -> dict[str, jax.Array]:
  """Normalizers from accumulated counts (summaries: the sums already cover the whole batch)."""
  return {
    name: jnp.maximum(jnp.asarray(sums[f"{name}_count"], jnp.float32), 1.0)
    for name in ("text", "image", "router")
  }


def mllm_objective(sums: Mapping, normalizers: Mapping, weights: Mapping) -> jax.Array:
  """THE MLLM loss: weighted sums over the full batch's normalizers (module docstring)."""
  return (
    weights["text_weight"] * sums["text_ce_sum"] / normalizers["text"]
    + weights["image_weight"] * sums["image_mse_sum"] / normalizers["image"]
    + weights["router_weight"] * sums["router_ce_sum"] / normalizers["router"]
  )


def mllm_loss(
  logits, feature_pred, features, batch: dict, weights: Mapping, *, router_logits=None
) -> tuple[jax.Array, dict]:
  """(loss, sums) of one whole batch from its logits (B, T, V): `mllm_objective` over its own
  normalizers."""
  ce = text_ce(lambda x: x, logits, batch["text_target"], batch["text_mask"])
  sums = mllm_sums(ce, feature_pred, features, batch, router_logits=router_logits)
  return mllm_objective(sums, mllm_normalizers(batch), weights), sums


def summarize(sums: Mapping, weights: Mapping) -> dict[str, float]:
  """Sums and counts (possibly accumulated over steps) -> readable means, per scale and per
  sequence kind; "loss" is `mllm_objective` of the accumulated sums."""
  m = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), dict(sums))
  div = lambda a, b: float(a / jnp.maximum(b, 1.0))
  out = {
    "loss": float(mllm_objective(m, counts_as_normalizers(m), weights)),
    "text_ce": div(m["text_ce_sum"], m["text_count"]),
    "image_mse": div(m["image_mse_sum"], m["image_count"]),
  }
  if float(m["router_count"]) > 0:
    out["router_ce"] = div(m["router_ce_sum"], m["router_count"])
  for s, name in enumerate(SCALE_NAMES):
    if float(m["scale_count"][s]) > 0:
      out[f"mse_{name}"] = div(m["scale_mse_sum"][s], m["scale_count"][s])
  for t, name in enumerate(sequence.KINDS):
    if float(m["task_text_count"][t]) > 0:
      out[f"text_ce/{name}"] = div(m["task_text_ce_sum"][t], m["task_text_count"][t])
    if float(m["task_image_count"][t]) > 0:
      out[f"image_mse/{name}"] = div(m["task_image_mse_sum"][t], m["task_image_count"][t])
  return out


def diffusion_loss(
  pred: jax.Array, target: jax.Array, weights: jax.Array | None = None
) -> jax.Array:
  """Epsilon (or v) prediction MSE in float32: the mean over all elements, or with `weights`
  (one per example, e.g. `min_snr_weights`) the mean over examples of weight x that example's
  mean squared error."""
  err = jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32))
  if weights is None:
    return jnp.mean(err)
  per_example = jnp.mean(err.reshape(err.shape[0], -1), axis=1)
  return jnp.mean(weights.astype(jnp.float32) * per_example)


def min_snr_weights(
  alphas_cumprod: jax.Array, timesteps: jax.Array, gamma: float, prediction_type: str
) -> jax.Array:
  """Min-SNR-gamma loss weights per example (Hang et al., "Efficient Diffusion Training via
  Min-SNR Weighting Strategy", 2023): the x0-space weight SNR(t) clipped at `gamma`, expressed
  for the network's target: min(SNR, gamma) / SNR for epsilon, min(SNR, gamma) / (SNR + 1) for
  v, min(SNR, gamma) for x0 ("sample"). Low-noise steps, where the epsilon loss is large but
  says little about the image's layout and colours, stop dominating the gradient
  (docs/DESIGN.md §5). A zero-terminal-SNR schedule's last step (SNR 0) gets epsilon's limit 1
  and v's and x0's 0: at SNR 0 the epsilon target is the input itself."""
  ac = alphas_cumprod[timesteps].astype(jnp.float32)
  snr = ac / (1.0 - ac)
  clipped = jnp.minimum(snr, gamma)
  if prediction_type == "epsilon":
    # min(SNR, gamma) / SNR written so that SNR 0 gives its limit 1, not 0 / 0.
    return jnp.minimum(1.0, gamma / snr)
  if prediction_type == "v_prediction":
    return clipped / (snr + 1.0)
  if prediction_type == "sample":
    return clipped
  raise ValueError(f"min_snr_weights: unknown prediction_type {prediction_type!r}")

"""The MLLM stage: PumaModel pretraining and unified tuning (configs/pretrain.py,
configs/unified.py). Model setup, data encoding and the train / eval steps.

The loss is `losses.mllm_objective` of each microbatch's sums over the *full* batch's
normalizers, so gradient accumulation gives the same update as one big batch.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from puma_jax import assemble, perf, precision, tokenizer
from puma_jax.data.rows import MLLMEncoder
from puma_jax.models import clip as clip_lib, puma
from puma_jax.training import data as data_lib, losses, optim, steps


def objective(graphdef, frozen, rest, weights: dict, ce_chunk: int = 0):
  """loss_fn(params, microbatch with "_normalizers") -> (loss, metric sums). The LM head runs
  on `ce_chunk` positions at a time (`losses.text_ce`; 0: all at once)."""

  def loss_fn(params, mb):
    mb = dict(mb)
    normalizers = mb.pop("_normalizers")
    model = nnx.merge(graphdef, frozen, params, rest)
    out = model(mb, logits=False)
    ce = losses.text_ce(
      model.llm.logits, out["hidden"], mb["text_target"], mb["text_mask"], ce_chunk
    )
    sums = losses.mllm_sums(
      ce,
      out["feature_pred"],
      out["features"],
      mb,
      router_logits=out.get("router_logits"),
    )
    return losses.mllm_objective(sums, normalizers, weights), sums

  return loss_fn


def train_step(
  state: steps.TrainState,
  frozen,
  rest,
  batch: dict,
  *,
  graphdef,
  tx,
  weights: dict,
  grad_accum: int = 1,
  ce_chunk: int = 0,
):
  """One optimizer step on a global batch (uint8 CLIP views in batch["images"])."""
  batch = dict(batch, images=clip_lib.normalize_uint8(batch["images"]))
  normalizers = losses.mllm_normalizers(batch)
  # Every row carries the full batch's normalizers, so each microbatch divides by them.
  batch["_normalizers"] = jax.tree.map(
    lambda x: jnp.broadcast_to(x, (batch["tokens"].shape[0],)), normalizers
  )
  loss_fn = objective(graphdef, frozen, rest, weights, ce_chunk)

  def per_micro(params, mb):
    mb = dict(mb, _normalizers=jax.tree.map(lambda x: x[0], mb["_normalizers"]))
    return loss_fn(params, mb)

  loss, grads, metrics = steps.accumulate(
    per_micro, state.params, batch, grad_accum, state.loss_scale
  )
  state, metrics = steps.apply(state, tx, loss, grads, metrics)
  # positions holding an example (padding is segment 0): the loop's real-token throughput
  metrics["real_tokens"] = jnp.sum(batch["segment_ids"] > 0).astype(jnp.float32)
  return state, metrics


def eval_step(
  params, frozen, rest, batch: dict, *, graphdef, weights: dict, ce_chunk: int = 0
) -> dict:
  """Metric sums of one held-out batch (no update)."""
  batch = dict(batch, images=clip_lib.normalize_uint8(batch["images"]))
  batch["_normalizers"] = losses.mllm_normalizers(batch)
  _, sums = objective(graphdef, frozen, rest, weights, ce_chunk)(params, batch)
  return sums


class MLLMStage:
  """PumaModel with a frozen CLIP encoder (see `training.stage.Stage` for the members)."""

  progress_keys = ("text_ce", "image_mse", "router_ce")
  frozen = nnx.All(nnx.Param, nnx.PathContains("clip"))

  def __init__(self, config: ml_collections.ConfigDict, workdir: Path | None = None):
    self.config = config
    self.workdir = workdir
    self.model_config = puma.PumaConfig.from_dict(config.model.to_dict())
    self.dtype = jnp.dtype(precision.resolve(str(config.precision)))
    self.weights = losses.loss_weights(config.loss, has_router=self.model_config.router)
    # configs without the field (older workdirs' configs) run the head unchunked
    self.ce_chunk = int(config.loss.get("ce_chunk", 0))
    if self.ce_chunk < 0:
      raise ValueError(f"loss.ce_chunk={self.ce_chunk} must be >= 0 (0: unchunked)")
    self.loads_pretrained = bool(config.init.clip or config.init.llm or config.init.puma)
    self._eval_fn = None  # jitted once per run, on the first evaluation

  @functools.cached_property
  def _tokenizer(self):
    """(encode, decode, special), checked against the model's special ids. Loaded on first use
    (the data), so planning a run needs no tokenizer files."""
    encode, decode, special = tokenizer.load(str(self.config.tokenizer))
    mc = self.model_config
    for field, want in (
      ("img_start_id", special.img_start),
      ("img_end_id", special.img_end),
      ("pos0_id", special.pos0),
      ("pad_id", special.pad),
    ):
      if getattr(mc, field) != want:
        raise ValueError(
          f"config.model.{field}={getattr(mc, field)} but the tokenizer "
          f"({self.config.tokenizer}) gives {want}"
        )
    return encode, decode, special

  # model -------------------------------------------------------------------------------------

  def build(self, rngs):
    return puma.PumaModel(self.model_config, dtype=self.dtype, rngs=rngs)

  def meta(self) -> dict:
    return {"stage": "mllm", "model": self.model_config.to_dict()}

  def load_pretrained(self, model) -> None:
    assemble.load_components(
      model,
      clip_dir=self.config.init.clip,
      llm_dir=self.config.init.llm,
      puma_dir=self.config.init.puma,
    )

  def optimizer(self, params):
    return optim.make(self.config.optim, params)

  # data --------------------------------------------------------------------------------------

  def _encoder(self):
    encode, _, special = self._tokenizer
    return MLLMEncoder(
      encode,
      special,
      int(self.config.seq_len),
      int(self.config.data.max_images),
      int(self.model_config.clip.image_size),
    )

  def train_data(self, split: str = "train"):
    dcfg = self.config.data
    if int(dcfg.image.clip_size) != self.model_config.clip.image_size:
      raise ValueError(
        f"data.image.clip_size={dcfg.image.clip_size} must equal the CLIP "
        f"encoder's image_size={self.model_config.clip.image_size}"
      )
    if split != "train":
      dcfg = dcfg.copy_and_resolve_references()
      dcfg.num_epochs, dcfg.shuffle = 1, False
    else:
      self.check_fit()
    return data_lib.host_data(
      dcfg, split, self._encoder(), bool(self.config.train.same_data_on_hosts)
    )

  def check_fit(self) -> list[str]:
    """Warns loudly (stderr and the log) about every sequence kind of the mix of which no
    sampled example fits a row: it would be skipped every time, i.e. never trained."""
    import sys

    from puma_jax.data import rows

    encode, _, special = self._tokenizer
    report = rows.fit_report(self.config.data, encode, special)
    warnings = rows.check_fit(report, int(self.config.seq_len), int(self.config.data.max_images))
    for w in warnings:
      logging.warning("%s", w)
      if jax.process_index() == 0:
        print(f"WARNING: {w}", file=sys.stderr, flush=True)
    return warnings

  def device_arrays(self, host_batch: dict) -> dict:
    return {k: v for k, v in host_batch.items() if k != "num_images"}

  # steps -------------------------------------------------------------------------------------

  def train_step(self, graphdef, tx):
    return functools.partial(
      train_step,
      graphdef=graphdef,
      tx=tx,
      weights=self.weights,
      grad_accum=int(self.config.train.grad_accum_steps),
      ce_chunk=self.ce_chunk,
    )

  def summarize(self, summed: dict, n_steps: int) -> dict:
    out = losses.summarize(
      {k: v for k, v in summed.items() if k not in ("loss", "grad_norm", "finite")}, self.weights
    )
    out["loss"] = float(summed["loss"]) / n_steps  # the optimized (accumulated) loss
    out["grad_norm"] = float(summed["grad_norm"]) / n_steps
    return out

  def flops_per_token(self) -> float:
    """Training FLOPs per real token of this model at `seq_len` (`perf.flops_per_token`)."""
    return perf.flops_per_token(self.model_config, int(self.config.seq_len))

  def throughput(self, global_batch: int, steps_per_s: float) -> dict:
    return {"rows_per_s": global_batch * steps_per_s}

  def evaluate(self, graphdef, state, frozen, rest, mesh) -> dict:
    """Loss on the held-out split (`train.eval_batches` batches)."""
    if self._eval_fn is None:
      self._eval_fn = jax.jit(
        functools.partial(
          eval_step, graphdef=graphdef, weights=self.weights, ce_chunk=self.ce_chunk
        )
      )
    data = self.train_data("eval")
    sums = None
    for i, hb in enumerate(data):
      if i >= int(self.config.train.eval_batches):
        break
      batch = data_lib.global_batch(self.device_arrays(hb), mesh)
      m = jax.device_get(self._eval_fn(state.params, frozen, rest, batch))
      sums = m if sums is None else jax.tree.map(np.add, sums, m)
    if sums is None:
      return {}
    return losses.summarize(sums, self.weights)

"""Per-stage training tasks for `train.py`: model, frozen parts, data, steps, metrics.

  mllm     PumaModel pretraining / unified tuning (configs/pretrain.py, configs/unified.py)
  decoder  one scale's diffusion decoder (configs/decoder.py)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from puma_jax import losses, optim, sequence as seq, steps, tokenizer
from puma_jax.models import clip as clip_lib


def make(config: ml_collections.ConfigDict):
  stages = {"mllm": MLLMTask}
  try:
    from puma_jax.decoder_task import DecoderTask
    stages["decoder"] = DecoderTask
  except ImportError:
    pass
  if config.stage not in stages:
    raise ValueError(f"config.stage={config.stage!r}: choose from {sorted(stages)}")
  return stages[config.stage](config)


def normalize_clip_images(images: jax.Array) -> jax.Array:
  """uint8 CLIP views (as the data pipeline ships them) -> CLIP-normalized float32."""
  x = images.astype(jnp.float32) / 255.0
  return (x - jnp.asarray(clip_lib.CLIP_MEAN)) / jnp.asarray(clip_lib.CLIP_STD)


class HostSlice:
  """Every host reads the whole global stream and keeps its rows of each global batch.

  Only for checking multi-process training against one process (identical global batches);
  real runs shard the sources by host (`data.pipeline.build`)."""

  def __init__(self, it, index: int, count: int):
    self.it, self.index, self.count = it, index, count

  def __iter__(self):
    return self

  def __next__(self):
    batch = next(self.it)
    n = len(next(iter(batch.values()))) // self.count
    return {k: v[self.index * n:(self.index + 1) * n] for k, v in batch.items()}

  def get_state(self):
    return self.it.get_state()

  def set_state(self, state):
    self.it.set_state(state)

  def metrics(self):
    return self.it.metrics()


def host_data(dcfg, split: str, encode, same_on_hosts: bool):
  from puma_jax.data import pipeline
  if same_on_hosts and jax.process_count() > 1:
    dcfg = dcfg.copy_and_resolve_references()
    dcfg.batch_size = int(dcfg.batch_size) * jax.process_count()
    it = iter(pipeline.build(dcfg, split=split, encode=encode, host_index=0, host_count=1))
    return HostSlice(it, jax.process_index(), jax.process_count())
  return iter(pipeline.build(dcfg, split=split, encode=encode))


class MLLMTask:
  progress_keys = ("text_ce", "image_mse", "router_ce")

  def __init__(self, config):
    from puma_jax.models import puma
    self.config = config
    self.model_config = puma.PumaConfig.from_dict(config.model.to_dict())
    self.dtype = jnp.dtype(config.dtype)
    self.encode, self.decode, self.special = tokenizer.load(str(config.tokenizer))
    mc = self.model_config
    for field, want in (("img_start_id", self.special.img_start),
                        ("img_end_id", self.special.img_end), ("pos0_id", self.special.pos0),
                        ("pad_id", self.special.pad)):
      if getattr(mc, field) != want:
        raise ValueError(f"config.model.{field}={getattr(mc, field)} but the tokenizer "
                         f"({config.tokenizer}) gives {want}")
    self.loss_cfg = {"text_weight": float(config.loss.text_weight),
                     "image_weight": float(config.loss.image_weight),
                     "router_weight": float(config.loss.router_weight) if mc.router else 0.0}
    self.loads_pretrained = bool(config.init.clip or config.init.llm or config.init.puma)

  # model -------------------------------------------------------------------------------------

  def build(self, rngs):
    from puma_jax.models import puma
    return puma.PumaModel(self.model_config, dtype=self.dtype, rngs=rngs)

  frozen = nnx.All(nnx.Param, nnx.PathContains("clip"))

  def meta(self) -> dict:
    return {"stage": "mllm", "model": self.model_config.to_dict()}

  def load_pretrained(self, model) -> None:
    from puma_jax import assemble
    assemble.load_components(model, clip_dir=self.config.init.clip, llm_dir=self.config.init.llm,
                             puma_dir=self.config.init.puma)

  def optimizer(self, params):
    return optim.make(self.config.optim, params)

  # data --------------------------------------------------------------------------------------

  def _encoder(self):
    from puma_jax.data.sequences import MLLMEncoder
    return MLLMEncoder(self.encode, self.special, int(self.config.seq_len),
                       int(self.config.data.max_images), int(self.model_config.clip.image_size))

  def train_data(self, split: str = "train"):
    from puma_jax.data import pipeline
    dcfg = self.config.data
    if int(dcfg.image.clip_size) != self.model_config.clip.image_size:
      raise ValueError(f"data.image.clip_size={dcfg.image.clip_size} must equal the CLIP "
                       f"encoder's image_size={self.model_config.clip.image_size}")
    if split != "train":
      dcfg = dcfg.copy_and_resolve_references()
      dcfg.num_epochs, dcfg.shuffle = 1, False
    return host_data(dcfg, split, self._encoder(), bool(self.config.train.same_data_on_hosts))

  def device_arrays(self, host_batch: dict) -> dict:
    return {k: v for k, v in host_batch.items() if k != "num_images"}

  # steps -------------------------------------------------------------------------------------

  def train_step(self, graphdef, tx):
    accum = int(self.config.train.grad_accum_steps)

    def step(state, frozen, rest, batch):
      batch = dict(batch, images=normalize_clip_images(batch["images"]))
      return steps.mllm_train_step(state, frozen, rest, batch, graphdef=graphdef, tx=tx,
                                   loss_cfg=self.loss_cfg, grad_accum=accum)
    return step

  def summarize(self, summed: dict, n_steps: int) -> dict:
    out = losses.summarize({k: v for k, v in summed.items()
                            if k not in ("loss", "grad_norm", "finite")},
                           self.loss_cfg["text_weight"], self.loss_cfg["image_weight"],
                           self.loss_cfg["router_weight"])
    out["loss"] = float(summed["loss"]) / n_steps  # the optimized (accumulated) loss
    out["grad_norm"] = float(summed["grad_norm"]) / n_steps
    return out

  def throughput(self, global_batch: int, steps_per_s: float, peak, n_devices: int) -> dict:
    tokens = global_batch * int(self.config.seq_len)
    c = self.model_config.llm
    # 6 N T for the dense layers (+ attention 12 L T^2 d per sequence), forward + backward.
    n_dense = c.num_hidden_layers * (4 * c.hidden_size * c.num_attention_heads * c.head_dim
                                     + 3 * c.hidden_size * c.intermediate_size)
    attn = 12 * c.num_hidden_layers * int(self.config.seq_len) * c.num_attention_heads * c.head_dim
    flops = tokens * (6 * n_dense + attn + 6 * c.hidden_size * c.vocab_size)
    out = {"tokens_per_s": tokens * steps_per_s,
           "tflops_per_s_per_device": flops * steps_per_s / n_devices / 1e12}
    if peak:
      out["mfu"] = flops * steps_per_s / n_devices / peak
    return out

  def evaluate(self, graphdef, state, frozen, rest, mesh) -> dict:
    """Loss on the held-out split (`train.eval_batches` batches)."""
    from puma_jax import train
    fn = jax.jit(functools.partial(steps.mllm_eval_step, graphdef=graphdef,
                                   loss_cfg=self.loss_cfg))
    data = self.train_data("eval")
    sums = None
    for i, hb in enumerate(data):
      if i >= int(self.config.train.eval_batches):
        break
      batch = train._global_batch(self.device_arrays(hb), mesh)
      batch = dict(batch, images=normalize_clip_images(batch["images"]))
      m = jax.device_get(fn(state.params, frozen, rest, batch))
      m.pop("loss")
      sums = m if sums is None else jax.tree.map(np.add, sums, m)
    if sums is None:
      return {}
    return losses.summarize(sums, self.loss_cfg["text_weight"], self.loss_cfg["image_weight"],
                            self.loss_cfg["router_weight"])

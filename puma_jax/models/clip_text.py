"""CLIP text tower and the full two-tower CLIP model (HF `CLIPTextModel` / `CLIPModel` layout).

Used by the CLIP-I / CLIP-T scores (CLIP ViT-B/32 in the paper's protocol). The vision tower is
`puma_jax.models.clip.CLIPVisionModel`; the transformer blocks are shared with it (the text tower
only adds a causal + padding attention mask).

Text pooling follows transformers: the final-layer-normed hidden state at the end-of-text token.
Checkpoints whose config says `eos_token_id == 2` (configs written before transformers PR #24773,
e.g. openai/clip-vit-base-patch32) pick that token as the *highest token id* of each row (the EOT
token has the largest id of the original vocabulary); newer configs pick the *first* position
holding `eos_token_id`. Both rules are kept so converted checkpoints pool exactly as HF does.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from puma_jax import sharding
from puma_jax.models import clip, layers
from puma_jax.models.base import ModelConfig

# The pre-#24773 value of `eos_token_id`; selects the argmax-of-token-ids pooling rule.
LEGACY_EOS_ID = 2


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig(ModelConfig):
  vocab_size: int = 49408
  hidden_size: int = 512
  intermediate_size: int = 2048
  num_hidden_layers: int = 12
  num_attention_heads: int = 8
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  pad_token_id: int = 1
  bos_token_id: int = 49406
  eos_token_id: int = 49407
  projection_dim: int = 512  # unused by the tower itself; mirrors HF's field

  def __post_init__(self):
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(
        f"CLIPTextConfig: hidden_size={self.hidden_size} is not divisible by "
        f"num_attention_heads={self.num_attention_heads}"
      )
    if not 0 <= self.eos_token_id < self.vocab_size:
      raise ValueError(
        f"CLIPTextConfig: eos_token_id={self.eos_token_id} is outside the "
        f"vocabulary (vocab_size={self.vocab_size})"
      )
    layers.activation(self.hidden_act)


@dataclasses.dataclass(frozen=True)
class CLIPConfig(ModelConfig):
  """Full CLIP: both towers plus the projections into the shared embedding space."""

  text_config: Any = None  # CLIPTextConfig (a dict is accepted and converted)
  vision_config: Any = None  # clip.CLIPVisionConfig (idem)
  projection_dim: int = 512

  def __post_init__(self):
    for name, cls in (("text_config", CLIPTextConfig), ("vision_config", clip.CLIPVisionConfig)):
      value = getattr(self, name)
      if value is None:
        value = cls()
      elif isinstance(value, dict):
        try:
          value = cls.from_dict(value)
        except (TypeError, ValueError) as e:
          raise ValueError(f"CLIPConfig.{name}: {e}") from None
      elif not isinstance(value, cls):
        raise ValueError(
          f"CLIPConfig.{name} must be a {cls.__name__} or a dict; got {type(value).__name__}"
        )
      object.__setattr__(self, name, value)
    if self.projection_dim <= 0:
      raise ValueError(f"CLIPConfig: projection_dim={self.projection_dim} must be positive")


def vit_b32() -> CLIPConfig:
  """openai/clip-vit-base-patch32 (151,277,313 parameters with logit_scale)."""
  return CLIPConfig(
    text_config=CLIPTextConfig(eos_token_id=LEGACY_EOS_ID),
    vision_config=clip.CLIPVisionConfig(
      hidden_size=768,
      intermediate_size=3072,
      num_hidden_layers=12,
      num_attention_heads=12,
      image_size=224,
      patch_size=32,
      projection_dim=512,
    ),
    projection_dim=512,
  )


def tiny() -> CLIPConfig:
  return CLIPConfig(
    text_config=CLIPTextConfig(
      vocab_size=128,
      hidden_size=32,
      intermediate_size=64,
      num_hidden_layers=2,
      num_attention_heads=4,
      max_position_embeddings=16,
      bos_token_id=126,
      eos_token_id=127,
      projection_dim=16,
    ),
    vision_config=clip.CLIPVisionConfig(
      hidden_size=32,
      intermediate_size=64,
      num_hidden_layers=2,
      num_attention_heads=4,
      image_size=32,
      patch_size=8,
      projection_dim=16,
    ),
    projection_dim=16,
  )


class CLIPTextEmbeddings(nnx.Module):
  def __init__(self, cfg: CLIPTextConfig, *, dtype, param_dtype, rngs):
    self.token_embedding = layers.Embed(
      cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs
    )
    self.position_embedding = layers.Embed(
      cfg.max_position_embeddings,
      cfg.hidden_size,
      axes=(None, "embed"),
      dtype=dtype,
      param_dtype=param_dtype,
      rngs=rngs,
    )

  def __call__(self, input_ids):
    t = input_ids.shape[1]
    return (
      self.token_embedding(input_ids)
      + self.position_embedding.embedding[:t].astype(self.token_embedding.dtype)[None]
    )


class CLIPTextModel(nnx.Module):
  """`model(input_ids, attention_mask=None)` -> last hidden state (B, T, D), after
  `final_layer_norm` (as HF's `last_hidden_state`); `model.pooled(hidden, input_ids)` -> (B, D)."""

  def __init__(
    self, config: CLIPTextConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs
  ):
    self.config = config
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.embeddings = CLIPTextEmbeddings(config, **kw)
    self.encoder = clip.CLIPEncoder(config, **kw)
    self.final_layer_norm = layers.LayerNorm(
      config.hidden_size, eps=config.layer_norm_eps, dtype=dtype, param_dtype=param_dtype
    )

  def check_input(self, input_ids, attention_mask=None) -> None:
    shape = tuple(input_ids.shape)
    if len(shape) != 2:
      raise ValueError(f"CLIP input_ids must be (batch, length); got shape {shape}")
    if shape[1] > self.config.max_position_embeddings:
      raise ValueError(
        f"CLIP input_ids have length {shape[1]} > max_position_embeddings="
        f"{self.config.max_position_embeddings}; tokenize with truncation"
      )
    if not jnp.issubdtype(input_ids.dtype, jnp.integer):
      raise ValueError(f"CLIP input_ids must be integers; got dtype {input_ids.dtype}")
    if attention_mask is not None and tuple(attention_mask.shape) != shape:
      raise ValueError(
        f"CLIP attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {shape}"
      )

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
    self.check_input(input_ids, attention_mask)
    t = input_ids.shape[1]
    x = sharding.constrain(self.embeddings(input_ids), ("batch", "act_seq", "act_embed"))
    mask = jnp.tril(jnp.ones((t, t), jnp.bool_))[None, None]
    if attention_mask is not None:
      mask = mask & (attention_mask[:, None, None, :] != 0)
    return self.final_layer_norm(self.encoder(x, mask=mask))

  def eos_index(self, input_ids: jax.Array) -> jax.Array:
    if self.config.eos_token_id == LEGACY_EOS_ID:
      return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax(input_ids == self.config.eos_token_id, axis=-1)  # first occurrence

  def pooled(self, last_hidden_state: jax.Array, input_ids: jax.Array) -> jax.Array:
    idx = self.eos_index(input_ids)
    return jnp.take_along_axis(last_hidden_state, idx[:, None, None], axis=1)[:, 0]


class CLIPModel(nnx.Module):
  """Both CLIP towers with their projections.

  `get_image_features(pixel_values)` and `get_text_features(input_ids, attention_mask)` return the
  projected, *unnormalized* embeddings (HF's `image_embeds` / `text_embeds` before the L2
  normalization `CLIPModel.forward` applies); `model(pixel_values, input_ids)` returns both.
  """

  def __init__(
    self, config: CLIPConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs
  ):
    self.config = config
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.vision_model = clip.CLIPVisionModel(config.vision_config, **kw)
    self.text_model = CLIPTextModel(config.text_config, **kw)
    p = config.projection_dim
    self.visual_projection = layers.Dense(
      config.vision_config.hidden_size, p, axes=("embed", None), use_bias=False, **kw
    )
    self.text_projection = layers.Dense(
      config.text_config.hidden_size, p, axes=("embed", None), use_bias=False, **kw
    )
    # Only the contrastive loss uses it; kept so that checkpoints convert strictly.
    self.logit_scale = layers.param(None, nnx.initializers.constant(2.6592), (), (), param_dtype)

  def get_image_features(self, pixel_values: jax.Array) -> jax.Array:
    vm = self.vision_model
    return self.visual_projection(vm.pooled(vm(pixel_values)))

  def get_text_features(
    self, input_ids: jax.Array, attention_mask: jax.Array | None = None
  ) -> jax.Array:
    tm = self.text_model
    return self.text_projection(tm.pooled(tm(input_ids, attention_mask), input_ids))

  def __call__(
    self, pixel_values: jax.Array, input_ids: jax.Array, attention_mask: jax.Array | None = None
  ) -> tuple[jax.Array, jax.Array]:
    return (
      self.get_image_features(pixel_values),
      self.get_text_features(input_ids, attention_mask),
    )

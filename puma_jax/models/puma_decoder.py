"""PUMA's image decoder for one feature scale: an SDXL UNet conditioned on CLIP features.

    model(sample, timesteps, features, *, use_pos_embed=True) -> noise prediction (NHWC, f32)

`features` are the raw CLIP patch features of the decoder's scale, (B, num_tokens, mapping_dim)
(1024-d for ViT-L/14). They go through `mapping_layer` (Linear 1024 -> 2048, SDXL's
cross-attention width), plus, for the 256-token decoder only, the learned positional embedding
`embed_img_pos` (1, 256, 2048); the result is the UNet's cross-attention context. The UNet has
no added (`text_time`) embedding (docs/DESIGN.md §3).

`use_pos_embed` switches the positional embedding off for the unconditional CFG branch (the
black image's features, as the public pipeline does). It may also be a weight array, scalar or
(B,), multiplying the embedding per example, so that both CFG branches can share one batch
(weights 1 for the conditional half, 0 for the unconditional one).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from puma_jax import sharding
from puma_jax.models import layers, unet
from puma_jax.models.base import ModelConfig
from puma_jax.models.unet_blocks import KeySeq

SCALES = (256, 64, 16, 4, 1)  # tokens of f0 .. f4


def _puma_unet(**overrides) -> unet.UNetConfig:
  return unet.sdxl_unet_config(**{"addition_embed_type": None, **overrides})


@dataclasses.dataclass(frozen=True)
class PumaDecoderConfig(ModelConfig):
  unet: unet.UNetConfig = dataclasses.field(default_factory=_puma_unet)
  mapping_dim: int = 1024  # feature width (CLIP ViT-L/14)
  mapping_dim1: int = 2048  # after mapping_layer: the UNet's cross_attention_dim
  num_tokens: int = 256
  use_embeds: bool = True  # the learned positional embedding (the 256-token decoder only)

  def __post_init__(self):
    if isinstance(self.unet, Mapping):
      object.__setattr__(self, "unet", unet.UNetConfig.from_dict(self.unet))
    name = type(self).__name__
    if not isinstance(self.unet, unet.UNetConfig):
      raise ValueError(f"{name}: unet must be a UNetConfig, got {type(self.unet).__name__}")
    if self.unet.addition_embed_type is not None:
      raise ValueError(
        f"{name}: unet.addition_embed_type must be None (PUMA's UNet has no "
        f"added embedding), got {self.unet.addition_embed_type!r}"
      )
    ctx = set(self.unet.context_dims)
    if ctx != {self.mapping_dim1}:
      raise ValueError(
        f"{name}: mapping_dim1={self.mapping_dim1} must equal the UNet's "
        f"cross_attention_dim={self.unet.cross_attention_dim}"
      )
    if self.num_tokens < 1 or self.mapping_dim < 1:
      raise ValueError(
        f"{name}: num_tokens={self.num_tokens} and mapping_dim={self.mapping_dim} must be positive"
      )

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> PumaDecoderConfig:
    d = dict(d)
    if isinstance(d.get("unet"), Mapping):
      d["unet"] = unet.UNetConfig.from_dict(d["unet"])
    return super().from_dict(d)

  def to_dict(self) -> dict[str, Any]:
    out = super().to_dict()
    out["unet"] = self.unet.to_dict()
    return out

  @property
  def has_mapping_layer(self) -> bool:
    # The public module creates mapping_layer only when the widths differ.
    return self.mapping_dim != self.mapping_dim1


def puma_decoder_config(num_tokens: int) -> PumaDecoderConfig:
  """The public decoder of one scale (`unet_{num_tokens}`): SDXL base UNet, no text_time."""
  if num_tokens not in SCALES:
    raise ValueError(f"num_tokens={num_tokens}: PUMA's decoders exist for {SCALES}")
  return PumaDecoderConfig(unet=_puma_unet(), num_tokens=num_tokens, use_embeds=num_tokens == 256)


def tiny_config(num_tokens: int = 16, **unet_overrides) -> PumaDecoderConfig:
  """Toy width (features 16-d, context 32-d) for CPU runs and tests."""
  u = unet.tiny_config(addition_embed_type=None, cross_attention_dim=32, **unet_overrides)
  return PumaDecoderConfig(
    unet=u, mapping_dim=16, mapping_dim1=32, num_tokens=num_tokens, use_embeds=num_tokens == 256
  )


class PumaDecoder(nnx.Module):
  """See the module docstring. `remat=True` rematerializes the UNet's transformer blocks."""

  def __init__(
    self,
    config: PumaDecoderConfig,
    *,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
    remat: bool = False,
  ):
    self.config = config
    self.dtype = dtype
    rngs = KeySeq(rngs)  # see KeySeq: keeps the real-size eval_shape linear in time
    self.unet = unet.UNet2DConditionModel(
      config.unet, dtype=dtype, param_dtype=param_dtype, rngs=rngs, remat=remat
    )
    self.mapping_layer = (
      layers.Dense(
        config.mapping_dim,
        config.mapping_dim1,
        axes=("embed", "mlp"),
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
      )
      if config.has_mapping_layer
      else None
    )
    self.embed_img_pos = (
      layers.param(
        rngs,
        nnx.initializers.truncated_normal(0.02),
        (1, config.num_tokens, config.mapping_dim1),
        (None, None, "embed"),
        param_dtype,
      )
      if config.use_embeds
      else None
    )

  def check_features(self, features) -> None:
    c = self.config
    s = tuple(features.shape)
    if len(s) != 3:
      raise ValueError(
        f"PUMA decoder features must be (batch, {c.num_tokens}, {c.mapping_dim}); got shape {s}"
      )
    if s[2] != c.mapping_dim:
      raise ValueError(
        f"PUMA decoder features have width {s[2]}, but this decoder maps "
        f"mapping_dim={c.mapping_dim}-d features (CLIP patch features before "
        f"post-layernorm); got shape {s}"
      )
    if s[1] != c.num_tokens:
      raise ValueError(
        f"PUMA decoder for {c.num_tokens} tokens got features with {s[1]} "
        f"tokens (shape {s}); use the decoder of that scale, or pool the "
        "features to this one"
      )

  def context(self, features: jax.Array, use_pos_embed=True) -> jax.Array:
    """The UNet's cross-attention context for `features`."""
    self.check_features(features)
    ctx = features.astype(self.dtype)
    if self.mapping_layer is not None:
      ctx = self.mapping_layer(ctx)
    if self.embed_img_pos is not None and use_pos_embed is not False:
      pos = self.embed_img_pos[...].astype(self.dtype)
      if use_pos_embed is True:
        ctx = ctx + pos
      else:
        w = jnp.asarray(use_pos_embed, self.dtype)
        if w.ndim > 1 or (w.ndim == 1 and w.shape[0] != ctx.shape[0]):
          raise ValueError(
            f"use_pos_embed must be a bool, a scalar or a (batch,) weight; "
            f"got shape {w.shape} for batch {ctx.shape[0]}"
          )
        ctx = ctx + w.reshape(-1, 1, 1) * pos
    return sharding.constrain(ctx, ("batch", "act_seq", "act_embed"))

  def __call__(
    self, sample: jax.Array, timesteps, features: jax.Array, *, use_pos_embed=True
  ) -> jax.Array:
    return self.unet(sample, timesteps, self.context(features, use_pos_embed))

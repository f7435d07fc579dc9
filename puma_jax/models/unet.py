"""SDXL's UNet (diffusers `UNet2DConditionModel` as SDXL configures it, and small variants), NHWC.

    model(sample, timesteps, context, *, text_embeds=None, time_ids=None) -> noise prediction

`sample` (B, H, W, C_in), `timesteps` (B,) or a scalar, `context` (B, L, cross_attention_dim);
with `addition_embed_type="text_time"` also `text_embeds` (B, E) and `time_ids` (B, K). The
output is (B, H, W, C_out) in float32 whatever the compute dtype, so samplers keep their state
in float32.

Supported: the block types `DownBlock2D`, `CrossAttnDownBlock2D`, `UpBlock2D`,
`CrossAttnUpBlock2D`, mid block `UNetMidBlock2DCrossAttn` or none, positional time embedding,
`addition_embed_type` None or `text_time`, linear or 1x1-conv transformer projections,
`transformer_layers_per_block` as an int, one int per block, or one list per block (then with
`reverse_transformer_layers_per_block`, as diffusers requires), per-block heads and
cross-attention widths, any sample size (non-divisible sizes upsample to the skip's size, as
diffusers' `forward_upsample_size` does). Everything else diffusers offers (class embeddings,
encoder_hid_proj, GLIGEN, ...) is rejected by `convert` with the field named.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from puma_jax import sharding
from puma_jax.models import layers
from puma_jax.models.base import ModelConfig
from puma_jax.models.unet_blocks import (
  FMAP,
  DownBlock,
  KeySeq,
  MidBlock,
  TimestepEmbedding,
  UpBlock,
  timestep_embedding,
)

DOWN_TYPES = ("DownBlock2D", "CrossAttnDownBlock2D")
UP_TYPES = ("UpBlock2D", "CrossAttnUpBlock2D")
MID_TYPES = ("UNetMidBlock2DCrossAttn", None)


def _tuple(v):
  return tuple(_tuple(x) for x in v) if isinstance(v, (list, tuple)) else v


@dataclasses.dataclass(frozen=True)
class UNetConfig(ModelConfig):
  """diffusers' field names and meanings; defaults are SDXL base 1.0's UNet."""

  sample_size: int = 128
  in_channels: int = 4
  out_channels: int = 4
  center_input_sample: bool = False
  flip_sin_to_cos: bool = True
  freq_shift: float = 0
  down_block_types: tuple = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
  mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
  up_block_types: tuple = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
  block_out_channels: tuple = (320, 640, 1280)
  layers_per_block: int | tuple = 2
  downsample_padding: int = 1
  mid_block_scale_factor: float = 1.0
  act_fn: str = "silu"
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  cross_attention_dim: int | tuple = 2048
  transformer_layers_per_block: int | tuple = (1, 2, 10)
  reverse_transformer_layers_per_block: tuple | None = None
  # diffusers quirk: `attention_head_dim` is used as the number of heads when
  # `num_attention_heads` is unset (SDXL: 5, 10, 20 heads of 64 channels).
  attention_head_dim: int | tuple = (5, 10, 20)
  num_attention_heads: int | tuple | None = None
  use_linear_projection: bool = True
  upcast_attention: bool = False
  addition_embed_type: str | None = "text_time"
  addition_time_embed_dim: int | None = 256
  projection_class_embeddings_input_dim: int | None = 2816
  time_embedding_dim: int | None = None
  conv_in_kernel: int = 3
  conv_out_kernel: int = 3
  # (ours, not in SDXL or diffusers) "sincos2d": every transformer block's tokens get a fixed
  # 2-D sin-cos code of their place (layers.grid_position_code) after proj_in, so that the
  # cross-attention queries know where they are. The demo decoders only (docs/DESIGN.md §5);
  # "none" is SDXL. No parameters: converted weights load either way.
  position_code: str = "none"

  def __post_init__(self):
    for f in dataclasses.fields(self):
      object.__setattr__(self, f.name, _tuple(getattr(self, f.name)))
    n = len(self.down_block_types)
    name = type(self).__name__
    if self.position_code not in ("none", "sincos2d"):
      raise ValueError(f"{name}: position_code={self.position_code!r}; choose none or sincos2d")
    if len(self.up_block_types) != n or len(self.block_out_channels) != n:
      raise ValueError(
        f"{name}: down_block_types ({n}), up_block_types "
        f"({len(self.up_block_types)}) and block_out_channels "
        f"({len(self.block_out_channels)}) must have the same length"
      )
    for field, allowed, vals in (
      ("down_block_types", DOWN_TYPES, self.down_block_types),
      ("up_block_types", UP_TYPES, self.up_block_types),
      ("mid_block_type", MID_TYPES, (self.mid_block_type,)),
    ):
      for v in vals:
        if v not in allowed:
          raise ValueError(f"{name}: unsupported {field} entry {v!r}; supported: {allowed}")
    for field in (
      "layers_per_block",
      "attention_head_dim",
      "num_attention_heads",
      "cross_attention_dim",
      "transformer_layers_per_block",
    ):
      v = getattr(self, field)
      if isinstance(v, tuple) and len(v) != n:
        raise ValueError(f"{name}: {field} has {len(v)} entries for {n} blocks")
    nested = isinstance(self.transformer_layers_per_block, tuple) and any(
      isinstance(v, tuple) for v in self.transformer_layers_per_block
    )
    if nested and self.reverse_transformer_layers_per_block is None:
      raise ValueError(
        f"{name}: transformer_layers_per_block given per layer needs "
        "reverse_transformer_layers_per_block (as in diffusers)"
      )
    if self.norm_num_groups is None or any(
      c % self.norm_num_groups for c in self.block_out_channels
    ):
      raise ValueError(
        f"{name}: block_out_channels {self.block_out_channels} must all be "
        f"divisible by norm_num_groups={self.norm_num_groups}"
      )
    for i, kind in enumerate(self.down_block_types):
      if "CrossAttn" in kind and self.block_out_channels[i] % self.heads[i]:
        raise ValueError(
          f"{name}: block {i} has {self.block_out_channels[i]} channels, not "
          f"divisible by its {self.heads[i]} attention heads "
          "(attention_head_dim / num_attention_heads)"
        )
    if self.addition_embed_type not in (None, "text_time"):
      raise ValueError(
        f"{name}: unsupported addition_embed_type={self.addition_embed_type!r}; "
        "supported: None, 'text_time'"
      )
    if self.addition_embed_type == "text_time" and (
      self.addition_time_embed_dim is None or self.projection_class_embeddings_input_dim is None
    ):
      raise ValueError(
        f"{name}: addition_embed_type='text_time' needs addition_time_embed_dim "
        "and projection_class_embeddings_input_dim"
      )
    if self.conv_in_kernel % 2 == 0 or self.conv_out_kernel % 2 == 0:
      raise ValueError(f"{name}: conv_in_kernel/conv_out_kernel must be odd")
    layers.activation(self.act_fn, "act_fn")

  # Per-block views of the int-or-tuple fields.
  def _per_block(self, v):
    return v if isinstance(v, tuple) else (v,) * len(self.down_block_types)

  @property
  def heads(self) -> tuple:
    return self._per_block(self.num_attention_heads or self.attention_head_dim)

  @property
  def layers(self) -> tuple:
    return self._per_block(self.layers_per_block)

  @property
  def context_dims(self) -> tuple:
    return self._per_block(self.cross_attention_dim)

  def down_transformer_layers(self, i: int) -> tuple:
    v = self._per_block(self.transformer_layers_per_block)[i]
    return v if isinstance(v, tuple) else (v,) * self.layers[i]

  def up_transformer_layers(self, i: int) -> tuple:
    """Per resnet of up block i (which has layers_per_block + 1 of them)."""
    n = self.layers[::-1][i] + 1
    if self.reverse_transformer_layers_per_block is not None:
      v = self.reverse_transformer_layers_per_block[i]
    else:
      v = self._per_block(self.transformer_layers_per_block)[::-1][i]
    return v if isinstance(v, tuple) else (v,) * n

  def mid_transformer_layers(self) -> tuple:
    v = self._per_block(self.transformer_layers_per_block)[-1]
    return (v[0] if isinstance(v, tuple) else v,)

  @property
  def time_embed_dim(self) -> int:
    return self.time_embedding_dim or 4 * self.block_out_channels[0]

  @property
  def num_upsamplers(self) -> int:
    return len(self.block_out_channels) - 1


def sdxl_unet_config(**overrides) -> UNetConfig:
  """stabilityai/stable-diffusion-xl-base-1.0 `unet/config.json` (2,567,463,684 parameters)."""
  return UNetConfig(**overrides)


def tiny_config(**overrides) -> UNetConfig:
  """SDXL's structure (plain + two cross-attention levels, text_time) at toy width."""
  kw = dict(
    sample_size=16,
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    transformer_layers_per_block=(1, 1, 2),
    attention_head_dim=(2, 4, 4),
    norm_num_groups=8,
    cross_attention_dim=32,
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=16 + 6 * 8,
  )
  kw.update(overrides)
  return UNetConfig(**kw)


class UNet2DConditionModel(nnx.Module):
  """The SDXL UNet; see the module docstring for the call signature.

  `remat=True` rematerializes every transformer block in the backward pass (training memory).
  """

  def __init__(
    self,
    config: UNetConfig,
    *,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
    remat: bool = False,
  ):
    self.config = cfg = config
    self.dtype = dtype
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=KeySeq(rngs))
    ch = cfg.block_out_channels
    temb = cfg.time_embed_dim
    self.conv_in = layers.Conv(
      cfg.in_channels, ch[0], cfg.conv_in_kernel, padding=(cfg.conv_in_kernel - 1) // 2, **kw
    )
    # The time-embedding path and the output layers run in float32 whatever `dtype` is: they
    # are a negligible share of the FLOPs, and bfloat16 there costs accuracy on every step.
    kw32 = dict(kw, dtype=jnp.float32)
    self.time_embedding = TimestepEmbedding(ch[0], temb, act=cfg.act_fn, **kw32)
    self.add_embedding = (
      TimestepEmbedding(cfg.projection_class_embeddings_input_dim, temb, act="silu", **kw32)
      if cfg.addition_embed_type == "text_time"
      else None
    )
    n = len(ch)
    down = []
    for i, kind in enumerate(cfg.down_block_types):
      down.append(
        DownBlock(
          ch[max(i - 1, 0)],
          ch[i],
          temb,
          num_layers=cfg.layers[i],
          tlayers=cfg.down_transformer_layers(i),
          heads=cfg.heads[i],
          context_dim=cfg.context_dims[i],
          cross_attn=kind == "CrossAttnDownBlock2D",
          add_downsample=i < n - 1,
          cfg=cfg,
          remat=remat,
          **kw,
        )
      )
    self.down_blocks = nnx.List(down)
    self.mid_block = (
      MidBlock(
        ch[-1],
        temb,
        tlayers=cfg.mid_transformer_layers(),
        heads=cfg.heads[-1],
        context_dim=cfg.context_dims[-1],
        cfg=cfg,
        remat=remat,
        **kw,
      )
      if cfg.mid_block_type is not None
      else None
    )
    rch, rheads, rctx, rlayers = ch[::-1], cfg.heads[::-1], cfg.context_dims[::-1], cfg.layers[::-1]
    up = []
    for i, kind in enumerate(cfg.up_block_types):
      up.append(
        UpBlock(
          rch[min(i + 1, n - 1)],
          rch[max(i - 1, 0)],
          rch[i],
          temb,
          num_layers=rlayers[i] + 1,
          tlayers=cfg.up_transformer_layers(i),
          heads=rheads[i],
          context_dim=rctx[i],
          cross_attn=kind == "CrossAttnUpBlock2D",
          add_upsample=i < n - 1,
          cfg=cfg,
          remat=remat,
          **kw,
        )
      )
    self.up_blocks = nnx.List(up)
    self.conv_norm_out = layers.GroupNorm(
      cfg.norm_num_groups, ch[0], eps=cfg.norm_eps, dtype=jnp.float32, param_dtype=param_dtype
    )
    self.conv_out = layers.Conv(
      ch[0], cfg.out_channels, cfg.conv_out_kernel, padding=(cfg.conv_out_kernel - 1) // 2, **kw32
    )

  # ------------------------------------------------------------------------------------------
  def check_inputs(self, sample, context, text_embeds, time_ids) -> None:
    cfg = self.config
    s = tuple(sample.shape)
    if len(s) != 4 or s[-1] != cfg.in_channels:
      hint = (
        " (it looks NCHW: transpose to NHWC)" if len(s) == 4 and s[1] == cfg.in_channels else ""
      )
      raise ValueError(
        f"UNet sample must be NHWC (batch, height, width, {cfg.in_channels}); got shape {s}{hint}"
      )
    c = tuple(context.shape)
    dims = set(cfg.context_dims)
    if len(c) != 3 or c[0] != s[0] or (len(dims) == 1 and c[-1] not in dims):
      raise ValueError(
        f"UNet context must be (batch={s[0]}, length, "
        f"cross_attention_dim={cfg.cross_attention_dim}); got shape {c}"
      )
    if cfg.addition_embed_type == "text_time":
      for kw_name, v in (("text_embeds", text_embeds), ("time_ids", time_ids)):
        if v is None:
          raise ValueError(
            f"UNet with addition_embed_type='text_time' needs the {kw_name}= keyword"
          )
        if v.ndim != 2 or v.shape[0] != s[0]:
          raise ValueError(f"UNet {kw_name} must be (batch={s[0]}, n); got shape {v.shape}")
      width = text_embeds.shape[1] + time_ids.shape[1] * cfg.addition_time_embed_dim
      if width != cfg.projection_class_embeddings_input_dim:
        raise ValueError(
          f"UNet text_embeds width {text_embeds.shape[1]} + {time_ids.shape[1]} time_ids x "
          f"addition_time_embed_dim {cfg.addition_time_embed_dim} = {width}, but "
          f"projection_class_embeddings_input_dim is "
          f"{cfg.projection_class_embeddings_input_dim}"
        )
    elif text_embeds is not None or time_ids is not None:
      raise ValueError(
        "UNet without addition_embed_type='text_time' takes no text_embeds / time_ids"
      )

  def time_embed(self, timesteps, batch: int, text_embeds=None, time_ids=None) -> jax.Array:
    cfg = self.config
    t = jnp.asarray(timesteps)
    if t.ndim > 1 or (t.ndim == 1 and t.shape[0] not in (1, batch)):
      raise ValueError(f"UNet timesteps must be a scalar or shape ({batch},); got {t.shape}")
    t = jnp.broadcast_to(t.reshape(-1), (batch,))
    emb = timestep_embedding(
      t, cfg.block_out_channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift
    )
    emb = self.time_embedding(emb)
    if self.add_embedding is not None:
      tid = timestep_embedding(
        time_ids.reshape(-1),
        cfg.addition_time_embed_dim,
        flip_sin_to_cos=cfg.flip_sin_to_cos,
        freq_shift=cfg.freq_shift,
      )
      add = jnp.concatenate([text_embeds.astype(jnp.float32), tid.reshape(batch, -1)], axis=-1)
      emb = emb + self.add_embedding(add)
    return emb

  def __call__(
    self,
    sample: jax.Array,
    timesteps,
    context: jax.Array,
    *,
    text_embeds: jax.Array | None = None,
    time_ids: jax.Array | None = None,
  ) -> jax.Array:
    self.check_inputs(sample, context, text_embeds, time_ids)
    b = sample.shape[0]
    emb = self.time_embed(timesteps, b, text_embeds, time_ids)
    context = sharding.constrain(context.astype(self.dtype), ("batch", "act_seq", "act_embed"))
    x = sample.astype(self.dtype)
    if self.config.center_input_sample:
      x = 2 * x - 1.0
    x = sharding.constrain(self.conv_in(x), FMAP)
    skips = [x]
    for block in self.down_blocks:
      x, s = block(x, emb, context)
      skips.extend(s)
    if self.mid_block is not None:
      x = self.mid_block(x, emb, context)
    for block in self.up_blocks:
      n = len(block.resnets)
      mine, skips = skips[-n:], skips[:-n]
      size = tuple(skips[-1].shape[1:3]) if skips else None
      x = block(x, mine, emb, context, size)
    x = layers.activation(self.config.act_fn, "act_fn")(self.conv_norm_out(x))
    return self.conv_out(x).astype(jnp.float32)

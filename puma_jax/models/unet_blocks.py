"""The pieces of the SDXL UNet (diffusers `UNet2DConditionModel` layout), NHWC.

Parameter paths mirror diffusers' state-dict names wherever they can (`resnets.{j}.conv1`,
`attentions.{j}.transformer_blocks.{k}.attn2.to_k`, ...), so the conversion table is short;
the departures are `to_out` (diffusers `to_out.0`), `ff.proj` / `ff.out` (`ff.net.0.proj` /
`ff.net.2`) and `downsampler` / `upsampler` (`downsamplers.0` / `upsamplers.0`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from puma_jax import sharding
from puma_jax.models import layers

FMAP = ("batch", "act_height", "act_width", "act_channels")
TOKENS = ("batch", "act_seq", "act_embed")


class KeySeq:
  """Stands in for `nnx.Rngs` when building: one `rngs.params()` call, then per-parameter keys
  folded in with a Python counter.

  Each `nnx.Rngs` call under `nnx.eval_shape` costs time proportional to everything traced so
  far (flax 0.12's `Variable.set_value` probes the new counter tracer's `.sharding`, whose
  AttributeError message walks the whole trace), so building the real-size UNet abstractly was
  quadratic: 130 s for its ~800 random initializers. This makes it linear.
  """

  def __init__(self, rngs):
    self.base = rngs.params()
    self.count = 0

  def params(self):
    self.count += 1
    return jax.random.fold_in(self.base, self.count)


def timestep_embedding(
  timesteps: jax.Array,
  dim: int,
  *,
  flip_sin_to_cos: bool,
  freq_shift: float,
  max_period: float = 10000.0,
) -> jax.Array:
  """diffusers' `get_timestep_embedding`: (N,) -> (N, dim) sinusoids, float32."""
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None]
  sin, cos = jnp.sin(args), jnp.cos(args)
  emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class TimestepEmbedding(nnx.Module):
  """linear_1 -> act -> linear_2 (diffusers `TimestepEmbedding`, also the `text_time` MLP)."""

  def __init__(self, in_features: int, features: int, *, act: str, dtype, param_dtype, rngs):
    self.act = layers.activation(act, "act_fn")
    self.linear_1 = layers.Dense(
      in_features, features, axes=("embed", "mlp"), dtype=dtype, param_dtype=param_dtype, rngs=rngs
    )
    self.linear_2 = layers.Dense(
      features, features, axes=("mlp", "embed"), dtype=dtype, param_dtype=param_dtype, rngs=rngs
    )

  def __call__(self, x):
    return self.linear_2(self.act(self.linear_1(x)))


class ResnetBlock2D(nnx.Module):
  """GroupNorm -> act -> conv -> + time projection -> GroupNorm -> act -> conv, + shortcut."""

  def __init__(
    self,
    in_ch: int,
    out_ch: int,
    temb_ch: int,
    *,
    groups: int,
    eps: float,
    act: str,
    output_scale_factor: float = 1.0,
    dtype,
    param_dtype,
    rngs,
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.act = layers.activation(act, "act_fn")
    self.output_scale_factor = output_scale_factor
    self.norm1 = layers.GroupNorm(groups, in_ch, eps=eps, **kw)
    self.conv1 = layers.Conv(in_ch, out_ch, 3, padding=1, rngs=rngs, **kw)
    self.dtype = dtype
    self.time_emb_proj = layers.Dense(
      temb_ch,
      out_ch,
      axes=("embed", "conv_out"),
      rngs=rngs,
      dtype=jnp.float32,
      param_dtype=param_dtype,
    )
    self.norm2 = layers.GroupNorm(groups, out_ch, eps=eps, **kw)
    self.conv2 = layers.Conv(out_ch, out_ch, 3, padding=1, rngs=rngs, **kw)
    self.conv_shortcut = (
      layers.Conv(in_ch, out_ch, 1, padding=0, rngs=rngs, **kw) if in_ch != out_ch else None
    )

  def __call__(self, x, temb):
    h = self.conv1(self.act(self.norm1(x)))
    h = h + self.time_emb_proj(self.act(temb))[:, None, None, :].astype(self.dtype)
    h = self.conv2(self.act(self.norm2(h)))
    if self.conv_shortcut is not None:
      x = self.conv_shortcut(x)
    out = x + h
    if self.output_scale_factor != 1.0:
      out = out / self.output_scale_factor
    return sharding.constrain(out, FMAP)


class Downsample2D(nnx.Module):
  """Stride-2 3x3 conv; padding 0 means diffusers' asymmetric (0, 1) pad first."""

  def __init__(self, ch: int, *, padding: int, dtype, param_dtype, rngs):
    self.pad_asym = padding == 0
    self.conv = layers.Conv(
      ch,
      ch,
      3,
      strides=2,
      padding="VALID" if padding == 0 else padding,
      dtype=dtype,
      param_dtype=param_dtype,
      rngs=rngs,
    )

  def __call__(self, x):
    if self.pad_asym:
      x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return sharding.constrain(self.conv(x), FMAP)


def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
  # torch's 'nearest' (not 'nearest-exact'): src = floor(dst * (in / out)), scale in float32.
  scale = np.float32(n_in) / np.float32(n_out)
  idx = np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64)
  return np.minimum(idx, n_in - 1)


def upsample_nearest(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  h, w = x.shape[1:3]
  if size == (2 * h, 2 * w):
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
  x = jnp.take(x, jnp.asarray(_nearest_index(h, size[0])), axis=1)
  return jnp.take(x, jnp.asarray(_nearest_index(w, size[1])), axis=2)


class Upsample2D(nnx.Module):
  """Nearest-neighbour upsampling to the skip connection's size, then a 3x3 conv."""

  def __init__(self, ch: int, *, dtype, param_dtype, rngs):
    self.conv = layers.Conv(ch, ch, 3, padding=1, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x, size):
    return sharding.constrain(self.conv(upsample_nearest(x, size)), FMAP)


class Attention(nnx.Module):
  """diffusers `Attention` as SDXL uses it: bias-free q/k/v, biased output projection."""

  def __init__(
    self,
    dim: int,
    heads: int,
    kv_dim: int | None = None,
    *,
    upcast: bool = False,
    dtype,
    param_dtype,
    rngs,
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    kv_dim = kv_dim or dim
    self.heads, self.upcast, self.dtype = heads, upcast, dtype
    self.to_q = layers.Dense(dim, dim, axes=("embed", "heads"), use_bias=False, **kw)
    self.to_k = layers.Dense(kv_dim, dim, axes=("embed", "heads"), use_bias=False, **kw)
    self.to_v = layers.Dense(kv_dim, dim, axes=("embed", "heads"), use_bias=False, **kw)
    self.to_out = layers.Dense(dim, dim, axes=("heads", "embed"), **kw)

  def __call__(self, x, context=None):
    context = x if context is None else context
    b, t, d = x.shape

    def split(y):
      y = y.reshape(y.shape[0], y.shape[1], self.heads, d // self.heads)
      y = sharding.constrain(y, ("batch", "act_seq", "act_heads", None))
      # upcast_attention (SD 2.x) computes scores and softmax in float32.
      return y.astype(jnp.float32) if self.upcast else y

    q, k = split(self.to_q(x)), split(self.to_k(context))
    layers.record_attention("self" if context is x else "cross", q, k)
    o = layers.attention(q, k, split(self.to_v(context)))
    return self.to_out(o.astype(self.dtype).reshape(b, t, d))


class GEGLUFeedForward(nnx.Module):
  """proj -> (h, gate) halves -> h * gelu(gate) (exact erf GELU) -> out; hidden = 4 * dim."""

  def __init__(self, dim: int, *, mult: int = 4, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.hidden = mult * dim
    self.proj = layers.Dense(dim, 2 * self.hidden, axes=("embed", "mlp"), **kw)
    self.out = layers.Dense(self.hidden, dim, axes=("mlp", "embed"), **kw)

  def __call__(self, x):
    h = self.proj(x)
    h, gate = h[..., : self.hidden], h[..., self.hidden :]
    h = h * jax.nn.gelu(gate, approximate=False)
    return self.out(sharding.constrain(h, ("batch", "act_seq", "act_mlp")))


class BasicTransformerBlock(nnx.Module):
  """Pre-LN: self-attention, cross-attention to the context, GEGLU feed-forward."""

  def __init__(
    self, dim: int, heads: int, context_dim: int, *, upcast: bool, dtype, param_dtype, rngs
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.norm1 = layers.LayerNorm(dim, eps=1e-5, **kw)
    self.attn1 = Attention(dim, heads, upcast=upcast, rngs=rngs, **kw)
    self.norm2 = layers.LayerNorm(dim, eps=1e-5, **kw)
    self.attn2 = Attention(dim, heads, context_dim, upcast=upcast, rngs=rngs, **kw)
    self.norm3 = layers.LayerNorm(dim, eps=1e-5, **kw)
    self.ff = GEGLUFeedForward(dim, rngs=rngs, **kw)

  def __call__(self, x, context):
    x = x + self.attn1(self.norm1(x))
    x = x + self.attn2(self.norm2(x), context)
    x = x + self.ff(self.norm3(x))
    return sharding.constrain(x, TOKENS)


def _apply_block(block, x, context):
  return block(x, context)


class Transformer2DModel(nnx.Module):
  """GroupNorm -> proj_in -> transformer blocks over the H*W tokens -> proj_out, + residual.

  `proj_in`/`proj_out` are dense layers either way: diffusers' 1x1-conv variant
  (`use_linear_projection=False`) is the same map, converted by `conv1x1_as_linear`.
  """

  def __init__(
    self,
    ch: int,
    heads: int,
    context_dim: int,
    num_layers: int,
    *,
    groups: int,
    upcast: bool,
    remat: bool,
    position_code: str = "none",
    dtype,
    param_dtype,
    rngs,
  ):
    if ch % heads:
      raise ValueError(f"Transformer2DModel: {ch} channels not divisible by {heads} heads")
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.remat, self.position_code = remat, position_code
    self.norm = layers.GroupNorm(groups, ch, eps=1e-6, **kw)
    self.proj_in = layers.Dense(ch, ch, axes=("conv_in", "embed"), rngs=rngs, **kw)
    self.transformer_blocks = nnx.List(
      [
        BasicTransformerBlock(ch, heads, context_dim, upcast=upcast, rngs=rngs, **kw)
        for _ in range(num_layers)
      ]
    )
    self.proj_out = layers.Dense(ch, ch, axes=("embed", "conv_out"), rngs=rngs, **kw)

  def __call__(self, x, context):
    b, h, w, c = x.shape
    residual = x
    t = self.proj_in(self.norm(x).reshape(b, h * w, c))
    if self.position_code == "sincos2d":  # UNetConfig.position_code
      t = t + jnp.asarray(layers.grid_position_code(h, w, c), t.dtype)
    t = sharding.constrain(t, TOKENS)
    # Rematerialization keeps only each block's input for the backward pass: the attention
    # scores and GEGLU activations (the bulk of training memory at 128x128 latents) are recomputed.
    apply = nnx.remat(_apply_block) if self.remat else _apply_block
    for blk in self.transformer_blocks:
      t = apply(blk, t, context)
    out = self.proj_out(t).reshape(b, h, w, c)
    return sharding.constrain(out + residual, FMAP)


class DownBlock(nnx.Module):
  """`DownBlock2D` (no attentions) or `CrossAttnDownBlock2D`; returns (x, skip states)."""

  def __init__(
    self,
    in_ch,
    out_ch,
    temb_ch,
    *,
    num_layers,
    tlayers,
    heads,
    context_dim,
    cross_attn,
    add_downsample,
    cfg,
    remat,
    dtype,
    param_dtype,
    rngs,
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.resnets = nnx.List(
      [
        ResnetBlock2D(
          in_ch if j == 0 else out_ch,
          out_ch,
          temb_ch,
          groups=cfg.norm_num_groups,
          eps=cfg.norm_eps,
          act=cfg.act_fn,
          **kw,
        )
        for j in range(num_layers)
      ]
    )
    self.attentions = (
      nnx.List(
        [
          Transformer2DModel(
            out_ch,
            heads,
            context_dim,
            tlayers[j],
            groups=cfg.norm_num_groups,
            upcast=cfg.upcast_attention,
            position_code=cfg.position_code,
            remat=remat,
            **kw,
          )
          for j in range(num_layers)
        ]
      )
      if cross_attn
      else None
    )
    self.downsampler = (
      Downsample2D(out_ch, padding=cfg.downsample_padding, **kw) if add_downsample else None
    )

  def __call__(self, x, temb, context):
    skips = []
    for j, resnet in enumerate(self.resnets):
      x = resnet(x, temb)
      if self.attentions is not None:
        x = self.attentions[j](x, context)
      skips.append(x)
    if self.downsampler is not None:
      x = self.downsampler(x)
      skips.append(x)
    return x, skips


class MidBlock(nnx.Module):
  """`UNetMidBlock2DCrossAttn`: resnet, then (transformer, resnet) pairs."""

  def __init__(
    self, ch, temb_ch, *, tlayers, heads, context_dim, cfg, remat, dtype, param_dtype, rngs
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    res = lambda: ResnetBlock2D(
      ch,
      ch,
      temb_ch,
      groups=cfg.norm_num_groups,
      eps=cfg.norm_eps,
      act=cfg.act_fn,
      output_scale_factor=cfg.mid_block_scale_factor,
      **kw,
    )
    self.resnets = nnx.List([res() for _ in range(len(tlayers) + 1)])
    self.attentions = nnx.List(
      [
        Transformer2DModel(
          ch,
          heads,
          context_dim,
          n,
          groups=cfg.norm_num_groups,
          upcast=cfg.upcast_attention,
          position_code=cfg.position_code,
          remat=remat,
          **kw,
        )
        for n in tlayers
      ]
    )

  def __call__(self, x, temb, context):
    x = self.resnets[0](x, temb)
    for attn, resnet in zip(self.attentions, self.resnets[1:]):
      x = resnet(attn(x, context), temb)
    return x


class UpBlock(nnx.Module):
  """`UpBlock2D` or `CrossAttnUpBlock2D`: each resnet eats one skip state (concatenated)."""

  def __init__(
    self,
    in_ch,
    prev_ch,
    out_ch,
    temb_ch,
    *,
    num_layers,
    tlayers,
    heads,
    context_dim,
    cross_attn,
    add_upsample,
    cfg,
    remat,
    dtype,
    param_dtype,
    rngs,
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    resnets = []
    for j in range(num_layers):
      skip_ch = in_ch if j == num_layers - 1 else out_ch
      res_in = prev_ch if j == 0 else out_ch
      resnets.append(
        ResnetBlock2D(
          res_in + skip_ch,
          out_ch,
          temb_ch,
          groups=cfg.norm_num_groups,
          eps=cfg.norm_eps,
          act=cfg.act_fn,
          **kw,
        )
      )
    self.resnets = nnx.List(resnets)
    self.attentions = (
      nnx.List(
        [
          Transformer2DModel(
            out_ch,
            heads,
            context_dim,
            tlayers[j],
            groups=cfg.norm_num_groups,
            upcast=cfg.upcast_attention,
            position_code=cfg.position_code,
            remat=remat,
            **kw,
          )
          for j in range(num_layers)
        ]
      )
      if cross_attn
      else None
    )
    self.upsampler = Upsample2D(out_ch, **kw) if add_upsample else None

  def __call__(self, x, skips, temb, context, upsample_size):
    for j, resnet in enumerate(self.resnets):
      # Constrained (channels replicated): left to propagation, the concat and its gradient got
      # channels sharded over tensor on a data x fsdp x tensor mesh, where XLA mis-partitions the
      # backward-data conv of conv1 (docs/notes/xla_spmd_conv_grad_repro.py).
      x = sharding.constrain(jnp.concatenate([x, skips.pop()], axis=-1), FMAP)
      x = resnet(x, temb)
      if self.attentions is not None:
        x = self.attentions[j](x, context)
    if self.upsampler is not None:
      x = self.upsampler(x, upsample_size)
    return x

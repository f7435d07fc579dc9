"""AutoencoderKL (the SDXL VAE) in Flax NNX, NHWC; diffusers' `AutoencoderKL` layout.

PUMA keeps the SDXL VAE frozen: decoders denoise in its latent space, and the pipeline ends with
`model.decode(latents / scaling_factor)`. `encode` gives the latent distribution's mean (before
`scaling_factor`), `encode_moments` its mean and log-variance, `sample_latent` a draw from it (the
training-time latent). `decode` returns the raw decoder output (nominally [-1, 1]; not clipped).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from puma_jax import sharding
from puma_jax.models import layers
from puma_jax.models.base import ModelConfig

_DOWN = "DownEncoderBlock2D"
_UP = "UpDecoderBlock2D"
_ACT = ("batch", "act_height", "act_width", "act_channels")
# diffusers hard-codes this epsilon for every norm of the VAE (resnets, attention, output norms).
_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class VAEConfig(ModelConfig):
  in_channels: int = 3
  out_channels: int = 3
  down_block_types: tuple[str, ...] = (_DOWN,) * 4
  up_block_types: tuple[str, ...] = (_UP,) * 4
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  act_fn: str = "silu"
  latent_channels: int = 4
  norm_num_groups: int = 32
  sample_size: int = 1024
  scaling_factor: float = 0.13025
  shift_factor: float | None = None
  force_upcast: bool = True  # diffusers' hint to run the VAE in float32; recorded, not acted on
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True

  def __post_init__(self):
    n = len(self.block_out_channels)
    if n == 0:
      raise ValueError("VAEConfig: block_out_channels must not be empty")
    for field, types, want in (
      ("down_block_types", self.down_block_types, _DOWN),
      ("up_block_types", self.up_block_types, _UP),
    ):
      if len(types) != n:
        raise ValueError(
          f"VAEConfig: {field} has {len(types)} entries but block_out_channels has {n}"
        )
      bad = [t for t in types if t != want]
      if bad:
        raise ValueError(f"VAEConfig: unsupported {field} {bad}; only {want!r} is implemented")
    for c in self.block_out_channels:
      if c % self.norm_num_groups:
        raise ValueError(
          f"VAEConfig: block_out_channels entry {c} is not divisible by "
          f"norm_num_groups={self.norm_num_groups}"
        )
    if self.layers_per_block < 1 or self.latent_channels < 1:
      raise ValueError("VAEConfig: layers_per_block and latent_channels must be >= 1")
    layers.activation(self.act_fn, "act_fn")

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)


def sdxl_vae_config() -> VAEConfig:
  """stabilityai/stable-diffusion-xl-base-1.0 `vae/config.json` (83,653,863 parameters)."""
  return VAEConfig()


def config_with_blocks(block_out_channels, **kw) -> VAEConfig:
  """A config with one DownEncoderBlock2D / UpDecoderBlock2D per entry of `block_out_channels`."""
  n = len(block_out_channels)
  return VAEConfig(
    block_out_channels=tuple(block_out_channels),
    down_block_types=(_DOWN,) * n,
    up_block_types=(_UP,) * n,
    **kw,
  )


def tiny_config() -> VAEConfig:
  """Two levels, 8..16 channels: 2x downsampling, for CPU tests."""
  return config_with_blocks((8, 16), norm_num_groups=4, layers_per_block=1, sample_size=32)


def small_config() -> VAEConfig:
  """The SDXL topology (4 levels, 8x downsampling) at toy width."""
  return config_with_blocks((8, 16, 32, 32), norm_num_groups=4, layers_per_block=2, sample_size=64)


def _conv(cin, cout, k=3, *, padding=1, strides=1, dtype, param_dtype, rngs):
  return layers.Conv(
    cin, cout, k, padding=padding, strides=strides, dtype=dtype, param_dtype=param_dtype, rngs=rngs
  )


def _norm(groups, c, *, dtype, param_dtype):
  return layers.GroupNorm(groups, c, eps=_EPS, dtype=dtype, param_dtype=param_dtype)


class ResnetBlock(nnx.Module):
  """diffusers `ResnetBlock2D` without a time embedding (the VAE has none)."""

  def __init__(self, cin: int, cout: int, cfg: VAEConfig, *, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.act = layers.activation(cfg.act_fn, "act_fn")
    self.norm1 = _norm(cfg.norm_num_groups, cin, **kw)
    self.conv1 = _conv(cin, cout, rngs=rngs, **kw)
    self.norm2 = _norm(cfg.norm_num_groups, cout, **kw)
    self.conv2 = _conv(cout, cout, rngs=rngs, **kw)
    self.conv_shortcut = _conv(cin, cout, 1, padding=0, rngs=rngs, **kw) if cin != cout else None

  def __call__(self, x):
    h = self.conv1(self.act(self.norm1(x)))
    h = self.conv2(self.act(self.norm2(h)))
    if self.conv_shortcut is not None:
      x = self.conv_shortcut(x)
    return sharding.constrain(x + h, _ACT)


class AttentionBlock(nnx.Module):
  """The VAE's single-head spatial self-attention with a group norm and a residual."""

  def __init__(self, c: int, cfg: VAEConfig, *, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.group_norm = _norm(cfg.norm_num_groups, c, **kw)
    mk = lambda axes: layers.Dense(c, c, axes=axes, rngs=rngs, **kw)
    self.to_q, self.to_k, self.to_v = (
      mk(("embed", "heads")),
      mk(("embed", "heads")),
      mk(("embed", "heads")),
    )
    self.to_out = mk(("heads", "embed"))

  def __call__(self, x):
    b, hh, ww, c = x.shape
    h = self.group_norm(x).reshape(b, hh * ww, c)
    # One head of width C (diffusers: heads = C // attention_head_dim with attention_head_dim = C).
    split = lambda y: y.reshape(b, hh * ww, 1, c)
    o = layers.attention(split(self.to_q(h)), split(self.to_k(h)), split(self.to_v(h)))
    o = self.to_out(o.reshape(b, hh * ww, c)).reshape(b, hh, ww, c)
    return sharding.constrain(x + o, _ACT)


class MidBlock(nnx.Module):
  def __init__(self, c: int, cfg: VAEConfig, *, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.resnets = nnx.List([ResnetBlock(c, c, cfg, **kw), ResnetBlock(c, c, cfg, **kw)])
    self.attention = AttentionBlock(c, cfg, **kw) if cfg.mid_block_add_attention else None

  def __call__(self, x):
    x = self.resnets[0](x)
    if self.attention is not None:
      x = self.attention(x)
    return self.resnets[1](x)


class Downsample(nnx.Module):
  """Stride-2 3x3 conv after padding one zero row/column at the bottom/right (diffusers'
  `Downsample2D(padding=0)`), which halves odd sizes the same way torch does."""

  def __init__(self, c: int, *, dtype, param_dtype, rngs):
    self.conv = _conv(
      c, c, padding="VALID", strides=2, dtype=dtype, param_dtype=param_dtype, rngs=rngs
    )

  def __call__(self, x):
    return self.conv(jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0))))


class Upsample(nnx.Module):
  """Nearest-neighbour x2 then a 3x3 conv."""

  def __init__(self, c: int, *, dtype, param_dtype, rngs):
    self.conv = _conv(c, c, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x):
    return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class DownBlock(nnx.Module):
  def __init__(self, cin, cout, n, add_downsample, cfg, *, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.resnets = nnx.List(
      [ResnetBlock(cin if j == 0 else cout, cout, cfg, **kw) for j in range(n)]
    )
    self.downsample = Downsample(cout, **kw) if add_downsample else None

  def __call__(self, x):
    for r in self.resnets:
      x = r(x)
    return self.downsample(x) if self.downsample is not None else x


class UpBlock(nnx.Module):
  def __init__(self, cin, cout, n, add_upsample, cfg, *, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.resnets = nnx.List(
      [ResnetBlock(cin if j == 0 else cout, cout, cfg, **kw) for j in range(n)]
    )
    self.upsample = Upsample(cout, **kw) if add_upsample else None

  def __call__(self, x):
    for r in self.resnets:
      x = r(x)
    return self.upsample(x) if self.upsample is not None else x


class Encoder(nnx.Module):
  """Down blocks, mid block, then norm + SiLU + conv (diffusers hard-codes SiLU there whatever
  `act_fn` says; `act_fn` is the resnets' activation)."""

  def __init__(self, cfg: VAEConfig, *, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    ch = cfg.block_out_channels
    self.conv_in = _conv(cfg.in_channels, ch[0], **kw)
    self.down_blocks = nnx.List(
      [
        DownBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, i < len(ch) - 1, cfg, **kw)
        for i in range(len(ch))
      ]
    )
    self.mid_block = MidBlock(ch[-1], cfg, **kw)
    self.conv_norm_out = _norm(cfg.norm_num_groups, ch[-1], dtype=dtype, param_dtype=param_dtype)
    self.conv_out = _conv(ch[-1], 2 * cfg.latent_channels, **kw)

  def __call__(self, x):
    x = self.conv_in(x)
    for blk in self.down_blocks:
      x = blk(x)
    x = self.mid_block(x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
  def __init__(self, cfg: VAEConfig, *, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    rev = tuple(reversed(cfg.block_out_channels))
    self.conv_in = _conv(cfg.latent_channels, rev[0], **kw)
    self.mid_block = MidBlock(rev[0], cfg, **kw)
    # Decoder blocks hold one resnet more than encoder blocks (diffusers: layers_per_block + 1).
    self.up_blocks = nnx.List(
      [
        UpBlock(rev[max(i - 1, 0)], rev[i], cfg.layers_per_block + 1, i < len(rev) - 1, cfg, **kw)
        for i in range(len(rev))
      ]
    )
    self.conv_norm_out = _norm(cfg.norm_num_groups, rev[-1], dtype=dtype, param_dtype=param_dtype)
    self.conv_out = _conv(rev[-1], cfg.out_channels, **kw)

  def __call__(self, z):
    x = self.mid_block(self.conv_in(z))
    for blk in self.up_blocks:
      x = blk(x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
  """`encode(images)` -> latent mean (B, H/f, W/f, latent_channels), before `scaling_factor`;
  `decode(latents)` -> images (B, H, W, out_channels), nominally in [-1, 1]. NHWC throughout."""

  def __init__(
    self, config: VAEConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs
  ):
    self.config = config
    self.dtype = dtype
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    z = config.latent_channels
    self.encoder = Encoder(config, **kw)
    self.decoder = Decoder(config, **kw)
    self.quant_conv = _conv(2 * z, 2 * z, 1, padding=0, **kw) if config.use_quant_conv else None
    self.post_quant_conv = _conv(z, z, 1, padding=0, **kw) if config.use_post_quant_conv else None

  def _check(self, x, what: str, channels: int, field: str):
    shape = tuple(x.shape)
    if len(shape) != 4 or shape[-1] != channels:
      hint = ""
      if len(shape) == 4 and shape[1] == channels:
        hint = " (it looks NCHW: transpose to NHWC)"
      raise ValueError(
        f"VAE {what} must be NHWC (batch, height, width, {channels}) with "
        f"{field}={channels}; got shape {shape}{hint}"
      )

  def encode_moments(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(mean, logvar) of the latent distribution; logvar clamped to [-30, 20] like diffusers."""
    self._check(images, "images", self.config.in_channels, "in_channels")
    h = self.encoder(sharding.constrain(images.astype(self.dtype), _ACT))
    if self.quant_conv is not None:
      h = self.quant_conv(h)
    mean, logvar = jnp.split(h, 2, axis=-1)
    return mean, jnp.clip(logvar.astype(jnp.float32), -30.0, 20.0)

  def encode(self, images: jax.Array) -> jax.Array:
    """The latent distribution's mean, before `scaling_factor` (PUMA's deterministic latent)."""
    return self.encode_moments(images)[0]

  def sample_latent(self, key: jax.Array, images: jax.Array) -> jax.Array:
    """A draw mean + std * N(0, 1) from the latent distribution (before `scaling_factor`)."""
    mean, logvar = self.encode_moments(images)
    eps = jax.random.normal(key, mean.shape, jnp.float32)
    return (mean.astype(jnp.float32) + jnp.exp(0.5 * logvar) * eps).astype(mean.dtype)

  def decode(self, latents: jax.Array) -> jax.Array:
    """Images from unscaled latents (divide diffusion latents by `scaling_factor` first)."""
    self._check(latents, "latents", self.config.latent_channels, "latent_channels")
    z = sharding.constrain(latents.astype(self.dtype), _ACT)
    if self.post_quant_conv is not None:
      z = self.post_quant_conv(z)
    return self.decoder(z)

  def __call__(self, images: jax.Array) -> jax.Array:
    """Reconstruction through the mean latent: decode(encode(images))."""
    return self.decode(self.encode(images))

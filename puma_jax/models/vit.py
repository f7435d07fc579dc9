"""ViT encoder in the HF `ViTModel` layout, for the DINO score (facebook/dino-vits16).

`model(pixel_values)` -> `last_hidden_state` (B, 1 + N, D) after the final `layernorm`; the DINO
score uses its class token (`model.cls_features`). HF's optional pooler (a dense + tanh head that
the DINO checkpoints do not train) is not part of the model; the converter skips its tensors
when a checkpoint carries them.

Preprocessing (`preprocess`) follows a `ViTImageProcessor`: resize to exactly 224x224, ImageNet
mean/std, no crop. The resampling filter comes from the checkpoint's `preprocessor_config.json`
when the converted directory has one (the converter copies it); bicubic otherwise.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from puma_jax import sharding
from puma_jax.models import layers
from puma_jax.models.base import ModelConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class ViTConfig(ModelConfig):
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  num_channels: int = 3
  image_size: int = 224
  patch_size: int = 16
  hidden_act: str = "gelu"
  layer_norm_eps: float = 1e-12
  qkv_bias: bool = True

  def __post_init__(self):
    if self.image_size % self.patch_size:
      raise ValueError(
        f"ViTConfig: image_size={self.image_size} is not a multiple of patch_size={self.patch_size}"
      )
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(
        f"ViTConfig: hidden_size={self.hidden_size} is not divisible by "
        f"num_attention_heads={self.num_attention_heads}"
      )
    layers.activation(self.hidden_act)

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2


def dino_vits16() -> ViTConfig:
  """facebook/dino-vits16 (21,665,664 parameters without the pooler)."""
  return ViTConfig(
    hidden_size=384,
    intermediate_size=1536,
    num_hidden_layers=12,
    num_attention_heads=6,
    image_size=224,
    patch_size=16,
  )


# HF `ViTLayer` attribute names, as our checkpoints store them (`attention.o_proj` is HF's
# `attention.output.dense`; see convert/vit.py).
BLOCK_NAMES = layers.BlockNames(
  norm1="layernorm_before", attn="attention", out_proj="o_proj", norm2="layernorm_after"
)


class ViTEmbeddings(nnx.Module):
  def __init__(self, cfg: ViTConfig, *, dtype, param_dtype, rngs):
    self.cfg, self.dtype = cfg, dtype
    self.patch_embeddings = layers.Conv(
      cfg.num_channels,
      cfg.hidden_size,
      cfg.patch_size,
      strides=cfg.patch_size,
      padding="VALID",
      dtype=dtype,
      param_dtype=param_dtype,
      rngs=rngs,
    )
    init = nnx.initializers.truncated_normal(0.02)
    self.cls_token = layers.param(
      rngs, init, (1, 1, cfg.hidden_size), (None, None, "embed"), param_dtype
    )
    self.position_embeddings = layers.param(
      rngs, init, (1, cfg.num_patches + 1, cfg.hidden_size), (None, None, "embed"), param_dtype
    )

  def __call__(self, pixel_values):
    b = pixel_values.shape[0]
    d = self.cfg.hidden_size
    patches = self.patch_embeddings(pixel_values).reshape(b, -1, d)  # row-major patch grid
    cls = jnp.broadcast_to(self.cls_token[...].astype(self.dtype), (b, 1, d))
    x = jnp.concatenate([cls, patches], axis=1)
    return x + self.position_embeddings[...].astype(self.dtype)


class ViTModel(nnx.Module):
  """`model(pixel_values)` (NHWC, preprocessed) -> last hidden state (B, 1 + N, D)."""

  def __init__(
    self, config: ViTConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs
  ):
    self.config, self.dtype = config, dtype
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.embeddings = ViTEmbeddings(config, **kw)
    self.layers = nnx.List(
      [
        layers.EncoderLayer(config, BLOCK_NAMES, qkv_bias=config.qkv_bias, **kw)
        for _ in range(config.num_hidden_layers)
      ]
    )
    self.layernorm = layers.LayerNorm(
      config.hidden_size, eps=config.layer_norm_eps, dtype=dtype, param_dtype=param_dtype
    )

  def check_input(self, pixel_values) -> None:
    c = self.config
    want = (c.image_size, c.image_size, c.num_channels)
    shape = tuple(pixel_values.shape)
    if len(shape) != 4 or shape[1:] != want:
      hint = (
        " (it looks NCHW: transpose to NHWC)"
        if (len(shape) == 4 and shape[1] == c.num_channels)
        else ""
      )
      raise ValueError(
        f"ViT pixel_values must be NHWC (batch, {want[0]}, {want[1]}, {want[2]}); "
        f"got shape {shape}{hint}"
      )

  def __call__(self, pixel_values: jax.Array) -> jax.Array:
    self.check_input(pixel_values)
    x = sharding.constrain(
      self.embeddings(pixel_values.astype(self.dtype)), ("batch", "act_seq", "act_embed")
    )
    for layer in self.layers:
      x = layer(x)
    return self.layernorm(x)

  def cls_features(self, pixel_values: jax.Array) -> jax.Array:
    """The DINO embedding: class token of the final-normed hidden state (B, D)."""
    return self(pixel_values)[:, 0]


def preprocess(
  images: jax.Array, size: int = 224, method: str = "cubic", mean=IMAGENET_MEAN, std=IMAGENET_STD
) -> jax.Array:
  """Float images in [0, 1] (NHWC, any size) -> ViT pixel values: resize to size x size, normalize.

  `method`: "cubic" or "linear" (PIL's resample 3 / 2 in a `preprocessor_config.json`).
  `jax.image.resize`, antialiased when shrinking; close to, not bit-exact with, PIL's resize.
  """
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"images must be NHWC with 3 channels; got shape {tuple(images.shape)}")
  images = images.astype(jnp.float32)
  if images.shape[1:3] != (size, size):
    images = jax.image.resize(images, (images.shape[0], size, size, 3), method, antialias=True)
  return (images - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)

"""CLIP vision tower (pre-LN ViT, HF `CLIPVisionModel` layout) and PUMA's image preprocessing.

PUMA's image features are `model(pixel_values)[:, 1:]`: the final layer's patch tokens, class
token dropped, *before* `post_layernorm` (docs/DESIGN.md §2). `post_layernorm` is kept (it is
part of the checkpoint and of the pooled output that CLIP scores use).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from puma_jax import sharding
from puma_jax.models import layers
from puma_jax.models.base import ModelConfig

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig(ModelConfig):
  hidden_size: int = 1024
  intermediate_size: int = 4096
  num_hidden_layers: int = 24
  num_attention_heads: int = 16
  num_channels: int = 3
  image_size: int = 224
  patch_size: int = 14
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  projection_dim: int = 768  # unused by the vision tower; kept for CLIP scores

  def __post_init__(self):
    if self.image_size % self.patch_size:
      raise ValueError(
        f"CLIPVisionConfig: image_size={self.image_size} is not a multiple of "
        f"patch_size={self.patch_size}"
      )
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(
        f"CLIPVisionConfig: hidden_size={self.hidden_size} is not divisible by "
        f"num_attention_heads={self.num_attention_heads}"
      )
    layers.activation(self.hidden_act)

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  @property
  def num_positions(self) -> int:
    return self.grid**2 + 1


def vit_l14() -> CLIPVisionConfig:
  """openai/clip-vit-large-patch14, PUMA's encoder."""
  return CLIPVisionConfig()


def tiny() -> CLIPVisionConfig:
  """A 16x16 patch grid (like ViT-L/14 at 224) at toy width, for CPU runs and tests."""
  return CLIPVisionConfig(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=32,
    patch_size=2,
    projection_dim=32,
  )


# HF `CLIPEncoderLayer` attribute names (the parameter paths of converted checkpoints).
BLOCK_NAMES = layers.BlockNames(
  norm1="layer_norm1", attn="self_attn", out_proj="out_proj", norm2="layer_norm2"
)


class CLIPEncoder(nnx.Module):
  def __init__(self, cfg: CLIPVisionConfig, *, dtype, param_dtype, rngs):
    self.layers = nnx.List(
      [
        layers.EncoderLayer(cfg, BLOCK_NAMES, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        for _ in range(cfg.num_hidden_layers)
      ]
    )

  def __call__(self, x, mask=None):
    # `mask`: boolean, broadcastable to (B, H, T, T), True = attend (the text tower's causal and
    # padding mask); the vision tower passes none.
    for layer in self.layers:
      x = layer(x, mask=mask)
    return x


class CLIPVisionEmbeddings(nnx.Module):
  def __init__(self, cfg: CLIPVisionConfig, *, dtype, param_dtype, rngs):
    self.cfg = cfg
    self.dtype = dtype
    self.patch_embedding = layers.Conv(
      cfg.num_channels,
      cfg.hidden_size,
      cfg.patch_size,
      strides=cfg.patch_size,
      padding="VALID",
      use_bias=False,
      dtype=dtype,
      param_dtype=param_dtype,
      rngs=rngs,
    )
    self.class_embedding = layers.param(
      rngs,
      nnx.initializers.normal(cfg.hidden_size**-0.5),
      (cfg.hidden_size,),
      ("embed",),
      param_dtype,
    )
    self.position_embedding = layers.Embed(
      cfg.num_positions,
      cfg.hidden_size,
      axes=(None, "embed"),
      dtype=dtype,
      param_dtype=param_dtype,
      rngs=rngs,
    )

  def __call__(self, pixel_values):
    b = pixel_values.shape[0]
    patches = self.patch_embedding(pixel_values)
    patches = patches.reshape(b, -1, self.cfg.hidden_size)  # row-major over the patch grid
    cls = jnp.broadcast_to(
      self.class_embedding[...].astype(self.dtype), (b, 1, self.cfg.hidden_size)
    )
    x = jnp.concatenate([cls, patches], axis=1)
    return x + self.position_embedding.embedding[...].astype(self.dtype)[None]


class CLIPVisionModel(nnx.Module):
  """`model(pixel_values)` -> last hidden state (B, 1 + N, D), before post-layernorm.

  `pixel_values` are preprocessed images, NHWC (see `preprocess`).
  """

  def __init__(
    self, config: CLIPVisionConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs
  ):
    self.config = config
    self.dtype = dtype
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.embeddings = CLIPVisionEmbeddings(config, **kw)
    self.pre_layrnorm = layers.LayerNorm(
      config.hidden_size, eps=config.layer_norm_eps, dtype=dtype, param_dtype=param_dtype
    )
    self.encoder = CLIPEncoder(config, **kw)
    self.post_layernorm = layers.LayerNorm(
      config.hidden_size, eps=config.layer_norm_eps, dtype=dtype, param_dtype=param_dtype
    )

  def check_input(self, pixel_values) -> None:
    c = self.config
    want = (c.image_size, c.image_size, c.num_channels)
    shape = tuple(pixel_values.shape)
    if len(shape) != 4 or shape[1:] != want:
      hint = ""
      if len(shape) == 4 and shape[1] == c.num_channels and shape[2:] == want[:2]:
        hint = " (it looks NCHW: transpose to NHWC)"
      elif len(shape) == 3:
        hint = " (add a batch axis)"
      raise ValueError(
        f"CLIP pixel_values must be NHWC (batch, {want[0]}, {want[1]}, {want[2]}); "
        f"got shape {shape}{hint}"
      )

  def __call__(self, pixel_values: jax.Array) -> jax.Array:
    self.check_input(pixel_values)
    x = sharding.constrain(
      self.embeddings(pixel_values.astype(self.dtype)), ("batch", "act_seq", "act_embed")
    )
    x = self.pre_layrnorm(x)
    return self.encoder(x)

  def pooled(self, last_hidden_state: jax.Array) -> jax.Array:
    """HF's `pooler_output`: post-layernorm of the class token."""
    return self.post_layernorm(last_hidden_state[:, 0])


def patch_features(model: CLIPVisionModel, pixel_values: jax.Array) -> jax.Array:
  """PUMA's image features: final-layer patch tokens (B, N, D), no post-layernorm."""
  return model(pixel_values)[:, 1:]


def patch_features_uint8(model: CLIPVisionModel, images, chunk: int = 64) -> np.ndarray:
  """`patch_features` of uint8 images (n, H, W, 3) at the model's size, `chunk` at a time (the
  analysis tools' batches of hundreds of scenes) -> NumPy (n, N, D)."""
  if chunk < 1:
    raise ValueError(f"patch_features_uint8: chunk={chunk} must be at least 1")
  out = [
    np.asarray(patch_features(model, normalize_uint8(images[a : a + chunk])))
    for a in range(0, len(images), chunk)
  ]
  return np.concatenate(out)


# ----------------------------------------------------------------------------------------------
# Preprocessing (docs/DESIGN.md §2: resize to exactly 224x224, bilinear, no crop; CLIP mean/std)


def normalize(images01):
  """CLIP mean/std normalization of float images in [0, 1] (NumPy or JAX, channels last).

  The one place CLIP's normalization is written; every path into the encoder goes through it."""
  xp = jnp if isinstance(images01, jax.Array) else np
  mean = xp.asarray(CLIP_MEAN, xp.float32)
  std = xp.asarray(CLIP_STD, xp.float32)
  return (images01 - mean) / std


def normalize_uint8(images: jax.Array) -> jax.Array:
  """uint8 images (as the data pipeline ships CLIP views) -> CLIP-normalized float32."""
  return normalize(jnp.asarray(images).astype(jnp.float32) / 255.0)


def black_image(size: int) -> np.ndarray:
  """The all-black picture whose features are CFG's unconditional input (uint8 HWC)."""
  return np.zeros((size, size, 3), np.uint8)


def black_features(model: CLIPVisionModel, tokens: int) -> jax.Array:
  """CFG's unconditional decoder input: the black image's patch features pooled to `tokens`
  (1, tokens, D), through the same normalization as every real image."""
  from puma_jax.models import pooling

  size = model.config.image_size
  pixels = normalize_uint8(black_image(size)[None])
  return pooling.pool(patch_features(model, pixels), tokens)


def _check_images(images, what="images"):
  shape = tuple(images.shape)
  if len(shape) not in (3, 4) or shape[-1] not in (1, 3, 4):
    raise ValueError(f"{what} must be HWC or NHWC with 1, 3 or 4 channels; got shape {shape}")


def preprocess_pil(images: Sequence, size: int = 224) -> np.ndarray:
  """Exactly the public PUMA transform: PIL bilinear resize to (size, size), /255, CLIP norm.

  `images`: PIL images or uint8 HWC arrays. Returns float32 NHWC.
  """
  from PIL import Image

  from puma_jax.data.imaging import to_8bit

  out = []
  for i, img in enumerate(images):
    if not isinstance(img, Image.Image):
      arr = np.asarray(img)
      _check_images(arr, "image")
      if arr.ndim != 3:
        raise ValueError(f"each image must be HWC; got shape {arr.shape}")
      if arr.dtype != np.uint8:
        raise ValueError(f"array images must be uint8 (0..255); got {arr.dtype}")
      img = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
    if img.width < 1 or img.height < 1:
      raise ValueError(f"image {i} is {img.width}x{img.height}: empty images cannot be encoded")
    img = to_8bit(img).convert("RGB").resize((size, size), Image.BILINEAR)
    out.append(np.asarray(img, np.float32) / 255.0)
  return normalize(np.stack(out))


def preprocess(images: jax.Array, size: int = 224) -> jax.Array:
  """In-graph twin of `preprocess_pil` for float images in [0, 1] (NHWC, any size).

  Antialiased bilinear resize (`jax.image.resize`); matches PIL closely but not bit-exactly,
  since PIL resamples 8-bit values.
  """
  _check_images(images)
  if images.ndim == 3:
    images = images[None]
  if images.shape[-1] == 1:
    images = jnp.repeat(images, 3, axis=-1)
  images = images[..., :3].astype(jnp.float32)
  images = jax.image.resize(images, (images.shape[0], size, size, 3), "bilinear", antialias=True)
  return normalize(images)

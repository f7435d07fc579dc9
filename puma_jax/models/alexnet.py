"""AlexNet convolutional trunk in torchvision's `features` layout (NHWC), and LPIPS on top of it.

torchvision's `alexnet().features` is a Sequential whose convolutions sit at indices 0, 3, 6, 8,
10 (ReLUs and 3x3/2 max-pools between them); our parameters are named after those indices
(`features_0.kernel` ...), so the conversion table reads one-to-one. LPIPS taps the five ReLU
outputs (relu1..relu5), exactly as the `lpips` package's `alexnet` slices do.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from puma_jax.models import layers
from puma_jax.models.base import ModelConfig

# torchvision index -> (kernel, stride, padding); widths come from the config.
CONV_INDICES = (0, 3, 6, 8, 10)
_GEOMETRY = {0: (11, 4, 2), 3: (5, 1, 2), 6: (3, 1, 1), 8: (3, 1, 1), 10: (3, 1, 1)}
# Smallest input whose relu5 map is non-empty (conv 11/4 -> pool -> pool leaves 1x1 at 31).
MIN_SIZE = 31


@dataclasses.dataclass(frozen=True)
class AlexNetConfig(ModelConfig):
  widths: tuple = (64, 192, 384, 256, 256)
  num_channels: int = 3

  def __post_init__(self):
    if len(self.widths) != 5 or any(int(w) <= 0 for w in self.widths):
      raise ValueError(f"AlexNetConfig: widths={self.widths} must be 5 positive channel counts")


def max_pool(x: jax.Array, window: int = 3, stride: int = 2) -> jax.Array:
  """torch MaxPool2d(window, stride), no padding, floor mode."""
  return jax.lax.reduce_window(
    x, -jnp.inf, jax.lax.max, (1, window, window, 1), (1, stride, stride, 1), "VALID"
  )


class AlexNetFeatures(nnx.Module):
  """`model(x)` -> torchvision `features(x)` (after the last max-pool); `model.taps(x)` -> the
  five ReLU outputs. Inputs NHWC, normalized as the caller's reference expects (ImageNet mean/std
  for torchvision classification, LPIPS's scaling layer for LPIPS)."""

  def __init__(
    self,
    config: AlexNetConfig = AlexNetConfig(),
    *,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    self.config = config
    c_in = config.num_channels
    for idx, width in zip(CONV_INDICES, config.widths):
      k, s, p = _GEOMETRY[idx]
      setattr(
        self,
        f"features_{idx}",
        layers.Conv(
          c_in, width, k, strides=s, padding=p, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        ),
      )
      c_in = width

  def taps(self, x: jax.Array) -> list[jax.Array]:
    if x.ndim != 4 or x.shape[-1] != self.config.num_channels:
      raise ValueError(
        f"AlexNet input must be NHWC with {self.config.num_channels} channels; got "
        f"shape {tuple(x.shape)}"
      )
    if min(x.shape[1:3]) < MIN_SIZE:
      raise ValueError(
        f"AlexNet input must be at least {MIN_SIZE}x{MIN_SIZE}; got {x.shape[1]}x{x.shape[2]}"
      )
    out = []
    for idx in CONV_INDICES:
      if idx in (3, 6):  # the pools of features.2 and features.5 precede these convolutions
        x = max_pool(x)
      x = jax.nn.relu(getattr(self, f"features_{idx}")(x))
      out.append(x)
    return out

  def __call__(self, x: jax.Array) -> jax.Array:
    return max_pool(self.taps(x)[-1])

"""LPIPS (Zhang et al. 2018), v0.1 with the AlexNet trunk, as the `lpips` package computes it.

  d(x0, x1) = sum_l mean_hw( w_l . (n(f_l(s(x0))) - n(f_l(s(x1))))^2 )

s: the scaling layer ((x - shift) / scale, constants below, inputs in [-1, 1]); f_l: AlexNet's
ReLU outputs relu1..relu5; n: division by the channel L2 norm (+1e-10, as `normalize_tensor`);
w_l: the learned non-negative 1x1 linear heads (`lin0..lin4`, no bias). Dropout in the heads is
inactive at evaluation and has no parameters.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from puma_jax.models import layers
from puma_jax.models.alexnet import AlexNetConfig, AlexNetFeatures
from puma_jax.models.base import ModelConfig

SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
NORM_EPS = 1e-10


@dataclasses.dataclass(frozen=True)
class LPIPSConfig(ModelConfig):
  net: str = "alex"
  version: str = "0.1"
  widths: tuple = (64, 192, 384, 256, 256)

  def __post_init__(self):
    if self.net != "alex":
      raise ValueError(f"LPIPSConfig: net={self.net!r} is not supported (only 'alex')")
    if self.version != "0.1":
      raise ValueError(f"LPIPSConfig: version={self.version!r} is not supported (only '0.1')")


def _unit_normalize(f: jax.Array) -> jax.Array:
  f = f.astype(jnp.float32)
  return f / (jnp.sqrt(jnp.sum(jnp.square(f), axis=-1, keepdims=True)) + NORM_EPS)


class LPIPS(nnx.Module):
  """`model(x0, x1)` with NHWC images in [-1, 1] -> distances (B,); `per_layer=True` -> (B, 5)."""

  def __init__(
    self,
    config: LPIPSConfig = LPIPSConfig(),
    *,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    self.config = config
    self.net = AlexNetFeatures(
      AlexNetConfig(widths=tuple(config.widths)), dtype=dtype, param_dtype=param_dtype, rngs=rngs
    )
    # Non-negative like the trained heads, so random-init models give meaningful distances.
    init = nnx.initializers.uniform(0.1)
    self.lins = nnx.List(
      [
        layers.Dense(
          w,
          1,
          axes=("conv_in", None),
          use_bias=False,
          dtype=dtype,
          param_dtype=param_dtype,
          kernel_init=init,
          rngs=rngs,
        )
        for w in config.widths
      ]
    )

  def scale(self, x: jax.Array) -> jax.Array:
    return (x.astype(jnp.float32) - jnp.asarray(SHIFT)) / jnp.asarray(SCALE)

  def __call__(self, x0: jax.Array, x1: jax.Array, *, per_layer: bool = False) -> jax.Array:
    if x0.shape != x1.shape:
      raise ValueError(
        f"LPIPS inputs must have the same shape; got {tuple(x0.shape)} and {tuple(x1.shape)}"
      )
    b = x0.shape[0]
    # One trunk pass over both images halves the number of kernel launches.
    feats = self.net.taps(self.scale(jnp.concatenate([x0, x1], axis=0)))
    res = []
    for f, lin in zip(feats, self.lins):
      f = _unit_normalize(f)
      diff = jnp.square(f[:b] - f[b:])
      res.append(lin(diff)[..., 0].astype(jnp.float32).mean(axis=(1, 2)))
    res = jnp.stack(res, axis=-1)
    return res if per_layer else res.sum(-1)

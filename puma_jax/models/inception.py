"""The FID Inception-v3 (pytorch-fid's `FIDInceptionV3`, TF 2015-12-05 weights) in NHWC.

The network that FID numbers are defined with is TensorFlow's 2015 Inception graph. pytorch-fid
ports it as torchvision's `Inception3` with four block types patched (`FIDInceptionA`, `C`,
`E_1`, `E_2`): their average-pool branches exclude padding from the mean
(`count_include_pad=False`), and the last block (`Mixed_7c`) max-pools its pool branch. Our
module names are those of the weight file `pt_inception-2015-12-05-*.pth` (`Mixed_5b.branch1x1
.conv.weight` -> `Mixed_5b.branch1x1.conv.kernel`), so conversion is one-to-one.

`model(x)` -> the 2048-d pool3 features (B, 2048) for NHWC inputs in [-1, 1] at any size >= 75
(pytorch-fid resizes to 299 first: see `puma_jax.evaluation.fid.inception_features`). Batch-norm
statistics are stored as parameters (`bn.mean`, `bn.var`) because they are weights of the
checkpoint and the model is inference-only. The 1008-way `fc` head is not used by FID and not
built.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from puma_jax.models import layers
from puma_jax.models.alexnet import max_pool
from puma_jax.models.base import ModelConfig

BN_EPS = 1e-3
MIN_SIZE = 75  # smallest input whose feature map survives the five stride-2 stages


@dataclasses.dataclass(frozen=True)
class InceptionConfig(ModelConfig):
  image_size: int = 299  # what pytorch-fid resizes every input to before the network
  num_channels: int = 3

  def __post_init__(self):
    if self.image_size < MIN_SIZE:
      raise ValueError(
        f"InceptionConfig: image_size={self.image_size} < {MIN_SIZE}, the "
        "smallest size the network accepts"
      )


class BatchNorm(nnx.Module):
  """Inference batch norm with stored running statistics (all four are checkpoint tensors)."""

  def __init__(self, features: int, *, param_dtype=jnp.float32):
    mk = lambda init: layers.param(None, init, (features,), ("norm",), param_dtype)
    self.scale, self.bias = mk(nnx.initializers.ones), mk(nnx.initializers.zeros)
    self.mean, self.var = mk(nnx.initializers.zeros), mk(nnx.initializers.ones)

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    inv = jax.lax.rsqrt(self.var[...].astype(jnp.float32) + BN_EPS) * self.scale[...]
    return ((x32 - self.mean[...]) * inv + self.bias[...]).astype(x.dtype)


def _pair(v):
  return (v, v) if isinstance(v, int) else tuple(v)


class BasicConv2d(nnx.Module):
  """conv (no bias) -> BN(eps 1e-3) -> ReLU."""

  def __init__(self, c_in, c_out, kernel, *, stride=1, padding=0, dtype, param_dtype, rngs):
    ph, pw = _pair(padding)
    self.conv = layers.Conv(
      c_in,
      c_out,
      _pair(kernel),
      strides=stride,
      padding=((ph, ph), (pw, pw)),
      use_bias=False,
      dtype=dtype,
      param_dtype=param_dtype,
      rngs=rngs,
    )
    self.bn = BatchNorm(c_out, param_dtype=param_dtype)

  def __call__(self, x):
    return jax.nn.relu(self.bn(self.conv(x)))


def avg_pool_3x3_exclude_pad(x: jax.Array) -> jax.Array:
  """avg_pool2d(3, stride 1, padding 1, count_include_pad=False)."""
  pad = ((0, 0), (1, 1), (1, 1), (0, 0))
  win, strides = (1, 3, 3, 1), (1, 1, 1, 1)
  total = jax.lax.reduce_window(x, 0.0, jax.lax.add, win, strides, pad)
  ones = jnp.ones((1,) + x.shape[1:3] + (1,), x.dtype)
  count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, win, strides, pad)
  return total / count


def max_pool_3x3_same(x: jax.Array) -> jax.Array:
  """max_pool2d(3, stride 1, padding 1) (pads with -inf, as torch does)."""
  return jax.lax.reduce_window(
    x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 1, 1, 1), ((0, 0), (1, 1), (1, 1), (0, 0))
  )


class _Block(nnx.Module):
  def _conv(self, kw, name, c_in, c_out, kernel, **geom):
    setattr(self, name, BasicConv2d(c_in, c_out, kernel, **geom, **kw))


class InceptionA(_Block):  # FIDInceptionA: Mixed_5b/5c/5d
  def __init__(self, c_in, pool_features, **kw):
    self._conv(kw, "branch1x1", c_in, 64, 1)
    self._conv(kw, "branch5x5_1", c_in, 48, 1)
    self._conv(kw, "branch5x5_2", 48, 64, 5, padding=2)
    self._conv(kw, "branch3x3dbl_1", c_in, 64, 1)
    self._conv(kw, "branch3x3dbl_2", 64, 96, 3, padding=1)
    self._conv(kw, "branch3x3dbl_3", 96, 96, 3, padding=1)
    self._conv(kw, "branch_pool", c_in, pool_features, 1)

  def __call__(self, x):
    b1 = self.branch1x1(x)
    b5 = self.branch5x5_2(self.branch5x5_1(x))
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    bp = self.branch_pool(avg_pool_3x3_exclude_pad(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(_Block):  # Mixed_6a (grid reduction 35 -> 17)
  def __init__(self, c_in, **kw):
    self._conv(kw, "branch3x3", c_in, 384, 3, stride=2)
    self._conv(kw, "branch3x3dbl_1", c_in, 64, 1)
    self._conv(kw, "branch3x3dbl_2", 64, 96, 3, padding=1)
    self._conv(kw, "branch3x3dbl_3", 96, 96, 3, stride=2)

  def __call__(self, x):
    b3 = self.branch3x3(x)
    bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    return jnp.concatenate([b3, bd, max_pool(x)], axis=-1)


class InceptionC(_Block):  # FIDInceptionC: Mixed_6b..6e
  def __init__(self, c_in, c7, **kw):
    self._conv(kw, "branch1x1", c_in, 192, 1)
    self._conv(kw, "branch7x7_1", c_in, c7, 1)
    self._conv(kw, "branch7x7_2", c7, c7, (1, 7), padding=(0, 3))
    self._conv(kw, "branch7x7_3", c7, 192, (7, 1), padding=(3, 0))
    self._conv(kw, "branch7x7dbl_1", c_in, c7, 1)
    self._conv(kw, "branch7x7dbl_2", c7, c7, (7, 1), padding=(3, 0))
    self._conv(kw, "branch7x7dbl_3", c7, c7, (1, 7), padding=(0, 3))
    self._conv(kw, "branch7x7dbl_4", c7, c7, (7, 1), padding=(3, 0))
    self._conv(kw, "branch7x7dbl_5", c7, 192, (1, 7), padding=(0, 3))
    self._conv(kw, "branch_pool", c_in, 192, 1)

  def __call__(self, x):
    b1 = self.branch1x1(x)
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    bd = x
    for i in range(1, 6):
      bd = getattr(self, f"branch7x7dbl_{i}")(bd)
    bp = self.branch_pool(avg_pool_3x3_exclude_pad(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(_Block):  # Mixed_7a (grid reduction 17 -> 8)
  def __init__(self, c_in, **kw):
    self._conv(kw, "branch3x3_1", c_in, 192, 1)
    self._conv(kw, "branch3x3_2", 192, 320, 3, stride=2)
    self._conv(kw, "branch7x7x3_1", c_in, 192, 1)
    self._conv(kw, "branch7x7x3_2", 192, 192, (1, 7), padding=(0, 3))
    self._conv(kw, "branch7x7x3_3", 192, 192, (7, 1), padding=(3, 0))
    self._conv(kw, "branch7x7x3_4", 192, 192, 3, stride=2)

  def __call__(self, x):
    b3 = self.branch3x3_2(self.branch3x3_1(x))
    b7 = x
    for i in range(1, 5):
      b7 = getattr(self, f"branch7x7x3_{i}")(b7)
    return jnp.concatenate([b3, b7, max_pool(x)], axis=-1)


class InceptionE(_Block):  # FIDInceptionE_1 (Mixed_7b: avg pool) / E_2 (Mixed_7c: max pool)
  def __init__(self, c_in, *, max_pool_branch: bool, **kw):
    self.max_pool_branch = max_pool_branch
    self._conv(kw, "branch1x1", c_in, 320, 1)
    self._conv(kw, "branch3x3_1", c_in, 384, 1)
    self._conv(kw, "branch3x3_2a", 384, 384, (1, 3), padding=(0, 1))
    self._conv(kw, "branch3x3_2b", 384, 384, (3, 1), padding=(1, 0))
    self._conv(kw, "branch3x3dbl_1", c_in, 448, 1)
    self._conv(kw, "branch3x3dbl_2", 448, 384, 3, padding=1)
    self._conv(kw, "branch3x3dbl_3a", 384, 384, (1, 3), padding=(0, 1))
    self._conv(kw, "branch3x3dbl_3b", 384, 384, (3, 1), padding=(1, 0))
    self._conv(kw, "branch_pool", c_in, 192, 1)

  def __call__(self, x):
    b1 = self.branch1x1(x)
    b3 = self.branch3x3_1(x)
    b3 = jnp.concatenate([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], axis=-1)
    bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    bd = jnp.concatenate([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], axis=-1)
    pooled = max_pool_3x3_same(x) if self.max_pool_branch else avg_pool_3x3_exclude_pad(x)
    return jnp.concatenate([b1, b3, bd, self.branch_pool(pooled)], axis=-1)


class FIDInceptionV3(nnx.Module):
  """`model(x)`: NHWC in [-1, 1] (at least 75x75) -> pool3 features (B, 2048), float32."""

  def __init__(
    self,
    config: InceptionConfig = InceptionConfig(),
    *,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    self.config = config
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.Conv2d_1a_3x3 = BasicConv2d(config.num_channels, 32, 3, stride=2, **kw)
    self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3, **kw)
    self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1, **kw)
    self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1, **kw)
    self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3, **kw)
    self.Mixed_5b = InceptionA(192, 32, **kw)
    self.Mixed_5c = InceptionA(256, 64, **kw)
    self.Mixed_5d = InceptionA(288, 64, **kw)
    self.Mixed_6a = InceptionB(288, **kw)
    self.Mixed_6b = InceptionC(768, 128, **kw)
    self.Mixed_6c = InceptionC(768, 160, **kw)
    self.Mixed_6d = InceptionC(768, 160, **kw)
    self.Mixed_6e = InceptionC(768, 192, **kw)
    self.Mixed_7a = InceptionD(768, **kw)
    self.Mixed_7b = InceptionE(1280, max_pool_branch=False, **kw)
    self.Mixed_7c = InceptionE(2048, max_pool_branch=True, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    if x.ndim != 4 or x.shape[-1] != c.num_channels:
      raise ValueError(
        f"Inception input must be NHWC with {c.num_channels} channels; got shape {tuple(x.shape)}"
      )
    if min(x.shape[1:3]) < MIN_SIZE:
      raise ValueError(
        f"Inception input must be at least {MIN_SIZE}x{MIN_SIZE}; got "
        f"{x.shape[1]}x{x.shape[2]} (resize to {c.image_size} first)"
      )
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = max_pool(x)
    x = max_pool(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)))
    for name in (
      "Mixed_5b",
      "Mixed_5c",
      "Mixed_5d",
      "Mixed_6a",
      "Mixed_6b",
      "Mixed_6c",
      "Mixed_6d",
      "Mixed_6e",
      "Mixed_7a",
      "Mixed_7b",
      "Mixed_7c",
    ):
      x = getattr(self, name)(x)
    return x.astype(jnp.float32).mean(axis=(1, 2))

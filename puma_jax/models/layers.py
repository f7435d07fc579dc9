"""Building blocks shared by every model family.

Each parameter is an `nnx.Param` with `logical_axes` metadata (see `puma_jax.sharding`). Parameter
names follow the Flax convention (`kernel`, `bias`, `scale`, `embedding`) so that conversion
tables read the same across families. Layers take a compute `dtype` (activations and matmul
inputs) and a `param_dtype` (stored weights); normalizations and softmax run in float32.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from puma_jax import sharding

Initializer = Callable[..., jax.Array]

default_kernel_init = nnx.initializers.lecun_normal()


def param(rngs: nnx.Rngs | None, init: Initializer, shape: Sequence[int],
          axes: Sequence[str | None], dtype=jnp.float32) -> nnx.Param:
  """A parameter with logical axis names; `rngs` may be None for deterministic initializers."""
  if len(axes) != len(shape):
    raise ValueError(f"param: {len(axes)} axis names {tuple(axes)} for shape {tuple(shape)}")
  key = rngs.params() if rngs is not None else jax.random.key(0)
  return nnx.Param(init(key, tuple(shape), dtype), logical_axes=tuple(axes))


class Dense(nnx.Module):
  """y = x @ kernel + bias over the last axis; kernel is (in, out)."""

  def __init__(self, in_features: int, out_features: int, *, axes=("embed", "mlp"),
               use_bias: bool = True, dtype=jnp.float32, param_dtype=jnp.float32,
               kernel_init: Initializer = default_kernel_init, rngs: nnx.Rngs):
    self.in_features, self.out_features = in_features, out_features
    self.dtype = dtype
    self.kernel = param(rngs, kernel_init, (in_features, out_features), axes, param_dtype)
    self.bias = (param(None, nnx.initializers.zeros, (out_features,), (axes[1],), param_dtype)
                 if use_bias else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    if x.shape[-1] != self.in_features:
      raise ValueError(f"Dense: input width {x.shape[-1]} != in_features {self.in_features}")
    y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype),
                preferred_element_type=self.dtype)
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


class Conv(nnx.Module):
  """2-D convolution, NHWC, kernel (kh, kw, in, out) (PyTorch's is (out, in, kh, kw))."""

  def __init__(self, in_features: int, out_features: int, kernel_size: int | Sequence[int] = 3, *,
               strides: int | Sequence[int] = 1, padding: int | str = "SAME", use_bias: bool = True,
               dtype=jnp.float32, param_dtype=jnp.float32,
               kernel_init: Initializer = default_kernel_init, rngs: nnx.Rngs):
    ks = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
    self.strides = (strides, strides) if isinstance(strides, int) else tuple(strides)
    self.padding = ((padding, padding), (padding, padding)) if isinstance(padding, int) else padding
    self.in_features, self.out_features = in_features, out_features
    self.dtype = dtype
    self.kernel = param(rngs, kernel_init, ks + (in_features, out_features),
                        (None, None, "conv_in", "conv_out"), param_dtype)
    self.bias = (param(None, nnx.initializers.zeros, (out_features,), ("conv_out",), param_dtype)
                 if use_bias else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    if x.ndim != 4 or x.shape[-1] != self.in_features:
      raise ValueError(f"Conv: expected NHWC input with {self.in_features} channels, "
                       f"got shape {x.shape}")
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), self.kernel[...].astype(self.dtype), self.strides, self.padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"), preferred_element_type=self.dtype)
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


class Embed(nnx.Module):
  """Lookup table (num_embeddings, features)."""

  def __init__(self, num_embeddings: int, features: int, *, axes=("vocab", "embed"),
               dtype=jnp.float32, param_dtype=jnp.float32,
               embedding_init: Initializer = nnx.initializers.normal(0.02), rngs: nnx.Rngs):
    self.num_embeddings, self.features, self.dtype = num_embeddings, features, dtype
    self.embedding = param(rngs, embedding_init, (num_embeddings, features), axes, param_dtype)

  def __call__(self, ids: jax.Array) -> jax.Array:
    return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)

  def attend(self, x: jax.Array) -> jax.Array:
    """Tied output projection: x @ embedding.T."""
    return jnp.dot(x.astype(self.dtype), self.embedding[...].astype(self.dtype).T,
                   preferred_element_type=self.dtype)


class LayerNorm(nnx.Module):
  """LayerNorm over the last axis, statistics in float32."""

  def __init__(self, features: int, *, eps: float = 1e-5, use_bias: bool = True,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
    self.eps, self.dtype = eps, dtype
    self.scale = param(None, nnx.initializers.ones, (features,), ("norm",), param_dtype)
    self.bias = (param(None, nnx.initializers.zeros, (features,), ("norm",), param_dtype)
                 if use_bias else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...].astype(jnp.float32)
    if self.bias is not None:
      y = y + self.bias[...].astype(jnp.float32)
    return y.astype(self.dtype)


class RMSNorm(nnx.Module):
  """RMSNorm (LLaMA): x / rms(x) * scale, computed in float32 like HF."""

  def __init__(self, features: int, *, eps: float = 1e-6, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
    self.eps, self.dtype = eps, dtype
    self.scale = param(None, nnx.initializers.ones, (features,), ("norm",), param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + self.eps)
    return (y.astype(self.dtype) * self.scale[...].astype(self.dtype)).astype(self.dtype)


class GroupNorm(nnx.Module):
  """GroupNorm over NHWC (channels last), statistics in float32."""

  def __init__(self, num_groups: int, features: int, *, eps: float = 1e-5, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
    if features % num_groups:
      raise ValueError(f"GroupNorm: {features} channels not divisible by {num_groups} groups")
    self.num_groups, self.eps, self.dtype = num_groups, eps, dtype
    self.scale = param(None, nnx.initializers.ones, (features,), ("norm",), param_dtype)
    self.bias = param(None, nnx.initializers.zeros, (features,), ("norm",), param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    shape = x.shape
    g = self.num_groups
    x32 = x.astype(jnp.float32).reshape(shape[0], -1, g, shape[-1] // g)
    mean = x32.mean(axis=(1, 3), keepdims=True)
    var = jnp.square(x32 - mean).mean(axis=(1, 3), keepdims=True)
    y = ((x32 - mean) * jax.lax.rsqrt(var + self.eps)).reshape(shape)
    y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(self.dtype)


def quick_gelu(x):
  return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": quick_gelu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "relu": jax.nn.relu,
}


def activation(name: str, field: str = "hidden_act") -> Callable[[jax.Array], jax.Array]:
  if name not in ACTIVATIONS:
    raise ValueError(f"unsupported {field}={name!r}; supported: {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[name]


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array | None = None,
              bias: jax.Array | None = None, is_causal: bool = False,
              scale: float | None = None) -> jax.Array:
  """Multi-head attention on (B, T, H, D) inputs through `jax.nn.dot_product_attention`.

  K/V may have fewer heads than Q (grouped-query attention). On GPU this dispatches to the
  fused cuDNN kernel when shapes and dtypes allow; elsewhere the XLA path, whose softmax runs in
  float32.
  """
  dtype = q.dtype
  return jax.nn.dot_product_attention(q, k.astype(dtype), v.astype(dtype), bias=bias, mask=mask,
                                      is_causal=is_causal, scale=scale)


# ----------------------------------------------------------------------------------------------
# The pre-LN transformer encoder layer of the ViT family (CLIP vision and text towers, DINO's
# ViT). One implementation; each family keeps its checkpoint layout's attribute names, which are
# the parameter paths the conversion tables address.


class BlockNames(NamedTuple):
  norm1: str  # layer norm before attention
  attn: str  # the attention module
  out_proj: str  # attention output projection, inside `attn`
  norm2: str  # layer norm before the MLP


class SelfAttention(nnx.Module):
  """Multi-head self-attention with q/k/v/out projections (B, T, D) -> (B, T, D)."""

  def __init__(self, dim: int, num_heads: int, *, qkv_bias: bool = True,
               out_name: str = "out_proj", dtype, param_dtype, rngs: nnx.Rngs):
    self.num_heads, self.out_name = num_heads, out_name
    mk = lambda axes, bias: Dense(dim, dim, axes=axes, use_bias=bias, dtype=dtype,
                                  param_dtype=param_dtype, rngs=rngs)
    self.q_proj = mk(("embed", "heads"), qkv_bias)
    self.k_proj = mk(("embed", "heads"), qkv_bias)
    self.v_proj = mk(("embed", "heads"), qkv_bias)
    setattr(self, out_name, mk(("heads", "embed"), True))

  def __call__(self, x, mask=None):
    b, t, d = x.shape
    split = lambda y: sharding.constrain(y.reshape(b, t, self.num_heads, d // self.num_heads),
                                         ("batch", "act_seq", "act_heads", None))
    o = attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)),
                  mask=mask)
    return getattr(self, self.out_name)(o.reshape(b, t, d))


class MLP(nnx.Module):
  """fc1 -> activation -> fc2."""

  def __init__(self, dim: int, hidden: int, act: str, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.act = activation(act)
    self.fc1 = Dense(dim, hidden, axes=("embed", "mlp"), dtype=dtype, param_dtype=param_dtype,
                     rngs=rngs)
    self.fc2 = Dense(hidden, dim, axes=("mlp", "embed"), dtype=dtype, param_dtype=param_dtype,
                     rngs=rngs)

  def __call__(self, x):
    return self.fc2(sharding.constrain(self.act(self.fc1(x)), ("batch", "act_seq", "act_mlp")))


class EncoderLayer(nnx.Module):
  """x + attn(norm1(x)), then x + mlp(norm2(x)). `cfg` needs hidden_size, intermediate_size,
  num_attention_heads, hidden_act and layer_norm_eps (a CLIP or ViT config)."""

  def __init__(self, cfg, names: BlockNames, *, qkv_bias: bool = True, dtype, param_dtype,
               rngs: nnx.Rngs):
    self.names = names
    d = cfg.hidden_size
    ln = lambda: LayerNorm(d, eps=cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype)
    setattr(self, names.norm1, ln())
    setattr(self, names.attn, SelfAttention(d, cfg.num_attention_heads, qkv_bias=qkv_bias,
                                            out_name=names.out_proj, dtype=dtype,
                                            param_dtype=param_dtype, rngs=rngs))
    setattr(self, names.norm2, ln())
    self.mlp = MLP(d, cfg.intermediate_size, cfg.hidden_act, dtype=dtype,
                   param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x, mask=None):
    n = self.names
    x = x + getattr(self, n.attn)(getattr(self, n.norm1)(x), mask=mask)
    x = x + self.mlp(getattr(self, n.norm2)(x))
    return sharding.constrain(x, ("batch", "act_seq", "act_embed"))

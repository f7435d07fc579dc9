"""Building blocks shared by every model family.

Each parameter is an `nnx.Param` with `logical_axes` metadata (see `puma_jax.sharding`). Parameter
names follow the Flax convention (`kernel`, `bias`, `scale`, `embedding`) so that conversion
tables read the same across families. Layers take a compute `dtype` (activations and matmul
inputs) and a `param_dtype` (stored weights); normalizations and softmax run in float32.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from absl import logging
from flax import nnx

from puma_jax import sharding

Initializer = Callable[..., jax.Array]

default_kernel_init = nnx.initializers.lecun_normal()


def param(
  rngs: nnx.Rngs | None,
  init: Initializer,
  shape: Sequence[int],
  axes: Sequence[str | None],
  dtype=jnp.float32,
) -> nnx.Param:
  """A parameter with logical axis names; `rngs` may be None for deterministic initializers."""
  if len(axes) != len(shape):
    raise ValueError(f"param: {len(axes)} axis names {tuple(axes)} for shape {tuple(shape)}")
  key = rngs.params() if rngs is not None else jax.random.key(0)
  return nnx.Param(init(key, tuple(shape), dtype), logical_axes=tuple(axes))


class Dense(nnx.Module):
  """y = x @ kernel + bias over the last axis; kernel is (in, out)."""

  def __init__(
    self,
    in_features: int,
    out_features: int,
    *,
    axes=("embed", "mlp"),
    use_bias: bool = True,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    kernel_init: Initializer = default_kernel_init,
    rngs: nnx.Rngs,
  ):
    self.in_features, self.out_features = in_features, out_features
    self.dtype = dtype
    self.kernel = param(rngs, kernel_init, (in_features, out_features), axes, param_dtype)
    self.bias = (
      param(None, nnx.initializers.zeros, (out_features,), (axes[1],), param_dtype)
      if use_bias
      else None
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    if x.shape[-1] != self.in_features:
      raise ValueError(f"Dense: input width {x.shape[-1]} != in_features {self.in_features}")
    y = jnp.dot(
      x.astype(self.dtype), self.kernel[...].astype(self.dtype), preferred_element_type=self.dtype
    )
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


class Conv(nnx.Module):
  """2-D convolution, NHWC, kernel (kh, kw, in, out) (PyTorch's is (out, in, kh, kw))."""

  def __init__(
    self,
    in_features: int,
    out_features: int,
    kernel_size: int | Sequence[int] = 3,
    *,
    strides: int | Sequence[int] = 1,
    padding: int | str = "SAME",
    use_bias: bool = True,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    kernel_init: Initializer = default_kernel_init,
    rngs: nnx.Rngs,
  ):
    ks = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
    self.strides = (strides, strides) if isinstance(strides, int) else tuple(strides)
    self.padding = ((padding, padding), (padding, padding)) if isinstance(padding, int) else padding
    self.in_features, self.out_features = in_features, out_features
    self.dtype = dtype
    self.kernel = param(
      rngs,
      kernel_init,
      ks + (in_features, out_features),
      (None, None, "conv_in", "conv_out"),
      param_dtype,
    )
    self.bias = (
      param(None, nnx.initializers.zeros, (out_features,), ("conv_out",), param_dtype)
      if use_bias
      else None
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    if x.ndim != 4 or x.shape[-1] != self.in_features:
      raise ValueError(
        f"Conv: expected NHWC input with {self.in_features} channels, got shape {x.shape}"
      )
    y = jax.lax.conv_general_dilated(
      x.astype(self.dtype),
      self.kernel[...].astype(self.dtype),
      self.strides,
      self.padding,
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      preferred_element_type=self.dtype,
    )
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


class Embed(nnx.Module):
  """Lookup table (num_embeddings, features)."""

  def __init__(
    self,
    num_embeddings: int,
    features: int,
    *,
    axes=("vocab", "embed"),
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    embedding_init: Initializer = nnx.initializers.normal(0.02),
    rngs: nnx.Rngs,
  ):
    self.num_embeddings, self.features, self.dtype = num_embeddings, features, dtype
    self.embedding = param(rngs, embedding_init, (num_embeddings, features), axes, param_dtype)

  def __call__(self, ids: jax.Array) -> jax.Array:
    return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)

  def attend(self, x: jax.Array) -> jax.Array:
    """Tied output projection: x @ embedding.T."""
    return jnp.dot(
      x.astype(self.dtype),
      self.embedding[...].astype(self.dtype).T,
      preferred_element_type=self.dtype,
    )


class LayerNorm(nnx.Module):
  """LayerNorm over the last axis, statistics in float32."""

  def __init__(
    self,
    features: int,
    *,
    eps: float = 1e-5,
    use_bias: bool = True,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs | None = None,
  ):
    self.eps, self.dtype = eps, dtype
    self.scale = param(None, nnx.initializers.ones, (features,), ("norm",), param_dtype)
    self.bias = (
      param(None, nnx.initializers.zeros, (features,), ("norm",), param_dtype) if use_bias else None
    )

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

  def __init__(
    self,
    features: int,
    *,
    eps: float = 1e-6,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs | None = None,
  ):
    self.eps, self.dtype = eps, dtype
    self.scale = param(None, nnx.initializers.ones, (features,), ("norm",), param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + self.eps)
    return (y.astype(self.dtype) * self.scale[...].astype(self.dtype)).astype(self.dtype)


class GroupNorm(nnx.Module):
  """GroupNorm over NHWC (channels last), statistics in float32."""

  def __init__(
    self,
    num_groups: int,
    features: int,
    *,
    eps: float = 1e-5,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs | None = None,
  ):
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


# ----------------------------------------------------------------------------------------------
# Attention: one entry point, a kernel per platform

ATTENTION_IMPLS = ("auto", "xla", "cudnn", "splash")
# The implementation `attention` uses, read at trace time. A run sets it once from its config
# (`set_attention_impl`) or for a region (`with attention_impl("xla"): ...`); it is not a layer
# argument so that no model signature carries it. "auto": cuDNN flash attention on GPUs of
# compute capability >= 8 in 16-bit dtypes, splash attention (Pallas) on TPU, XLA elsewhere.
_ATTENTION_IMPL = contextvars.ContextVar("attention_impl", default="auto")
# cuDNN's fused kernels take head dims that are multiples of 8 up to 128 (256 on Hopper and
# later, which jax checks itself); beyond that (the VAE mid-block's 512) we use XLA.
_CUDNN_MAX_HEAD_DIM = 128
_SPLASH_BLOCK = 128
_fallbacks_logged: set = set()


def set_attention_impl(name: str) -> None:
  """Sets the attention implementation for this context (see `ATTENTION_IMPLS`)."""
  if name not in ATTENTION_IMPLS:
    raise ValueError(f"attention implementation {name!r}: choose from {ATTENTION_IMPLS}")
  _ATTENTION_IMPL.set(name)


@contextlib.contextmanager
def attention_impl(name: str):
  """`with attention_impl("xla"): ...` traces the attention inside with that implementation."""
  if name not in ATTENTION_IMPLS:
    raise ValueError(f"attention implementation {name!r}: choose from {ATTENTION_IMPLS}")
  token = _ATTENTION_IMPL.set(name)
  try:
    yield
  finally:
    _ATTENTION_IMPL.reset(token)


def _fallback(impl: str, why: str) -> str:
  if (impl, why) not in _fallbacks_logged:
    _fallbacks_logged.add((impl, why))
    logging.info("attention: %s cannot run here (%s); using XLA", impl, why)
  return "xla"


def choose_attention(q: jax.Array, k: jax.Array, *, mask=None, bias=None, device=None) -> str:
  """The implementation `attention` uses for these inputs: the setting, resolved for the
  platform, with explicit XLA fallbacks for what a kernel cannot take."""
  impl = _ATTENTION_IMPL.get()
  device = device if device is not None else jax.devices()[0]
  platform = device.platform
  if impl == "auto":
    cc = getattr(device, "compute_capability", None)
    if platform in ("gpu", "cuda") and cc is not None and float(cc) >= 8.0:
      impl = "cudnn"
    elif platform == "tpu":
      impl = "splash"
    else:
      return "xla"
  d = q.shape[-1]
  if impl == "cudnn":
    if platform not in ("gpu", "cuda"):
      raise ValueError(f"attention_impl=cudnn needs an NVIDIA GPU; this device is {platform}")
    if q.dtype not in (jnp.bfloat16, jnp.float16):
      return _fallback(impl, f"dtype {q.dtype}: cuDNN flash attention is 16-bit only")
    if d % 8 or d > _CUDNN_MAX_HEAD_DIM:
      return _fallback(impl, f"head dim {d}")
  if impl == "splash":
    if platform != "tpu" and not _SPLASH_INTERPRET.get():
      raise ValueError(f"attention_impl=splash needs a TPU; this device is {platform}")
    if mask is not None or bias is not None:
      return _fallback(impl, "an explicit mask/bias (splash takes causal + segment ids)")
    if q.shape[1] != k.shape[1] or q.shape[1] % _SPLASH_BLOCK:
      return _fallback(
        impl, f"lengths {q.shape[1]}/{k.shape[1]} (need equal multiples of {_SPLASH_BLOCK})"
      )
  return impl


# Runs the splash kernel in Pallas interpret mode (CPU): the parity tests' switch.
_SPLASH_INTERPRET = contextvars.ContextVar("splash_interpret", default=False)


@functools.lru_cache(maxsize=32)
def _splash_kernel(t: int, heads: int, causal: bool, interpret: bool):
  from jax.experimental.pallas.ops.tpu import splash_attention as sa

  one = sa.CausalMask((t, t)) if causal else sa.FullMask((t, t))
  b = min(_SPLASH_BLOCK, t)
  blocks = sa.BlockSizes(
    block_q=b,
    block_kv=b,
    block_kv_compute=b,
    block_q_dkv=b,
    block_kv_dkv=b,
    block_kv_dkv_compute=b,
    block_q_dq=b,
    block_kv_dq=b,
  )
  # The kernel holds its mask tables as arrays; built under a trace (and cached) they would be
  # leaked tracers, so they are made concrete.
  with jax.ensure_compile_time_eval():
    return sa.make_splash_mha(
      sa.MultiHeadMask([one] * heads),
      block_sizes=blocks,
      head_shards=1,
      q_seq_shards=1,
      interpret=interpret,
    )


def _splash_local(q, k, v, seg, *, is_causal, scale):
  from jax.experimental.pallas.ops.tpu import splash_attention as sa

  _, t, h, _ = q.shape
  kernel = _splash_kernel(t, h, bool(is_causal), bool(_SPLASH_INTERPRET.get()))

  def one(q, k, v, s):  # (T, H, D) -> the kernel's (H, T, D); grouped K/V heads are native
    o = kernel(
      jnp.swapaxes(q * jnp.asarray(scale, q.dtype), 0, 1),
      jnp.swapaxes(k, 0, 1),
      jnp.swapaxes(v, 0, 1),
      segment_ids=sa.SegmentIds(s, s),
    )
    return jnp.swapaxes(o, 0, 1)

  return jax.vmap(one)(q, k, v, seg)


def _splash(q, k, v, segment_ids, is_causal, scale):
  """Splash attention; under a multi-device mesh (`sharding.use_mesh`) inside `shard_map`, as
  XLA cannot partition a Pallas kernel: rows split like the batch, heads like the (kv) heads
  when query and key/value heads split alike (so each shard keeps its own GQA groups), and the
  sequence whole on every shard."""
  b, t, _, d = q.shape
  seg = jnp.ones((b, t), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
  fn = functools.partial(
    _splash_local, is_causal=is_causal, scale=(1.0 / float(d) ** 0.5) if scale is None else scale
  )
  ctx = sharding.current()
  if ctx is None or ctx[0].size == 1:
    return fn(q, k, v, seg)
  mesh, rules = ctx
  spec = lambda names, x: tuple(sharding.logical_to_spec(names, rules, x.shape, mesh))
  pad = lambda p: p + (None,) * (4 - len(p))
  qs, ks = pad(spec(("batch", None, "act_heads"), q)), pad(spec(("batch", None, "act_kv_heads"), k))
  if qs[2] != ks[2]:
    qs, ks = qs[:2] + (None, None), ks[:2] + (None, None)
  if qs[0] != ks[0]:
    raise ValueError(f"attention: query and key batches shard differently ({qs[0]} vs {ks[0]})")
  P = jax.sharding.PartitionSpec
  return jax.shard_map(
    fn,
    mesh=mesh,
    in_specs=(P(*qs), P(*ks), P(*ks), P(qs[0], None)),
    out_specs=P(*qs),
    check_vma=False,
  )(q, k, v, seg)


@jax.custom_vjp
def dot_f32(x: jax.Array, w: jax.Array) -> jax.Array:
  """x (..., D) @ w (D, V) accumulated and returned in float32, with a backward pass in the
  operands' dtype: the float32 cotangent is cast to it before both backward matmuls.

  Plain `jnp.dot(..., preferred_element_type=float32)` transposes with float32 operands: with
  bfloat16 compute, the weight is upcast to float32 while still FSDP-sharded and all-gathered
  at twice the bytes (the LM head, the largest gather: vocab x hidden). Here every all-gather
  of `w` moves its compute dtype (tests/test_sharding.py checks the compiled step)."""
  return jnp.dot(x, w, preferred_element_type=jnp.float32)


def _dot_f32_fwd(x, w):
  return dot_f32(x, w), (x, w)


def _dot_f32_bwd(res, g):
  x, w = res
  g = g.astype(x.dtype)
  lead = tuple(range(x.ndim - 1))
  dx = jnp.dot(g, w.T, preferred_element_type=jnp.float32).astype(x.dtype)
  dw = jnp.tensordot(x, g, axes=(lead, lead), preferred_element_type=jnp.float32)
  return dx, dw.astype(w.dtype)


dot_f32.defvjp(_dot_f32_fwd, _dot_f32_bwd)


def host_safe_dtype(dtype):
  """`dtype` for a dot accumulated in float32, except float16 on CPU, whose dot has no
  float16 x float16 -> float32 form: there the operands go in as float32 (float16 runs on CPU
  only in tests of the float16 training path; GPUs take float16 directly)."""
  if jnp.dtype(dtype) == jnp.float16 and jax.default_backend() == "cpu":
    return jnp.float32
  return dtype


def attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  mask: jax.Array | None = None,
  bias: jax.Array | None = None,
  is_causal: bool = False,
  scale: float | None = None,
  segment_ids: jax.Array | None = None,
) -> jax.Array:
  """Multi-head attention on (B, T, H, D) inputs; K/V may have fewer heads than Q (GQA).

  `segment_ids` (B, T), self-attention only: a query sees the keys of its own segment, 0 =
  padding (no real query sees it); with `is_causal`, only keys not later than itself. `mask`
  (broadcastable to (B, H, T, S), True = visible) and `bias` are general and keep XLA on TPU.

  The implementation follows `set_attention_impl` / `attention_impl` (`choose_attention`):
    xla     `jax.nn.dot_product_attention(implementation="xla")`: materializes the float32
            (B, H, T, S) scores; the mask is built from causal/segment ids here.
    cudnn   cuDNN flash attention: causal through the kernel's own causal mask (nothing
            materialized). jax's public cuDNN entry takes sequence lengths but no segment ids,
            so packed rows' segment mask goes in as a (B, 1, T, T) boolean mask: T^2 bytes
            per row instead of H x T^2 float32 scores.
    splash  Pallas splash attention (TPU): causal and segment ids natively, no mask in memory.
  Head dims, dtypes or lengths a kernel cannot take fall back to XLA (logged once).
  """
  dtype = q.dtype
  k, v = k.astype(dtype), v.astype(dtype)
  if segment_ids is not None and q.shape[1] != k.shape[1]:
    raise ValueError(
      f"attention: segment_ids need self-attention; got {q.shape[1]} queries and {k.shape[1]} keys"
    )
  impl = choose_attention(q, k, mask=mask, bias=bias)
  if impl == "splash":
    return _splash(q, k, v, segment_ids, is_causal, scale).astype(dtype)
  if segment_ids is not None:
    same = segment_mask(segment_ids)
    mask = same if mask is None else mask & same
  if impl == "cudnn":
    return jax.nn.dot_product_attention(
      q, k, v, bias=bias, mask=mask, is_causal=is_causal, scale=scale, implementation="cudnn"
    )
  work = host_safe_dtype(dtype)
  out = jax.nn.dot_product_attention(
    q.astype(work),
    k.astype(work),
    v.astype(work),
    bias=bias,
    mask=mask,
    is_causal=is_causal,
    scale=scale,
    implementation="xla",
  )
  return out.astype(dtype)


def segment_mask(segment_ids: jax.Array) -> jax.Array:
  """(B, 1, T, T) bool from (B, T) segment ids: a query sees the keys of its own segment, and no
  query sees padding (id 0)."""
  same = segment_ids[:, :, None] == segment_ids[:, None, :]
  return (same & (segment_ids != 0)[:, None, :])[:, None]


def grid_position_code(h: int, w: int, dim: int, cells: int = 16):
  """(h * w, dim) float32 NumPy: a fixed 2-D sin-cos code of the places of an h x w grid laid
  over an image, row-major. Coordinates are measured on a `cells` x `cells` grid over the same
  image (place (i, j) sits at ((i + 0.5) cells / h - 0.5, ...)), so the codes of grids of any
  resolution over one image are one function of the place in the image. A quarter of the
  channels each: sin and cos of y, sin and cos of x, at frequencies 100^(-k / (dim / 4));
  channels beyond 4 * (dim // 4) are zero. Each entry has RMS 1/sqrt(2)."""
  import numpy as np

  q = dim // 4
  freq = 1.0 / (100.0 ** (np.arange(q) / max(q, 1)))
  ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  y = ((ys + 0.5) * cells / h - 0.5).reshape(-1, 1) * freq
  x = ((xs + 0.5) * cells / w - 0.5).reshape(-1, 1) * freq
  code = np.zeros((h * w, dim), np.float32)
  code[:, : 4 * q] = np.concatenate([np.sin(y), np.cos(y), np.sin(x), np.cos(x)], 1)
  return code


def attention_probs(
  q: jax.Array,
  k: jax.Array,
  *,
  mask: jax.Array | None = None,
  is_causal: bool = False,
  scale: float | None = None,
  segment_ids: jax.Array | None = None,
) -> jax.Array:
  """The (B, H, T, S) float32 weights `attention` applies to V for these inputs (K heads
  repeated for GQA); a query that sees no key gets zeros. For inspection, not for training: the
  full score matrix is materialized."""
  q, k = q.astype(jnp.float32), k.astype(jnp.float32)
  h, kvh = q.shape[2], k.shape[2]
  k = jnp.repeat(k, h // kvh, axis=2)
  s = jnp.einsum("bthd,bshd->bhts", q, k) * (q.shape[-1] ** -0.5 if scale is None else scale)
  t, n = q.shape[1], k.shape[1]
  visible = jnp.ones((1, 1, t, n), bool)
  if is_causal:
    visible = visible & jnp.tril(jnp.ones((t, n), bool))[None, None]
  if segment_ids is not None:
    visible = visible & segment_mask(segment_ids)
  if mask is not None:
    visible = visible & mask
  s = jnp.where(visible, s, -jnp.inf)
  top = jnp.max(s, axis=-1, keepdims=True)
  p = jnp.where(visible, jnp.exp(s - jnp.where(jnp.isfinite(top), top, 0.0)), 0.0)
  return p / jnp.maximum(p.sum(-1, keepdims=True), 1e-30)


# Attention weights for inspection (puma_jax/tools/diagnose_demo.py): inside
# `capture_attention()`, the attention modules record theirs on eager calls (under a trace,
# nothing is recorded, so jitted training and sampling are unchanged).
_CAPTURE = contextvars.ContextVar("attention_capture", default=None)


@contextlib.contextmanager
def capture_attention():
  """Yields a list that receives (kind, weights) per attention call, in call order: kind
  "self" or "cross", weights a (B, H, T, S) float32 NumPy array (`attention_probs`)."""
  got: list = []
  token = _CAPTURE.set(got)
  try:
    yield got
  finally:
    _CAPTURE.reset(token)


def record_attention(kind: str, q, k, **kw) -> None:
  """Called by attention modules with their (B, T, H, D) queries and keys (`attention_probs`
  keywords); a no-op outside `capture_attention` and under a trace."""
  got = _CAPTURE.get()
  if got is None or isinstance(q, jax.core.Tracer):
    return
  import numpy as np

  got.append((kind, np.asarray(attention_probs(q, k, **kw))))


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

  def __init__(
    self,
    dim: int,
    num_heads: int,
    *,
    qkv_bias: bool = True,
    out_name: str = "out_proj",
    dtype,
    param_dtype,
    rngs: nnx.Rngs,
  ):
    self.num_heads, self.out_name = num_heads, out_name
    mk = lambda axes, bias: Dense(
      dim, dim, axes=axes, use_bias=bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs
    )
    self.q_proj = mk(("embed", "heads"), qkv_bias)
    self.k_proj = mk(("embed", "heads"), qkv_bias)
    self.v_proj = mk(("embed", "heads"), qkv_bias)
    setattr(self, out_name, mk(("heads", "embed"), True))

  def __call__(self, x, mask=None):
    b, t, d = x.shape
    split = lambda y: sharding.constrain(
      y.reshape(b, t, self.num_heads, d // self.num_heads), ("batch", "act_seq", "act_heads", None)
    )
    o = attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)), mask=mask)
    return getattr(self, self.out_name)(o.reshape(b, t, d))


class MLP(nnx.Module):
  """fc1 -> activation -> fc2."""

  def __init__(self, dim: int, hidden: int, act: str, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.act = activation(act)
    self.fc1 = Dense(
      dim, hidden, axes=("embed", "mlp"), dtype=dtype, param_dtype=param_dtype, rngs=rngs
    )
    self.fc2 = Dense(
      hidden, dim, axes=("mlp", "embed"), dtype=dtype, param_dtype=param_dtype, rngs=rngs
    )

  def __call__(self, x):
    return self.fc2(sharding.constrain(self.act(self.fc1(x)), ("batch", "act_seq", "act_mlp")))


class EncoderLayer(nnx.Module):
  """x + attn(norm1(x)), then x + mlp(norm2(x)). `cfg` needs hidden_size, intermediate_size,
  num_attention_heads, hidden_act and layer_norm_eps (a CLIP or ViT config)."""

  def __init__(
    self, cfg, names: BlockNames, *, qkv_bias: bool = True, dtype, param_dtype, rngs: nnx.Rngs
  ):
    self.names = names
    d = cfg.hidden_size
    ln = lambda: LayerNorm(d, eps=cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype)
    setattr(self, names.norm1, ln())
    setattr(
      self,
      names.attn,
      SelfAttention(
        d,
        cfg.num_attention_heads,
        qkv_bias=qkv_bias,
        out_name=names.out_proj,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
      ),
    )
    setattr(self, names.norm2, ln())
    self.mlp = MLP(
      d, cfg.intermediate_size, cfg.hidden_act, dtype=dtype, param_dtype=param_dtype, rngs=rngs
    )

  def __call__(self, x, mask=None):
    n = self.names
    x = x + getattr(self, n.attn)(getattr(self, n.norm1)(x), mask=mask)
    x = x + self.mlp(getattr(self, n.norm2)(x))
    return sharding.constrain(x, ("batch", "act_seq", "act_embed"))

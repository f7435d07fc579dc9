"""LLaMA decoder (HF `LlamaForCausalLM` layout): RMSNorm, RoPE, grouped-query attention, SwiGLU.

Covers LLaMA-2, LLaMA-3 and LLaMA-3.1 checkpoints (the `llama3` RoPE scaling), tied or untied
output embeddings, optional q/k/v/o and MLP biases.

Entry points:
  model(token_ids, positions=, segment_ids=, attention_mask=, cache=)  -> logits (B, T, V) f32
      (with `cache`: (logits, new_cache))
  model.embed(token_ids)                         -> input embeddings (B, T, D)
  model.decode_embeddings(x, positions=, ...)    -> (final hidden states after the norm, cache)
  model.logits(hidden)                           -> float32 logits
PUMA feeds image-feature embeddings through `decode_embeddings` and reads the hidden states.

Masking: a key is visible to a query when it is not later (causal), not padding
(`attention_mask` 0 / `segment_ids` 0) and in the same segment (packed sequences). Positions
default to restarting at every segment and skipping padding, the way HF numbers a left-padded
batch.

Layers may be stacked and run with `lax.scan` (`scan_layers`), with per-layer
rematerialization (`remat_policy`). The stacked parameters carry the `layers` logical axis.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from puma_jax import sharding
from puma_jax.models import layers
from puma_jax.models.base import ModelConfig

ROPE_TYPES = ("default", "linear", "llama3")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")


@dataclasses.dataclass(frozen=True)
class LlamaConfig(ModelConfig):
  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_hidden_layers: int = 32
  num_attention_heads: int = 32
  num_key_value_heads: int | None = None  # None: = num_attention_heads (MHA)
  head_dim: int | None = None  # None: hidden_size // num_attention_heads
  max_position_embeddings: int = 4096
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  # HF `rope_scaling` / `rope_parameters`, flattened so the config stays hashable.
  rope_type: str = "default"
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_position_embeddings: int = 8192
  tie_word_embeddings: bool = False
  attention_bias: bool = False
  mlp_bias: bool = False
  hidden_act: str = "silu"
  bos_token_id: int | None = 1
  eos_token_id: int | tuple[int, ...] | None = 2
  pad_token_id: int | None = None
  # ours
  scan_layers: bool = False
  remat_policy: str = "none"

  def __post_init__(self):
    name = type(self).__name__
    for f in (
      "vocab_size",
      "hidden_size",
      "intermediate_size",
      "num_hidden_layers",
      "num_attention_heads",
      "max_position_embeddings",
    ):
      if int(getattr(self, f)) <= 0:
        raise ValueError(f"{name}: {f}={getattr(self, f)} must be positive")
    if self.num_key_value_heads is None:
      object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
    if self.head_dim is None:
      if self.hidden_size % self.num_attention_heads:
        raise ValueError(
          f"{name}: hidden_size={self.hidden_size} is not divisible by "
          f"num_attention_heads={self.num_attention_heads} (set head_dim)"
        )
      object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
    if self.num_key_value_heads <= 0 or self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(
        f"{name}: num_key_value_heads={self.num_key_value_heads} must divide "
        f"num_attention_heads={self.num_attention_heads}"
      )
    if self.head_dim % 2:
      raise ValueError(f"{name}: head_dim={self.head_dim} must be even for rotary embeddings")
    if self.rope_type not in ROPE_TYPES:
      raise ValueError(f"{name}: unsupported rope_type={self.rope_type!r}; supported: {ROPE_TYPES}")
    if self.rope_type == "llama3" and self.rope_high_freq_factor <= self.rope_low_freq_factor:
      raise ValueError(
        f"{name}: rope_high_freq_factor={self.rope_high_freq_factor} must exceed "
        f"rope_low_freq_factor={self.rope_low_freq_factor}"
      )
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(
        f"{name}: unknown remat_policy={self.remat_policy!r}; known: {REMAT_POLICIES}"
      )
    if isinstance(self.eos_token_id, list):
      object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
    layers.activation(self.hidden_act)

  @property
  def eos_token_ids(self) -> tuple[int, ...]:
    e = self.eos_token_id
    return () if e is None else (e,) if isinstance(e, int) else tuple(e)


def llama3_8b(**kw) -> LlamaConfig:
  """Meta-Llama-3-8B (PUMA's backbone size): 8,030,261,248 parameters."""
  return LlamaConfig(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    bos_token_id=128000,
    eos_token_id=128001,
    **kw,
  )


def llama31_8b(**kw) -> LlamaConfig:
  return llama3_8b(
    max_position_embeddings=131072,
    rope_type="llama3",
    rope_factor=8.0,
    rope_low_freq_factor=1.0,
    rope_high_freq_factor=4.0,
    rope_original_max_position_embeddings=8192,
    **kw,
  )


def tiny(**kw) -> LlamaConfig:
  """GQA at toy width, for CPU runs and tests."""
  base = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
  )
  base.update(kw)
  return LlamaConfig(**base)


# ----------------------------------------------------------------------------------------------
# Rotary embeddings


@functools.lru_cache(maxsize=64)
def rope_inv_freq(cfg: LlamaConfig) -> np.ndarray:
  """Inverse frequencies (head_dim // 2,), float32, HF's formulas (incl. llama3 scaling)."""
  d = cfg.head_dim
  inv = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float32) / np.float32(d)))
  inv = inv.astype(np.float32)
  if cfg.rope_type == "linear":
    inv = inv / np.float32(cfg.rope_factor)
  elif cfg.rope_type == "llama3":
    factor, lo, hi = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    old = cfg.rope_original_max_position_embeddings
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > old / lo, inv / factor, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
    inv = np.where(medium, smoothed, scaled).astype(np.float32)
  return inv


def rope_cos_sin(inv_freq: np.ndarray, positions: jax.Array, dtype):
  """cos/sin of shape (B, T, 1, head_dim): computed in float32, then cast (as HF)."""
  freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
  emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
  return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """HF's rotate_half convention: the two halves of each head are the (re, im) pairs."""
  h = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., h:], x[..., :h]], axis=-1)
  return x * cos + rotated * sin


# ----------------------------------------------------------------------------------------------
# KV cache


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
  """Keys/values of every layer for a fixed number of slots.

  k, v: (layers, batch, slots, kv_heads, head_dim); `valid`: (batch, slots) which slots hold a
  real token; `index`: the next slot to write (shared by the batch: prompts are left-padded, so
  every row advances together); `length`: (batch,) real tokens seen per row (the next position).
  """

  k: jax.Array
  v: jax.Array
  valid: jax.Array
  index: jax.Array
  length: jax.Array

  @classmethod
  def init(cls, cfg: LlamaConfig, batch: int, slots: int, dtype=jnp.float32) -> KVCache:
    shape = (cfg.num_hidden_layers, batch, slots, cfg.num_key_value_heads, cfg.head_dim)
    return cls(
      jnp.zeros(shape, dtype),
      jnp.zeros(shape, dtype),
      jnp.zeros((batch, slots), bool),
      jnp.zeros((), jnp.int32),
      jnp.zeros((batch,), jnp.int32),
    )

  @property
  def slots(self) -> int:
    return self.k.shape[2]


# How decoding writes the KV cache. "inplace": each layer writes its new keys/values into the
# one (layers, ...) buffer with `dynamic_update_slice` at (layer, 0, index), and the buffer is
# carried through the layer loop, so XLA updates it in place (the decode loop donates it).
# "copy": the previous scheme, kept for benchmarks/bench_throughput.py's before/after: each
# layer's slice is taken out, updated and the layers are re-stacked (jnp.stack, or scan
# outputs), which copies the whole cache on every decoded token.
CACHE_UPDATE = "inplace"


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class AttentionMask:
  """What each query may see. Training rows: `causal` plus `segment_ids` (B, T) (0 = padding),
  which fused kernels take without a T x T mask (`layers.attention`). The KV cache path: an
  explicit `mask` (B, 1, T, slots) that already holds the causal order."""

  segment_ids: jax.Array | None = None
  mask: jax.Array | None = None
  causal: bool = dataclasses.field(default=False, metadata=dict(static=True))


# ----------------------------------------------------------------------------------------------
# Layers


class LlamaAttention(nnx.Module):
  def __init__(self, cfg: LlamaConfig, *, dtype, param_dtype, rngs):
    d, h, kvh, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    self.num_heads, self.num_kv_heads, self.head_dim = h, kvh, hd
    kw = dict(use_bias=cfg.attention_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q_proj = layers.Dense(d, h * hd, axes=("embed", "heads"), **kw)
    self.k_proj = layers.Dense(d, kvh * hd, axes=("embed", "kv_heads"), **kw)
    self.v_proj = layers.Dense(d, kvh * hd, axes=("embed", "kv_heads"), **kw)
    self.o_proj = layers.Dense(h * hd, d, axes=("heads", "embed"), **kw)

  def __call__(self, x, cos, sin, mask: AttentionMask, kv=None, index=None, layer=None):
    """`kv`: the cache (k, v). With `layer` (CACHE_UPDATE "inplace") the whole
    (L, B, S, KVH, D) buffers, written at (layer, slot `index`); else this layer's
    (B, S, KVH, D) slices, written at slot `index`."""
    b, t, _ = x.shape
    q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
    k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    q = sharding.constrain(apply_rope(q, cos, sin), ("batch", "act_seq", "act_heads", None))
    k = sharding.constrain(apply_rope(k, cos, sin), ("batch", "act_seq", "act_kv_heads", None))
    v = sharding.constrain(v, ("batch", "act_seq", "act_kv_heads", None))
    if kv is not None and layer is not None:
      ck, cv = kv
      ck = jax.lax.dynamic_update_slice(ck, k[None].astype(ck.dtype), (layer, 0, index, 0, 0))
      cv = jax.lax.dynamic_update_slice(cv, v[None].astype(cv.dtype), (layer, 0, index, 0, 0))
      k = jax.lax.dynamic_index_in_dim(ck, layer, 0, keepdims=False)
      v = jax.lax.dynamic_index_in_dim(cv, layer, 0, keepdims=False)
      kv = (ck, cv)
    elif kv is not None:
      ck, cv = kv
      k = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, index, 0, 0))
      v = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, index, 0, 0))
      kv = (k, v)
    layers.record_attention(
      "self", q, k, mask=mask.mask, is_causal=mask.causal, segment_ids=mask.segment_ids
    )
    o = layers.attention(
      q, k, v, mask=mask.mask, is_causal=mask.causal, segment_ids=mask.segment_ids
    )
    o = sharding.constrain(o, ("batch", "act_seq", "act_heads", None))
    return self.o_proj(o.reshape(b, t, self.num_heads * self.head_dim)), kv


class LlamaMLP(nnx.Module):
  def __init__(self, cfg: LlamaConfig, *, dtype, param_dtype, rngs):
    d, f = cfg.hidden_size, cfg.intermediate_size
    kw = dict(use_bias=cfg.mlp_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.act = layers.activation(cfg.hidden_act)
    self.gate_proj = layers.Dense(d, f, axes=("embed", "mlp"), **kw)
    self.up_proj = layers.Dense(d, f, axes=("embed", "mlp"), **kw)
    self.down_proj = layers.Dense(f, d, axes=("mlp", "embed"), **kw)

  def __call__(self, x):
    h = self.act(self.gate_proj(x)) * self.up_proj(x)
    return self.down_proj(sharding.constrain(h, ("batch", "act_seq", "act_mlp")))


class LlamaDecoderLayer(nnx.Module):
  def __init__(self, cfg: LlamaConfig, *, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.input_layernorm = layers.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, **kw)
    self.self_attn = LlamaAttention(cfg, rngs=rngs, **kw)
    self.post_attention_layernorm = layers.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, **kw)
    self.mlp = LlamaMLP(cfg, rngs=rngs, **kw)

  def __call__(self, x, cos, sin, mask, kv=None, index=None, layer=None):
    a, kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, kv, index, layer)
    x = x + a
    x = x + self.mlp(self.post_attention_layernorm(x))
    return sharding.constrain(x, ("batch", "act_seq", "act_embed")), kv


_POLICIES = {
  "full": jax.checkpoint_policies.nothing_saveable,
  "dots": jax.checkpoint_policies.dots_saveable,
  "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _layer_fn(graphdef, policy: str, scanned: bool = True):
  """A pure function (layer state, x, ...) -> (x, kv), rematerialized per `policy`.

  Inside `lax.scan` CSE cannot merge the recomputation back into the forward pass, so
  `prevent_cse=False` is safe (and faster); unrolled layers need `prevent_cse=True`, or XLA
  undoes the rematerialization and saves no memory.
  """

  def run(state, x, cos, sin, mask, kv, index, layer=None):
    return nnx.merge(graphdef, state)(x, cos, sin, mask, kv, index, layer)

  if policy != "none":
    run = jax.checkpoint(run, policy=_POLICIES[policy], prevent_cse=not scanned)
  return run


# ----------------------------------------------------------------------------------------------
# Model


def _segment_positions(segment_ids: jax.Array) -> jax.Array:
  """Index within each run of equal segment ids (positions restart per packed example)."""
  t = segment_ids.shape[-1]
  idx = jnp.arange(t)
  start = jnp.concatenate(
    [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
  )
  first = jax.lax.cummax(jnp.where(start, idx, 0), axis=1)
  return idx - first


class LlamaForCausalLM(nnx.Module):
  """HF `LlamaForCausalLM`. Parameter paths: `embed_tokens`, `layers.{i}.*` (or stacked
  `layers.*` with `scan_layers`), `norm`, `lm_head` (absent when embeddings are tied)."""

  def __init__(
    self, config: LlamaConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs
  ):
    self.config = config
    self.dtype = dtype
    cfg = config
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.embed_tokens = layers.Embed(
      cfg.vocab_size, cfg.hidden_size, axes=("vocab", "embed"), rngs=rngs, **kw
    )
    if cfg.scan_layers:

      @nnx.split_rngs(splits=cfg.num_hidden_layers)
      @nnx.vmap(in_axes=(0,), out_axes=0, axis_size=cfg.num_hidden_layers)
      def make(r):
        return LlamaDecoderLayer(cfg, rngs=r, **kw)

      self.layers = make(rngs)
      for _, var in nnx.to_flat_state(nnx.state(self.layers, nnx.Param)):
        var.set_metadata(logical_axes=("layers",) + tuple(var.get_metadata()["logical_axes"]))
    else:
      self.layers = nnx.List(
        [LlamaDecoderLayer(cfg, rngs=rngs, **kw) for _ in range(cfg.num_hidden_layers)]
      )
    self.norm = layers.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, **kw)
    if not cfg.tie_word_embeddings:
      self.lm_head = layers.Dense(
        cfg.hidden_size, cfg.vocab_size, axes=("embed", "vocab"), use_bias=False, rngs=rngs, **kw
      )

  # -- pieces ------------------------------------------------------------------------------------

  def check_ids(self, token_ids) -> None:
    """Range check on concrete ids (inside jit ids are abstract and cannot be checked)."""
    if token_ids.ndim != 2:
      raise ValueError(f"token_ids must be (batch, length); got shape {tuple(token_ids.shape)}")
    if isinstance(token_ids, jax.core.Tracer) or token_ids.size == 0:
      return
    ids = np.asarray(token_ids)
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= self.config.vocab_size:
      raise ValueError(
        f"token_ids out of range: values span [{lo}, {hi}] but vocab_size={self.config.vocab_size}"
      )

  def embed(self, token_ids: jax.Array) -> jax.Array:
    self.check_ids(token_ids)
    x = self.embed_tokens(token_ids)
    return sharding.constrain(x, ("batch", "act_seq", "act_embed"))

  def logits(self, hidden: jax.Array) -> jax.Array:
    """Output projection in the compute dtype, accumulated and returned in float32."""
    w = (
      self.embed_tokens.embedding[...].T
      if self.config.tie_word_embeddings
      else self.lm_head.kernel[...]
    )
    dtype = layers.host_safe_dtype(self.dtype)
    out = layers.dot_f32(hidden.astype(dtype), w.astype(dtype))
    return sharding.constrain(out, ("batch", "act_seq", "act_vocab"))

  def _mask_and_positions(self, b, t, positions, segment_ids, attention_mask, cache):
    if attention_mask is not None:
      attention_mask = jnp.asarray(attention_mask).astype(bool)
      if attention_mask.shape != (b, t):
        raise ValueError(
          f"attention_mask must be (batch, length) = {(b, t)}; got {tuple(attention_mask.shape)}"
        )
    if segment_ids is not None:
      segment_ids = jnp.asarray(segment_ids)
      if segment_ids.shape != (b, t):
        raise ValueError(
          f"segment_ids must be (batch, length) = {(b, t)}; got {tuple(segment_ids.shape)}"
        )
    if cache is None:
      qpos = jnp.arange(t)
      # Padding is segment 0: with only an attention_mask, the real tokens are one segment.
      seg = segment_ids
      if attention_mask is not None:
        seg = attention_mask.astype(jnp.int32) if seg is None else jnp.where(attention_mask, seg, 0)
      if positions is None:
        if segment_ids is not None:
          positions = _segment_positions(segment_ids)
        elif attention_mask is not None:
          positions = jnp.maximum(jnp.cumsum(attention_mask, axis=1) - 1, 0)
        else:
          positions = jnp.broadcast_to(qpos, (b, t))
      return AttentionMask(segment_ids=seg, causal=True), positions, None
    if segment_ids is not None:
      raise ValueError(
        "segment_ids (packed sequences) are not supported with a KV cache; "
        "use attention_mask for padding"
      )
    if cache.k.shape[1] != b:
      raise ValueError(f"cache was built for batch {cache.k.shape[1]}, inputs have batch {b}")
    new = jnp.ones((b, t), bool) if attention_mask is None else attention_mask
    valid = jax.lax.dynamic_update_slice(cache.valid, new, (0, cache.index))
    slots = jnp.arange(cache.slots)
    qslot = cache.index + jnp.arange(t)
    mask = (slots[None, :] <= qslot[:, None])[None] & valid[:, None, :]
    if positions is None:
      positions = cache.length[:, None] + jnp.maximum(jnp.cumsum(new, axis=1) - 1, 0)
    cache = dataclasses.replace(
      cache, valid=valid, length=cache.length + new.sum(axis=1).astype(jnp.int32)
    )
    return AttentionMask(mask=mask[:, None]), positions, cache

  def decode_embeddings(
    self,
    x: jax.Array,
    *,
    positions=None,
    segment_ids=None,
    attention_mask=None,
    cache: KVCache | None = None,
  ):
    """Runs the decoder on input embeddings (B, T, D); returns (final hidden states, cache).

    The hidden states are after the final RMSNorm (what `logits` projects), in `dtype`.
    """
    b, t, d = x.shape
    if d != self.config.hidden_size:
      raise ValueError(f"input embeddings have width {d}, hidden_size is {self.config.hidden_size}")
    if cache is not None and not isinstance(cache.index, jax.core.Tracer):
      if int(cache.index) + t > cache.slots:
        raise ValueError(
          f"KV cache overflow: {int(cache.index)} slots used + {t} new tokens > {cache.slots} slots"
        )
    mask, positions, cache = self._mask_and_positions(
      b, t, positions, segment_ids, attention_mask, cache
    )
    cos, sin = rope_cos_sin(rope_inv_freq(self.config), positions, self.dtype)
    x = sharding.constrain(x.astype(self.dtype), ("batch", "act_seq", "act_embed"))
    index = None if cache is None else cache.index
    policy = self.config.remat_policy
    inplace = cache is not None and CACHE_UPDATE == "inplace"
    if self.config.scan_layers:
      graphdef, state = nnx.split(self.layers)
      run = _layer_fn(graphdef, policy)
      if cache is None:

        def body(h, st):
          return run(st, h, cos, sin, mask, None, None)[0], None

        x, _ = jax.lax.scan(body, x, state)
      elif inplace:

        def body(carry, xs):
          h, ck, cv = carry
          st, i = xs
          h, kv = run(st, h, cos, sin, mask, (ck, cv), index, i)
          return (h, *kv), None

        layer_ids = jnp.arange(self.config.num_hidden_layers)
        (x, ks, vs), _ = jax.lax.scan(body, (x, cache.k, cache.v), (state, layer_ids))
        cache = dataclasses.replace(cache, k=ks, v=vs)
      else:

        def body(h, xs):
          st, ck, cv = xs
          h, kv = run(st, h, cos, sin, mask, (ck, cv), index)
          return h, kv

        x, (ks, vs) = jax.lax.scan(body, x, (state, cache.k, cache.v))
        cache = dataclasses.replace(cache, k=ks, v=vs)
    elif inplace:
      kv = (cache.k, cache.v)
      for i, layer in enumerate(self.layers):
        graphdef, state = nnx.split(layer)
        x, kv = _layer_fn(graphdef, policy, scanned=False)(state, x, cos, sin, mask, kv, index, i)
      cache = dataclasses.replace(cache, k=kv[0], v=kv[1])
    else:
      ks, vs = [], []
      for i, layer in enumerate(self.layers):
        graphdef, state = nnx.split(layer)
        kv = None if cache is None else (cache.k[i], cache.v[i])
        x, kv = _layer_fn(graphdef, policy, scanned=False)(state, x, cos, sin, mask, kv, index)
        if kv is not None:
          ks.append(kv[0])
          vs.append(kv[1])
      if cache is not None:
        cache = dataclasses.replace(cache, k=jnp.stack(ks), v=jnp.stack(vs))
    if cache is not None:
      cache = dataclasses.replace(cache, index=cache.index + t)
    return self.norm(x), cache

  def __call__(
    self,
    token_ids: jax.Array,
    *,
    positions=None,
    segment_ids=None,
    attention_mask=None,
    cache: KVCache | None = None,
  ):
    token_ids = jnp.asarray(token_ids)
    hidden, new_cache = self.decode_embeddings(
      self.embed(token_ids),
      positions=positions,
      segment_ids=segment_ids,
      attention_mask=attention_mask,
      cache=cache,
    )
    logits = self.logits(hidden)
    return logits if cache is None else (logits, new_cache)

  def init_cache(self, batch: int, slots: int, dtype=None) -> KVCache:
    return KVCache.init(self.config, batch, slots, dtype or self.dtype)


def set_scan_layers(model: LlamaForCausalLM, scan: bool) -> LlamaForCausalLM:
  """The same weights in the other layer layout (stacked for `lax.scan`, or a list)."""
  cfg = model.config
  if cfg.scan_layers == scan:
    return model
  new_cfg = cfg.replace(scan_layers=scan)
  flat = restack(nnx.to_pure_dict(nnx.state(model, nnx.Param)), cfg.num_hidden_layers, scan)
  abstract = nnx.eval_shape(lambda: LlamaForCausalLM(new_cfg, dtype=model.dtype, rngs=nnx.Rngs(0)))
  return sharding.materialize(abstract, flat)


def restack(params: dict, num_layers: int, to_scanned: bool) -> dict:
  """Pure param dict: per-layer `layers.{i}` <-> stacked `layers` (leading layer axis)."""
  params = dict(params)
  if to_scanned:
    per = [params["layers"][i] for i in range(num_layers)]
    params["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *per)
  else:
    stacked = params["layers"]
    params["layers"] = {i: jax.tree.map(lambda a: a[i], stacked) for i in range(num_layers)}
  return params

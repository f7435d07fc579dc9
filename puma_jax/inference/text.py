"""Text generation with a KV cache: one jitted prefill, one jitted decode loop per shape bucket.

Prompts of different lengths are left-padded into a power-of-two bucket, so every row writes
its next token into the same cache slot and a single `lax.while_loop` decodes the whole batch
(no Python per token). Compiled functions are cached by (graph, batch, bucket, sampler), so a
second call with similar shapes runs without tracing.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from puma_jax.inference.prompts import bucket, left_pad, prompt_arrays, puma_inputs
from puma_jax.models.llama import KVCache


class Sampler(NamedTuple):
  """The static part of the sampling setup (it changes the compiled graph); the numbers
  (temperature, top_k, top_p) are traced, so changing them does not recompile."""

  greedy: bool
  filtered: bool  # top-k and/or top-p restriction (costs a sort of the vocabulary per step)
  # Only the tokens of a boolean vocabulary mask may be generated (a box: position tokens).
  constrained: bool = False


def sample_logits(
  logits: jax.Array,
  key: jax.Array,
  sampler: Sampler,
  temperature=1.0,
  top_k=0,
  top_p=1.0,
  allowed: jax.Array | None = None,
) -> jax.Array:
  """Next tokens (B,) from logits (B, V): greedy, or softmax sampling at `temperature` from
  the `top_k` most likely tokens (0: all), then from the smallest set of those whose
  probability mass reaches `top_p` (HF's order: top-k first, top-p on what remains).
  With `sampler.constrained`, tokens outside the bool mask `allowed` (V,) or (B, V) are removed
  first (as HF's logits processors run before its warpers), so top-k / top-p see only allowed
  tokens."""
  if sampler.greedy:
    if sampler.constrained:
      logits = jnp.where(allowed, logits, -jnp.inf)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  if sampler.constrained:
    logits = jnp.where(allowed, logits, -jnp.inf)
  if sampler.filtered:
    neg = jnp.finfo(jnp.float32).min
    v = logits.shape[-1]
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
    sorted_logits = jnp.where(jnp.arange(v) < k, sorted_logits, neg)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely tokens
    keep = (jnp.arange(v) < k) & ((before < top_p) | (jnp.arange(v) == 0))
    cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, neg, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "slots"))
def _prefill(graphdef, state, tokens, mask, *, slots):
  model = nnx.merge(graphdef, state)
  cache = model.init_cache(tokens.shape[0], slots)
  logits, cache = model(tokens, attention_mask=mask, cache=cache)
  return logits[:, -1], cache


def prefill(model, tokens, mask, slots: int):
  """Runs left-padded prompts (B, P) into a fresh cache of `slots` slots.

  Returns (logits of each row's last prompt token (B, V), cache)."""
  graphdef, state = nnx.split(model)
  return _prefill(
    graphdef, state, jnp.asarray(tokens, jnp.int32), jnp.asarray(mask, bool), slots=slots
  )


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def _decode_step(graphdef, state, tokens, cache):
  model = nnx.merge(graphdef, state)
  logits, cache = model(tokens[:, None], cache=cache)
  return logits[:, -1], cache


def decode_step(model, tokens, cache: KVCache):
  """One token per row (B,) -> (next-token logits (B, V), cache). The cache is donated."""
  graphdef, state = nnx.split(model)
  return _decode_step(graphdef, state, jnp.asarray(tokens, jnp.int32), cache)


def decode_loop(
  step,
  last_logits,
  cache,
  key,
  stop_ids,
  num_steps,
  temperature,
  top_k,
  top_p,
  *,
  capacity: int,
  sampler: Sampler,
  allowed: jax.Array | None = None,
) -> jax.Array:
  """Samples from `last_logits` (B, V), then runs `step(prev_tokens (B,), cache) -> (logits
  (B, V), cache)` in a `while_loop` until `num_steps` tokens or every row has stopped.

  Returns (B, capacity) token ids, -1 after a row's stop token. Shared by LLaMA text generation
  and PumaModel's multimodal text generation (which only differ in how a token is embedded).
  `allowed`: the bool vocabulary mask of a constrained `sampler` (`sample_logits`).
  """
  b = last_logits.shape[0]
  key, sub = jax.random.split(key)
  first = sample_logits(last_logits, sub, sampler, temperature, top_k, top_p, allowed)
  out = jnp.full((b, capacity), -1, jnp.int32).at[:, 0].set(first)
  done = jnp.isin(first, stop_ids)

  def cond(carry):
    i, _, done, _, _, _ = carry
    return (i < num_steps) & ~jnp.all(done)

  def body(carry):
    i, out, done, prev, cache, key = carry
    logits, cache = step(prev, cache)
    key, sub = jax.random.split(key)
    tok = sample_logits(logits, sub, sampler, temperature, top_k, top_p, allowed)
    tok = jnp.where(done, -1, tok)
    out = jax.lax.dynamic_update_slice(out, tok[:, None], (0, i))
    done = done | jnp.isin(tok, stop_ids)
    return i + 1, out, done, jnp.maximum(tok, 0), cache, key

  carry = (jnp.ones((), jnp.int32), out, done, first, cache, key)
  return jax.lax.while_loop(cond, body, carry)[1]


def trim_at_stop(out, max_new_tokens: int, stops) -> list[list[int]]:
  """Host-side: each row's tokens up to and including its first stop token."""
  result = []
  for row in np.asarray(out)[:, :max_new_tokens]:
    toks = [int(t) for t in row if t >= 0]
    for j, t in enumerate(toks):
      if t in stops:
        toks = toks[: j + 1]
        break
    result.append(toks)
  return result


def llama_inputs(model, arrays, images, features):
  """(language model, input embeddings) of token-only prompts; see `_generate`."""
  del images, features
  return model, model.embed(arrays["tokens"])


@functools.partial(jax.jit, static_argnames=("graphdef", "inputs", "capacity", "sampler"))
def _generate(
  graphdef,
  state,
  arrays,
  images,
  features,
  key,
  stop_ids,
  num_steps,
  temperature,
  top_k,
  top_p,
  allowed,
  *,
  inputs,
  capacity,
  sampler,
):
  """Prefill, then a `while_loop` of single-token steps until `num_steps` or all rows stop.

  `inputs(model, arrays, images, features) -> (llm, embeddings (B, P, D))` is the only part
  that differs between a plain LLaMA and PumaModel (whose prompts embed image features)."""
  llm, x = inputs(nnx.merge(graphdef, state), arrays, images, features)
  cache = llm.init_cache(x.shape[0], x.shape[1] + capacity)
  hidden, cache = llm.decode_embeddings(x, attention_mask=arrays["mask"], cache=cache)

  def step(prev, cache):
    h, cache = llm.decode_embeddings(llm.embed(prev[:, None]), cache=cache)
    return llm.logits(h)[:, -1], cache

  return decode_loop(
    step,
    llm.logits(hidden[:, -1:])[:, 0],
    cache,
    key,
    stop_ids,
    num_steps,
    temperature,
    top_k,
    top_p,
    capacity=capacity,
    sampler=sampler,
    allowed=allowed,
  )


def _as_rows(prompt_ids, attention_mask) -> list[np.ndarray]:
  """Prompts as a list of 1-D int arrays: from a list of sequences, one 1-D sequence, or a
  2-D padded batch with its `attention_mask` (left or right padding, both fine)."""
  if isinstance(prompt_ids, (list, tuple)) and prompt_ids and not np.isscalar(prompt_ids[0]):
    if attention_mask is not None:
      raise ValueError("attention_mask is only for a 2-D padded batch of prompt_ids")
    return [np.asarray(p, np.int64).reshape(-1) for p in prompt_ids]
  arr = np.asarray(prompt_ids)
  if arr.ndim == 1:
    arr = arr[None]
  if arr.ndim != 2:
    raise ValueError(
      f"prompt_ids must be a list of sequences or a (batch, length) array; got shape {arr.shape}"
    )
  if attention_mask is None:
    return [row.astype(np.int64) for row in arr]
  m = np.asarray(attention_mask).astype(bool)
  if m.shape != arr.shape:
    raise ValueError(f"attention_mask shape {m.shape} != prompt_ids shape {arr.shape}")
  return [row[keep].astype(np.int64) for row, keep in zip(arr, m)]


def _llama_prompts(cfg, prompt_ids, attention_mask, max_new_tokens) -> dict[str, np.ndarray]:
  rows = _as_rows(prompt_ids, attention_mask)
  for i, r in enumerate(rows):
    if r.size == 0:
      raise ValueError(f"prompt {i} is empty")
    if r.min() < 0 or r.max() >= cfg.vocab_size:
      raise ValueError(
        f"prompt {i}: token ids out of range [{r.min()}, {r.max()}] for vocab_size={cfg.vocab_size}"
      )
    if r.size > cfg.max_position_embeddings:
      raise ValueError(
        f"prompt {i} has {r.size} tokens, longer than the context "
        f"(max_position_embeddings={cfg.max_position_embeddings})"
      )
    if r.size + max_new_tokens > cfg.max_position_embeddings:
      raise ValueError(
        f"prompt {i} ({r.size} tokens) + max_new_tokens={max_new_tokens} exceeds "
        f"the context (max_position_embeddings={cfg.max_position_embeddings})"
      )
  return left_pad([{"tokens": r} for r in rows])


def generate_text(
  model,
  prompt_ids,
  max_new_tokens: int,
  temperature: float = 0.0,
  top_k: int | None = None,
  top_p: float | None = None,
  stop_tokens: Sequence[int] | None = None,
  seed: int = 0,
  attention_mask=None,
  *,
  images=None,
  features=None,
  allowed_tokens: Sequence[int] | None = None,
) -> list[list[int]]:
  """New token ids per prompt (each list ends at and includes its first stop token).

  For a LLaMA model, prompt_ids is a list of token-id sequences of any lengths, or a padded
  (B, T) array with its `attention_mask`. For a PumaModel, it is a list of
  `sequence.build_prompt` dicts, whose images come from `images` (B, M, H, W, 3) preprocessed
  or `features` (B, M, 341, F). temperature 0 is greedy; otherwise softmax sampling at
  `temperature`, restricted to the `top_k` most likely tokens and/or the `top_p` nucleus.
  `stop_tokens` defaults to the config's `eos_token_id` (pass `()` to never stop early).
  `allowed_tokens`: ids that every generated token must be one of (a box: `SpecialTokens.positions`
  with 4 new tokens and no stop token); applied as a mask on the logits inside the compiled loop.
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
  if hasattr(model, "input_embeddings"):  # PumaModel: prompts hold image slots
    cfg = model.config.llm
    arrays, images, features = prompt_arrays(
      model, prompt_ids, max_new_tokens, images=images, features=features
    )
    inputs = puma_inputs
  else:
    if images is not None or features is not None:
      raise ValueError("images/features are for a PumaModel; this is a text-only model")
    cfg = model.config
    arrays = _llama_prompts(cfg, prompt_ids, attention_mask, max_new_tokens)
    inputs = llama_inputs
  if temperature < 0:
    raise ValueError(f"temperature={temperature} must be >= 0")
  if top_k is not None and not 1 <= top_k <= cfg.vocab_size:
    raise ValueError(f"top_k={top_k} must be in [1, vocab_size={cfg.vocab_size}]")
  if top_p is not None and not 0.0 < top_p <= 1.0:
    raise ValueError(f"top_p={top_p} must be in (0, 1]")
  stops = cfg.eos_token_ids if stop_tokens is None else tuple(int(s) for s in stop_tokens)
  capacity = bucket(max_new_tokens)
  allowed = None if allowed_tokens is None else allowed_mask(allowed_tokens, cfg.vocab_size)
  sampler = Sampler(
    greedy=temperature == 0.0,
    filtered=top_k is not None or top_p is not None,
    constrained=allowed is not None,
  )
  graphdef, state = nnx.split(model)
  out = _generate(
    graphdef,
    state,
    jax.tree.map(jnp.asarray, arrays),
    images,
    features,
    jax.random.key(seed),
    jnp.asarray(stops or (-2,), jnp.int32),
    jnp.int32(max_new_tokens),
    jnp.float32(max(temperature, 1e-6)),
    jnp.int32(top_k or 0),
    jnp.float32(top_p if top_p is not None else 1.0),
    None if allowed is None else jnp.asarray(allowed),
    inputs=inputs,
    capacity=capacity,
    sampler=sampler,
  )
  return trim_at_stop(out, max_new_tokens, stops)


def allowed_mask(token_ids: Sequence[int], vocab_size: int) -> np.ndarray:
  """The bool (vocab_size,) mask of `token_ids`, checked: a token outside the vocabulary or an
  empty set would leave nothing to generate."""
  ids = np.asarray(list(token_ids), np.int64).reshape(-1)
  if ids.size == 0:
    raise ValueError("allowed_tokens is empty: nothing could be generated")
  if ids.min() < 0 or ids.max() >= vocab_size:
    raise ValueError(
      f"allowed_tokens out of range [{ids.min()}, {ids.max()}] for vocab_size={vocab_size}"
    )
  mask = np.zeros(vocab_size, bool)
  mask[ids] = True
  return mask

"""PumaModel generation with the KV cache: image features coarse to fine, and text.

Prompts (`sequence.build_prompt` dicts) are left-padded to a power-of-two bucket so one compiled
function serves prompts of different lengths. Image-feature generation feeds each predicted
feature back as the next input (f4, then f3, ... f0) and stops after the finest requested scale.
Everything after the prompt runs inside one jitted `lax.scan` / `lax.while_loop`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from puma_jax.inference.text import Sampler, bucket, decode_loop, trim_at_stop
from puma_jax.models import pooling
from puma_jax.sequence import IMAGE_TOKENS, SCALE_OFFSET

SCALE_NAMES = pooling.SCALE_NAMES


def slots_through(scale: str | int) -> int:
  """Feature slots generated to reach scale `scale` (f4: 1, f3: 5, f2: 21, f1: 85, f0: 341)."""
  s = pooling.scale_index(scale) if isinstance(scale, str) else int(scale)
  if not 0 <= s < 5:
    raise ValueError(f"unknown scale {scale!r}; scales are {SCALE_NAMES}")
  return SCALE_OFFSET[s] + pooling.SCALE_TOKENS[s]


def scale_slice(features: jax.Array, scale: str | int) -> jax.Array:
  """The tokens of one scale from generated features (B, n, F) laid out f4 first."""
  s = pooling.scale_index(scale) if isinstance(scale, str) else int(scale)
  start, n = SCALE_OFFSET[s], pooling.SCALE_TOKENS[s]
  if features.shape[1] < start + n:
    raise ValueError(f"features hold {features.shape[1]} slots; scale {SCALE_NAMES[s]} needs "
                     f"{start + n}")
  return features[:, start:start + n]


def pad_prompts(prompts: Sequence[dict], max_images: int, context: int,
                extra: int) -> dict[str, np.ndarray]:
  """Left-pads prompt dicts into (B, P) arrays with an attention mask."""
  if not prompts:
    raise ValueError("no prompts given")
  lens = [len(p["tokens"]) for p in prompts]
  for i, n in enumerate(lens):
    if n + extra > context:
      raise ValueError(f"prompt {i} has {n} positions; with {extra} to generate it exceeds the "
                       f"context length {context} (llm.max_position_embeddings)")
    if prompts[i]["num_images"] > max_images:
      raise ValueError(f"prompt {i} uses {prompts[i]['num_images']} images, more than the "
                       f"{max_images} given")
  p = bucket(max(lens))
  out = {"tokens": np.zeros((len(prompts), p), np.int32),
         "image_index": np.full((len(prompts), p), -1, np.int32),
         "image_token": np.full((len(prompts), p), -1, np.int32),
         "mask": np.zeros((len(prompts), p), bool)}
  for i, pr in enumerate(prompts):
    n = lens[i]
    for k in ("tokens", "image_index", "image_token"):
      out[k][i, p - n:] = pr[k]
    out["mask"][i, p - n:] = True
  return out


def _prefill(model, arrays, image_feats, slots):
  feats = model.gather_features(image_feats, arrays["image_index"], arrays["image_token"])
  x = model.input_embeddings(arrays["tokens"], arrays["image_index"], arrays["image_token"],
                             feats)
  cache = model.llm.init_cache(x.shape[0], slots)
  return model.llm.decode_embeddings(x, attention_mask=arrays["mask"], cache=cache)


def _image_features(model, images, features):
  if features is not None:
    return features
  return model.encode_images(images)


@functools.partial(jax.jit, static_argnames=("graphdef", "num_slots"))
def _gen_features(graphdef, state, arrays, images, features, *, num_slots):
  model = nnx.merge(graphdef, state)
  image_feats = _image_features(model, images, features)
  p = arrays["tokens"].shape[1]
  hidden, cache = _prefill(model, arrays, image_feats, p + num_slots)
  last = hidden[:, -1]
  router = model.router(last).astype(jnp.float32) if model.router is not None else None
  first = model.head(last)

  def step(carry, j):
    f, cache = carry
    e = model.slot_embed(f, jnp.full((f.shape[0],), j))
    h, cache = model.llm.decode_embeddings(e[:, None], cache=cache)
    nxt = model.head(h[:, 0])
    return (nxt, cache), nxt

  if num_slots > 1:
    _, rest = jax.lax.scan(step, (first, cache), jnp.arange(num_slots - 1))
    feats = jnp.concatenate([first[:, None], jnp.moveaxis(rest, 0, 1)], axis=1)
  else:
    feats = first[:, None]
  return feats.astype(jnp.float32), router


def _check_images(model, images, features):
  if features is None and images is None:
    return
  c = model.config
  if features is not None:
    if features.ndim != 4 or features.shape[2:] != (IMAGE_TOKENS, c.feature_dim):
      raise ValueError(f"image features must be (batch, images, {IMAGE_TOKENS}, "
                       f"{c.feature_dim}); got {tuple(features.shape)}")
    return
  want = (c.clip.image_size, c.clip.image_size, c.clip.num_channels)
  if images.ndim != 5 or tuple(images.shape[2:]) != want:
    raise ValueError(f"images must be preprocessed (batch, images, {want[0]}, {want[1]}, "
                     f"{want[2]}) arrays (see clip.preprocess_pil); got {tuple(images.shape)}")


def _image_inputs(model, n_rows, images, features):
  _check_images(model, images, features)
  if images is None and features is None:
    c = model.config
    features = jnp.zeros((n_rows, 1, IMAGE_TOKENS, c.feature_dim), jnp.float32)
  m = (features if features is not None else images).shape[1]
  return (None if images is None else jnp.asarray(images),
          None if features is None else jnp.asarray(features), m)


def generate_features(model, prompts: Sequence[dict], through: str | int = "f0", *,
                      images=None, features=None):
  """Generates image features coarse to fine after prompts that end in `[IMG]`.

  Returns (features (B, slots, F) with f4 first up to scale `through`, router logits (B, 5) or
  None). `images` (B, M, H, W, 3) preprocessed, or `features` (B, M, 341, F), feed the prompts'
  input images.
  """
  num_slots = slots_through(through)
  images, features, m = _image_inputs(model, len(prompts), images, features)
  arrays = pad_prompts(prompts, m, model.config.llm.max_position_embeddings, num_slots)
  for i, pr in enumerate(prompts):
    if pr["tokens"][-1] != model.config.img_start_id:
      raise ValueError(f"prompt {i} must end with [IMG] (build it with open_image=True)")
  graphdef, state = nnx.split(model)
  return _gen_features(graphdef, state, jax.tree.map(jnp.asarray, arrays), images, features,
                       num_slots=num_slots)


@functools.partial(jax.jit, static_argnames=("graphdef", "capacity", "sampler"))
def _gen_text(graphdef, state, arrays, images, features, key, stop_ids, num_steps, temperature,
              top_k, top_p, *, capacity, sampler):
  model = nnx.merge(graphdef, state)
  image_feats = _image_features(model, images, features)
  p = arrays["tokens"].shape[1]
  hidden, cache = _prefill(model, arrays, image_feats, p + capacity)

  def step(prev, cache):
    h, cache = model.llm.decode_embeddings(model.llm.embed(prev[:, None]), cache=cache)
    return model.llm.logits(h)[:, -1], cache

  return decode_loop(step, model.llm.logits(hidden[:, -1:])[:, 0], cache, key, stop_ids,
                     num_steps, temperature, top_k, top_p, capacity=capacity, sampler=sampler)


def generate_text(model, prompts: Sequence[dict], max_new_tokens: int, *, images=None,
                  features=None, temperature: float = 0.0, top_k: int | None = None,
                  top_p: float | None = None, stop_tokens: Sequence[int] | None = None,
                  seed: int = 0) -> list[list[int]]:
  """Text after multimodal prompts; each list ends at (and includes) its first stop token."""
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
  cfg = model.config.llm
  images, features, m = _image_inputs(model, len(prompts), images, features)
  arrays = pad_prompts(prompts, m, cfg.max_position_embeddings, max_new_tokens)
  stops = cfg.eos_token_ids if stop_tokens is None else tuple(int(s) for s in stop_tokens)
  capacity = bucket(max_new_tokens)
  sampler = Sampler(greedy=temperature == 0.0, filtered=top_k is not None or top_p is not None)
  graphdef, state = nnx.split(model)
  out = _gen_text(graphdef, state, jax.tree.map(jnp.asarray, arrays), images, features,
                  jax.random.key(seed), jnp.asarray(stops or (-2,), jnp.int32),
                  jnp.int32(max_new_tokens), jnp.float32(max(temperature, 1e-6)),
                  jnp.int32(top_k or 0), jnp.float32(top_p if top_p is not None else 1.0),
                  capacity=capacity, sampler=sampler)
  return trim_at_stop(out, max_new_tokens, stops)

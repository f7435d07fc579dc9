"""PumaModel generation with the KV cache: image features coarse to fine.

Text generation (chat, grounding) is `inference.text.generate_text`, the same decode path as a
plain LLaMA; this module gives it the multimodal prompt arrays and input embeddings
(`inference.prompts`: `prompt_arrays`, `puma_inputs`; prompts are `sequence.build_prompt`
dicts, left-padded by `prompts.left_pad`). Image-feature generation feeds each predicted
feature back as the next input (f4, then f3, ... f0) and stops after the finest requested scale.
Everything after the prompt runs inside one jitted `lax.scan` / `lax.while_loop`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from puma_jax.inference.prompts import image_features, prompt_arrays, puma_inputs
from puma_jax.models import pooling
from puma_jax.sequence import SCALE_OFFSET

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
    raise ValueError(
      f"features hold {features.shape[1]} slots; scale {SCALE_NAMES[s]} needs {start + n}"
    )
  return features[:, start : start + n]


def _prefill(model, arrays, image_feats, slots):
  llm, x = puma_inputs(model, arrays, None, image_feats)
  cache = llm.init_cache(x.shape[0], slots)
  return llm.decode_embeddings(x, attention_mask=arrays["mask"], cache=cache)


@functools.partial(jax.jit, static_argnames=("graphdef", "num_slots"))
def _gen_features(graphdef, state, arrays, images, features, *, num_slots):
  model = nnx.merge(graphdef, state)
  image_feats = image_features(model, images, features)
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


def generate_features(
  model, prompts: Sequence[dict], through: str | int = "f0", *, images=None, features=None
):
  """Generates image features coarse to fine after prompts that end in `[IMG]`.

  Returns (features (B, slots, F) with f4 first up to scale `through`, router logits (B, 5) or
  None). `images` (B, M, H, W, 3) preprocessed, or `features` (B, M, 341, F), feed the prompts'
  input images.
  """
  num_slots = slots_through(through)
  arrays, images, features = prompt_arrays(
    model, prompts, num_slots, images=images, features=features
  )
  for i, pr in enumerate(prompts):
    if pr["tokens"][-1] != model.config.img_start_id:
      raise ValueError(f"prompt {i} must end with [IMG] (build it with open_image=True)")
  graphdef, state = nnx.split(model)
  return _gen_features(
    graphdef, state, jax.tree.map(jnp.asarray, arrays), images, features, num_slots=num_slots
  )

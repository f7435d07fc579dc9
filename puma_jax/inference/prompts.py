"""Prompt arrays for generation: left padding into power-of-two buckets, and the multimodal
prompts of a PumaModel (text tokens and image slots, their images or features).

Shared by `inference.text` (the one decode path for text) and `inference.generation` (image
features, coarse to fine); it imports neither, so they do not import each other.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from puma_jax.sequence import IMAGE_TOKENS


def bucket(n: int, minimum: int = 16) -> int:
  """Smallest power of two >= n (and >= minimum)."""
  return max(minimum, 1 << max(0, int(n) - 1).bit_length())


def left_pad(
  rows: Sequence[Mapping[str, Sequence[int]]], fill: Mapping[str, int] | None = None
) -> dict[str, np.ndarray]:
  """Left-pads rows of equal-length 1-D int fields into (B, P) int32 arrays plus a bool "mask",
  P a power-of-two bucket: every row then writes its next token into the same cache slot, and
  one compiled function serves prompts of different lengths. `fill`: pad value per field (0)."""
  if not rows:
    raise ValueError("no prompts given")
  fill = dict(fill or {})
  lens = [len(r["tokens"]) for r in rows]
  p = bucket(max(lens))
  out = {k: np.full((len(rows), p), fill.get(k, 0), np.int32) for k in rows[0]}
  out["mask"] = np.zeros((len(rows), p), bool)
  for i, (r, n) in enumerate(zip(rows, lens)):
    for k in rows[0]:
      out[k][i, p - n :] = r[k]
    out["mask"][i, p - n :] = True
  return out


def prompt_arrays(model, prompts: Sequence[dict], extra: int, *, images=None, features=None):
  """Checked, left-padded prompt arrays for `extra` generated positions, and the image inputs.

  Returns (arrays (B, P) with "mask", images or None, features or None)."""
  images, features, max_images = image_inputs(model, len(prompts), images, features)
  context = model.config.llm.max_position_embeddings
  for i, pr in enumerate(prompts):
    n = len(pr["tokens"])
    if n + extra > context:
      raise ValueError(
        f"prompt {i} has {n} positions; with {extra} to generate it exceeds the "
        f"context length {context} (llm.max_position_embeddings)"
      )
    if pr["num_images"] > max_images:
      raise ValueError(
        f"prompt {i} uses {pr['num_images']} images, more than the {max_images} given"
      )
  rows = [{k: pr[k] for k in ("tokens", "image_index", "image_token")} for pr in prompts]
  arrays = left_pad(rows, fill={"image_index": -1, "image_token": -1})
  return arrays, images, features


def puma_inputs(model, arrays, images, features):
  """(language model, input embeddings) of multimodal prompts: text tokens and image slots."""
  image_feats = image_features(model, images, features)
  feats = model.gather_features(image_feats, arrays["image_index"], arrays["image_token"])
  x = model.input_embeddings(arrays["tokens"], arrays["image_index"], arrays["image_token"], feats)
  return model.llm, x


def image_features(model, images, features):
  if features is not None:
    return features
  return model.encode_images(images)


def check_images(model, images, features):
  if features is None and images is None:
    return
  c = model.config
  if features is not None:
    if features.ndim != 4 or features.shape[2:] != (IMAGE_TOKENS, c.feature_dim):
      raise ValueError(
        f"image features must be (batch, images, {IMAGE_TOKENS}, "
        f"{c.feature_dim}); got {tuple(features.shape)}"
      )
    return
  want = (c.clip.image_size, c.clip.image_size, c.clip.num_channels)
  if images.ndim != 5 or tuple(images.shape[2:]) != want:
    raise ValueError(
      f"images must be preprocessed (batch, images, {want[0]}, {want[1]}, "
      f"{want[2]}) arrays (see clip.preprocess_pil); got {tuple(images.shape)}"
    )


def image_inputs(model, n_rows, images, features):
  check_images(model, images, features)
  if images is None and features is None:
    c = model.config
    features = jnp.zeros((n_rows, 1, IMAGE_TOKENS, c.feature_dim), jnp.float32)
  m = (features if features is not None else images).shape[1]
  return (
    None if images is None else jnp.asarray(images),
    None if features is None else jnp.asarray(features),
    m,
  )

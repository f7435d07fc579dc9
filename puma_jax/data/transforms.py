"""Per-example transforms after parsing: resolution filter, crop, CLIP / VAE views, tokenization,
and a default fixed-shape array encoder for batching.

Image views are uint8: normalization (CLIP mean/std, VAE [-1, 1]) happens on the accelerator,
which keeps host->device transfers 4x smaller. `clip_view` followed by `/255` and CLIP mean/std
is exactly `models.clip.preprocess_pil` (the public PUMA encoder transform).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
from PIL import Image

from puma_jax.data import imaging
from puma_jax.data.schema import EXAMPLE_KIND_IDS, BadRecord, Example, Skip

Tokenize = Callable[[str], list]


@dataclasses.dataclass(frozen=True)
class ImageOptions:
  clip_size: int = 224  # CLIP encoder input (224 for ViT-L/14; 32 for the tiny encoder)
  vae_size: int = 0  # VAE/decoder target resolution; 0: no VAE view
  min_resolution: int = 0  # skip images whose short side is below this (512 for decoders)
  center_crop: bool = True  # crop the centred square first (aspect kept; CLIP and VAE views
  # then show the same pixels); False: squash like PUMA's encoder


class Preprocess:
  """Example -> Example with CLIP-size `images`, `vae_images`, re-framed boxes and token ids.
  Skips pass through; a BadRecord (e.g. too small) becomes a Skip."""

  def __init__(self, image: ImageOptions = ImageOptions(), tokenize: Tokenize | None = None):
    self.image, self.tokenize = image, tokenize

  def __call__(self, ex):
    if isinstance(ex, Skip):
      return ex
    try:
      return self._apply(ex)
    except BadRecord as e:
      return Skip(e.reason, ex.source, ex.key, e.detail)
    except (TypeError, ValueError, OSError, IndexError) as e:
      return Skip(f"unexpected:{type(e).__name__}", ex.source, ex.key, str(e)[:300])

  def _apply(self, ex: Example) -> Example:
    o = self.image
    if o.min_resolution and ex.images:
      short = min(min(im.shape[:2]) for im in ex.images)
      if short < o.min_resolution:
        raise BadRecord("too_small", f"short side {short} < {o.min_resolution}")
    clip, vae = [], []
    boxes, mask, phrases = ex.boxes, ex.mask, ex.phrases
    for i, im in enumerate(ex.images):
      h, w = im.shape[:2]
      if o.center_crop:
        crop = imaging.center_crop_box(h, w)
        top, left, s, _ = crop
        im = im[top : top + s, left : left + s]
        if ex.kind == "grounding" and boxes is not None:
          boxes, keep = imaging.crop_boxes(boxes, h, w, crop)
          if not keep.any():
            raise BadRecord("boxes_cropped_out", "every box lies outside the centre crop")
          boxes = boxes[keep]
          phrases = tuple(p for p, k in zip(phrases, keep) if k)
        if mask is not None and i == len(ex.images) - 1:
          mask = mask[top : top + s, left : left + s]
      clip.append(imaging.resize(im, o.clip_size))
      if o.vae_size:
        vae.append(imaging.resize(im, o.vae_size, Image.BICUBIC))
    if mask is not None:
      mask = imaging.resize(mask, o.clip_size, Image.NEAREST)
    out = dataclasses.replace(
      ex,
      images=tuple(clip),
      vae_images=tuple(vae),
      boxes=boxes,
      phrases=phrases,
      mask=mask,
      token_ids=dict(ex.token_ids),
    )
    if self.tokenize is not None:
      tokenize_example(out, self.tokenize)
    return out


def tokenize_example(ex: Example, tokenize: Tokenize) -> Example:
  """Fill `ex.token_ids` for every text field present ("text", "instruction", "turn.{i}")."""

  def tok(s):
    ids = tokenize(s)
    if not isinstance(ids, (list, tuple, np.ndarray)):
      raise TypeError(f"tokenize must return a list of ints; got {type(ids).__name__}")
    return [int(t) for t in ids]

  if ex.text:
    ex.token_ids["text"] = tok(ex.text)
  if ex.instruction:
    ex.token_ids["instruction"] = tok(ex.instruction)
  for i, t in enumerate(ex.conversation):
    ex.token_ids[f"turn.{i}"] = tok(t.text)
  return ex


def quantize_boxes(boxes: np.ndarray, bins: int = 224) -> np.ndarray:
  """Normalized xyxy -> integer bins 0..bins-1 (PUMA's 224 position tokens)."""
  return np.clip(np.floor(np.asarray(boxes) * bins), 0, bins - 1).astype(np.int32)


class ArrayEncoder:
  """Example -> dict of fixed-shape arrays, so examples of every kind batch together.

  Keys: kind (int32, `schema.EXAMPLE_KIND_IDS`), images (uint8 [max_images, clip, clip, 3]),
  vae_images (uint8 [max_images, vae, vae, 3], when vae_size), num_images, text_ids (int32
  [max_text_len], the main text: caption / document / instruction / the conversation's turns
  joined), text_len, boxes (float32 [max_boxes, 4]), num_boxes. It is the default for
  decoder training and the smoke pipeline; the MLLM uses `puma_jax.sequence` instead.
  Texts longer than max_text_len are truncated (text_len says how much was kept).
  """

  def __init__(
    self,
    image: ImageOptions,
    max_images: int = 2,
    max_text_len: int = 64,
    max_boxes: int = 8,
    pad_id: int = 0,
  ):
    self.image, self.max_images, self.max_text_len = image, max_images, max_text_len
    self.max_boxes, self.pad_id = max_boxes, pad_id

  def __call__(self, ex):
    if isinstance(ex, Skip):
      return ex
    if len(ex.images) > self.max_images:
      return Skip("too_many_images", ex.source, ex.key, f"{len(ex.images)} > {self.max_images}")
    c, v = self.image.clip_size, self.image.vae_size
    images = np.zeros((self.max_images, c, c, 3), np.uint8)
    for i, im in enumerate(ex.images):
      images[i] = im
    out = {
      "kind": np.int32(EXAMPLE_KIND_IDS[ex.kind]),
      "images": images,
      "num_images": np.int32(len(ex.images)),
    }
    if v:
      vae = np.zeros((self.max_images, v, v, 3), np.uint8)
      for i, im in enumerate(ex.vae_images):
        vae[i] = im
      out["vae_images"] = vae
    ids = list(ex.token_ids.get("text", []) or ex.token_ids.get("instruction", []))
    for i in range(len(ex.conversation)):
      ids += ex.token_ids.get(f"turn.{i}", [])
    ids = ids[: self.max_text_len]
    text = np.full((self.max_text_len,), self.pad_id, np.int32)
    text[: len(ids)] = ids
    out["text_ids"], out["text_len"] = text, np.int32(len(ids))
    boxes = np.zeros((self.max_boxes, 4), np.float32)
    nb = 0 if ex.boxes is None else min(len(ex.boxes), self.max_boxes)
    if nb:
      boxes[:nb] = ex.boxes[:nb]
    out["boxes"], out["num_boxes"] = boxes, np.int32(nb)
    return out

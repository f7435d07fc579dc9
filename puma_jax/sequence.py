"""PUMA training sequences: text and multi-granular image features in one token stream.

An example is a list of segments. Each image becomes `[IMG] f4 f3 f2 f1 f0 [/IMG]`: 341 feature
slots, coarse to fine, between two special tokens (docs/DESIGN.md §6). The builder returns
per-position arrays; the model fills feature slots in-graph from the CLIP features of the images
(`image_index`, `image_token` say which image and which of its 341 tokens).

Supervision follows the next-token convention: position p predicts position p+1.
  * text: cross-entropy on `text_target[p]` where `text_mask[p]` (next token is a supervised
    token);
  * features: MSE on the feature at p+1 with weight `feature_weight[p]` (next slot is a feature
    of a supervised image; its scale's weight, docs/DESIGN.md §7: f4..f0 = 1024, 512, 64, 8, 1).
Examples are packed with `segment_ids` (1, 2, ...; 0 = padding) and positions restarting per
example, so no attention crosses example boundaries.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from puma_jax.models.pooling import SCALE_NAMES, SCALE_TOKENS

# Generation order inside an image: coarse to fine.
GEN_ORDER = (4, 3, 2, 1, 0)  # scale indices f4, f3, f2, f1, f0
SCALE_WEIGHTS = {4: 1024.0, 3: 512.0, 2: 64.0, 1: 8.0, 0: 1.0}
IMAGE_TOKENS = sum(SCALE_TOKENS)  # 341

# Offsets of each scale inside an image's 341 slots (f4 first).
SCALE_OFFSET = {}
_o = 0
for _s in GEN_ORDER:
  SCALE_OFFSET[_s] = _o
  _o += SCALE_TOKENS[_s]
del _o, _s
# Per slot (0..340): its scale index and position within the scale.
SLOT_SCALE = np.concatenate([np.full(SCALE_TOKENS[s], s) for s in GEN_ORDER]).astype(np.int32)
SLOT_POS = np.concatenate([np.arange(SCALE_TOKENS[s]) for s in GEN_ORDER]).astype(np.int32)

# The sequence kinds: the layouts `build` knows (the data's example kinds are
# `data.schema.EXAMPLE_KINDS`; a packed row's `kind_id` indexes this tuple).
KINDS = ("t2i", "i2t", "chat", "edit", "conditional", "grounding", "text")
# (ours) The scale each generating kind decodes by default, from the paper's use of the scales
# (docs/DESIGN.md §1, §9): coarse for diverse text-to-image, fine where the output must keep the
# input's layout. These are also the router's training labels unless an example overrides them.
KIND_SCALE = {"t2i": 3, "edit": 1, "conditional": 0}
SYSTEM_MESSAGE = (
  "A chat between a curious user and an artificial intelligence assistant. The "
  "assistant gives helpful, detailed, and polite answers to the user's questions."
)
NUM_POSITION_TOKENS = 224


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
  bos: int
  eos: int
  pad: int
  img_start: int
  img_end: int
  pos0: int  # id of the first of the 224 grounding position tokens (contiguous)

  @property
  def positions(self) -> range:
    """The ids of the 224 position tokens, the only tokens a box is made of."""
    return range(self.pos0, self.pos0 + NUM_POSITION_TOKENS)


@dataclasses.dataclass(frozen=True)
class Text:
  text: str
  supervised: bool = False
  # Close with `</s>` (supervised like the text): LLaVA-1.5 ends every assistant turn so, and
  # generation stops there; without it the position after an answer that a later turn follows
  # has no target, and only last answers teach stopping (docs/DESIGN.md §10). The example's
  # final `</s>` is added by `build`.
  eos: bool = False


@dataclasses.dataclass(frozen=True)
class Image:
  index: int  # into the example's image list
  supervised: bool = False
  # Generated images may stop after a coarser scale: slots of finer scales are then not
  # supervised. None = all five scales.
  scales: tuple[int, ...] | None = None
  # Scale the router should pick for this generated image (0..4); None = the kind's default.
  route: int | None = None


@dataclasses.dataclass(frozen=True)
class Boxes:
  boxes: tuple[tuple[float, float, float, float], ...]  # normalized xyxy in [0, 1]
  supervised: bool = False


Segment = Text | Image | Boxes


def box_to_bins(box: Sequence[float]) -> list[int]:
  """Normalized [x_min, y_min, x_max, y_max] -> 4 bins in [0, 223]."""
  b = np.asarray(box, np.float64)
  if b.shape != (4,) or not np.all(np.isfinite(b)):
    raise ValueError(f"a box must be 4 finite numbers [x_min, y_min, x_max, y_max]; got {box}")
  if np.any(b < 0) or np.any(b > 1) or b[0] > b[2] or b[1] > b[3]:
    raise ValueError(f"box {list(box)} is not a normalized xyxy box inside [0, 1]")
  return [int(min(NUM_POSITION_TOKENS - 1, np.floor(v * NUM_POSITION_TOKENS))) for v in b]


def bins_to_box(bins: Sequence[int]) -> list[float]:
  """Bin centres back to normalized coordinates (error <= 1/448)."""
  return [(int(v) + 0.5) / NUM_POSITION_TOKENS for v in bins]


@dataclasses.dataclass
class Built:
  """One example's arrays (length = its number of positions)."""

  tokens: np.ndarray  # int32 token ids (pad at feature slots)
  image_index: np.ndarray  # int32 image of the example at feature slots, -1 elsewhere
  image_token: np.ndarray  # int32 slot 0..340 within the image, -1 elsewhere
  text_target: np.ndarray  # int32 next token id (pad where none)
  text_mask: np.ndarray  # bool: text CE at this position
  feature_weight: np.ndarray  # float32: scale weight of the next slot's feature MSE (0: none)
  target_scale: np.ndarray  # int32 scale of the next feature slot, -1 elsewhere (for metrics)
  router_label: np.ndarray  # int32 scale to decode, at the [IMG] of a generated image; else -1
  num_images: int
  kind: int  # index in KINDS

  def __len__(self):
    return len(self.tokens)


def build(
  segments: Sequence[Segment],
  encode: Callable[[str], Sequence[int]],
  special: SpecialTokens,
  kind: str,
  num_images: int | None = None,
) -> Built:
  """`<s> segments... </s>`; the final `</s>` is supervised if the last segment is."""
  if kind not in KINDS:
    raise ValueError(f"unknown sequence kind {kind!r}; kinds are {KINDS}")
  toks: list[int] = [special.bos]
  img_idx: list[int] = [-1]
  img_tok: list[int] = [-1]
  sup: list[bool] = [False]  # is this position's *content* supervised (predicted from p-1)?
  route: dict[int, int] = {}  # position of [IMG] -> router label
  n_img = 0
  for seg in segments:
    if isinstance(seg, Text):
      ids = list(encode(seg.text)) + ([special.eos] if seg.eos else [])
      toks += ids
      img_idx += [-1] * len(ids)
      img_tok += [-1] * len(ids)
      sup += [seg.supervised] * len(ids)
    elif isinstance(seg, Boxes):
      for box in seg.boxes:
        ids = [special.pos0 + b for b in box_to_bins(box)]
        toks += ids
        img_idx += [-1] * 4
        img_tok += [-1] * 4
        sup += [seg.supervised] * 4
    elif isinstance(seg, Image):
      if seg.index < 0:
        raise ValueError(f"image index {seg.index} must be >= 0")
      n_img = max(n_img, seg.index + 1)
      keep = set(range(5)) if seg.scales is None else set(seg.scales)
      if not keep <= set(range(5)):
        raise ValueError(
          f"image scales {seg.scales} must be scale indices 0..4 ({', '.join(SCALE_NAMES)})"
        )
      if seg.supervised and (seg.route is not None or kind in KIND_SCALE):
        label = seg.route if seg.route is not None else KIND_SCALE[kind]
        if not 0 <= label < 5:
          raise ValueError(f"image route {label} must be a scale index 0..4")
        route[len(toks)] = label
      toks.append(special.img_start)
      img_idx.append(-1)
      img_tok.append(-1)
      sup.append(False)  # [IMG] is given: the prompt decides that an image follows
      toks += [special.pad] * IMAGE_TOKENS
      img_idx += [seg.index] * IMAGE_TOKENS
      img_tok += list(range(IMAGE_TOKENS))
      sup += [seg.supervised and int(SLOT_SCALE[j]) in keep for j in range(IMAGE_TOKENS)]
      toks.append(special.img_end)
      img_idx.append(-1)
      img_tok.append(-1)
      sup.append(seg.supervised and 0 in keep)  # [/IMG] closes a fully generated image
    else:
      raise TypeError(f"unknown segment {seg!r}")
  toks.append(special.eos)
  img_idx.append(-1)
  img_tok.append(-1)
  last_sup = bool(segments) and bool(getattr(segments[-1], "supervised", False))
  sup.append(last_sup)

  toks_a = np.asarray(toks, np.int32)
  idx_a = np.asarray(img_idx, np.int32)
  tok_a = np.asarray(img_tok, np.int32)
  sup_a = np.asarray(sup, bool)
  nxt_is_feat = np.append(idx_a[1:] >= 0, False)
  nxt_sup = np.append(sup_a[1:], False)
  text_target = np.append(toks_a[1:], special.pad).astype(np.int32)
  text_mask = nxt_sup & ~nxt_is_feat
  nxt_slot = np.append(tok_a[1:], -1)
  target_scale = np.where(nxt_is_feat, SLOT_SCALE[np.maximum(nxt_slot, 0)], -1).astype(np.int32)
  weights = np.vectorize(lambda s: SCALE_WEIGHTS.get(int(s), 0.0), otypes=[np.float32])(
    target_scale
  )
  feature_weight = np.where(nxt_is_feat & nxt_sup, weights, 0.0).astype(np.float32)
  router_label = np.full(len(toks_a), -1, np.int32)
  for p, label in route.items():
    router_label[p] = label
  return Built(
    tokens=toks_a,
    image_index=idx_a,
    image_token=tok_a,
    text_target=text_target,
    text_mask=text_mask,
    feature_weight=feature_weight,
    target_scale=target_scale,
    router_label=router_label,
    num_images=max(n_img, num_images or 0),
    kind=KINDS.index(kind),
  )


# ----------------------------------------------------------------------------------------------
# Sequence templates (docs/DESIGN.md §10)


def t2i(caption: str) -> list[Segment]:
  return [Text(caption), Image(0, supervised=True)]


def i2t(caption: str) -> list[Segment]:
  return [Image(0), Text(caption, supervised=True)]


def chat(
  turns: Sequence[tuple[str, str]], with_image: bool = True, system: str = SYSTEM_MESSAGE
) -> list[Segment]:
  """LLaVA-1.5 style: `SYSTEM USER: <image>\\nQ ASSISTANT: A</s>USER: Q2 ASSISTANT: A2</s>`;
  answers and their `</s>` supervised (the last `</s>` is `build`'s)."""
  segs: list[Segment] = [Text(system + " USER: ")]
  for k, (question, answer) in enumerate(turns):
    if k == 0 and with_image:
      segs += [Image(0), Text("\n" + question + " ASSISTANT:")]
    else:
      segs += [Text(("USER: " if k else "") + question + " ASSISTANT:")]
    segs += [Text(" " + answer, supervised=True, eos=k < len(turns) - 1)]
  return segs


def edit(instruction: str) -> list[Segment]:
  return [Image(0), Text(instruction), Image(1, supervised=True)]


COND_PROMPTS = {
  "canny": "Generate an image from this edge map.",
  "inpaint": "Fill in the masked region of this image.",
  "colorize": "Colorize this grayscale image.",
}


def conditional(cond_type: str, prompt: str = "") -> list[Segment]:
  if cond_type not in COND_PROMPTS:
    raise ValueError(f"unknown condition type {cond_type!r}; choose from {sorted(COND_PROMPTS)}")
  text = COND_PROMPTS[cond_type] + (" " + prompt if prompt else "")
  return [Image(0), Text(text), Image(1, supervised=True)]


# (ours, docs/DESIGN.md §10) The task marker of grounding, given after the image. Without it a
# grounded caption shares every token up to its first box with an i2t caption of the same image,
# and a model asked for a phrase's box continues the caption instead.
GROUNDING_PROMPT = "Caption this image with a box after each object.\n"


def grounded_caption(
  caption: str,
  spans: Sequence[tuple[int, int]],
  boxes: Sequence[Sequence[float]],
  supervised: bool = True,
) -> list[Segment]:
  """GRIT-style grounded caption: image, `GROUNDING_PROMPT`, the caption with each phrase (a
  (start, end) character span of `caption`) followed by its box as 4 position tokens.

  `supervised` marks the caption and the boxes; the marker is always given, never predicted."""
  if len(spans) != len(boxes):
    raise ValueError(
      f"a grounded caption needs one box per phrase: {len(spans)} phrase spans, {len(boxes)} boxes"
    )
  segs: list[Segment] = [Image(0), Text(GROUNDING_PROMPT)]
  pos = 0
  for i in sorted(range(len(spans)), key=lambda i: spans[i][1]):
    end = int(spans[i][1])
    if not 0 <= end <= len(caption):
      raise ValueError(
        f"phrase span {tuple(spans[i])} ends outside the caption ({len(caption)} characters)"
      )
    if end > pos:
      segs.append(Text(caption[pos:end], supervised))
      pos = end
    segs.append(Boxes((tuple(float(v) for v in boxes[i]),), supervised))
  if pos < len(caption):
    segs.append(Text(caption[pos:], supervised))
  return segs


def grounding_prompt(
  caption: str, spans: Sequence[tuple[int, int]], boxes: Sequence[Sequence[float]] = ()
) -> list[Segment]:
  """The prompt that asks for the box of the last span's phrase: exactly the grounded caption's
  segments up to that phrase's end, each earlier phrase followed by its given box (`boxes`, one
  per earlier span). One span at the start of `caption`: image, marker, phrase."""
  if not spans:
    raise ValueError("a grounding prompt needs the span of the phrase to ground")
  if len(boxes) != len(spans) - 1:
    raise ValueError(
      f"give the boxes of the {len(spans) - 1} phrase(s) before the asked one; got {len(boxes)}"
    )
  end = int(spans[-1][1])
  if not 0 < end <= len(caption):
    raise ValueError(f"the asked phrase {tuple(spans[-1])} is not inside the caption {caption!r}")
  if any(int(e) > end for _, e in spans[:-1]):
    raise ValueError(f"the asked phrase {tuple(spans[-1])} must end after every earlier phrase")
  return grounded_caption(caption[:end], spans[:-1], boxes, supervised=False)


def grounding(phrase: str, boxes: Sequence[Sequence[float]]) -> list[Segment]:
  """A grounded caption that is one phrase with its boxes."""
  return grounded_caption(phrase, [(0, len(phrase))] * len(boxes), boxes)


def text_only(text: str) -> list[Segment]:
  return [Text(text, supervised=True)]


# ----------------------------------------------------------------------------------------------
# Packing


FIELDS = (
  "tokens",
  "image_index",
  "image_token",
  "text_target",
  "text_mask",
  "feature_weight",
  "target_scale",
  "router_label",
)


def pack(
  examples: Sequence[Built], seq_len: int, max_images: int, pad_id: int
) -> dict[str, np.ndarray]:
  """Packs examples greedily, in order, into one row of `seq_len` positions.

  Returns the row's arrays plus `segment_ids`, `positions` and `kind_id`; `image_index` is
  re-based so it indexes the row's image list (the first `max_images` images). Raises if an
  example does not fit at all; returns only the examples that fit under key `packed`.
  """
  row = {k: [] for k in FIELDS}
  seg, pos, kind = [], [], []
  used, images = 0, 0
  packed = 0
  for i, ex in enumerate(examples):
    if len(ex) > seq_len:
      raise ValueError(f"example of {len(ex)} positions is longer than seq_len={seq_len}")
    if used + len(ex) > seq_len or images + ex.num_images > max_images:
      break
    for k in FIELDS:
      v = getattr(ex, k)
      if k == "image_index":
        v = np.where(v >= 0, v + images, -1)
      row[k].append(v)
    seg.append(np.full(len(ex), i + 1, np.int32))
    pos.append(np.arange(len(ex), dtype=np.int32))
    kind.append(np.full(len(ex), ex.kind, np.int32))
    used += len(ex)
    images += ex.num_images
    packed += 1
  pad = seq_len - used
  fill = {
    "tokens": pad_id,
    "image_index": -1,
    "image_token": -1,
    "text_target": pad_id,
    "text_mask": False,
    "feature_weight": 0.0,
    "target_scale": -1,
    "router_label": -1,
  }
  out = {}
  for k in FIELDS:
    parts = row[k] + [np.full(pad, fill[k], dtype=np.asarray(fill[k]).dtype)]
    dtype = {"text_mask": bool, "feature_weight": np.float32}.get(k, np.int32)
    out[k] = np.concatenate(parts).astype(dtype)
  out["segment_ids"] = np.concatenate(seg + [np.zeros(pad, np.int32)])
  out["positions"] = np.concatenate(pos + [np.zeros(pad, np.int32)])
  out["kind_id"] = np.concatenate(kind + [np.full(pad, -1, np.int32)])
  out["num_images"] = np.int32(images)
  out["packed"] = packed
  return out


def build_prompt(
  segments: Sequence[Segment],
  encode: Callable[[str], Sequence[int]],
  special: SpecialTokens,
  open_image: bool = False,
) -> dict[str, np.ndarray]:
  """An inference prompt: `<s> segments...` (no `</s>`), ending in `[IMG]` if `open_image`.

  Returns `tokens`, `image_index`, `image_token` (as in `build`) and `num_images`.
  """
  b = build(list(segments), encode, special, "text")
  keep = len(b) - 1  # drop </s>
  out = {
    "tokens": b.tokens[:keep],
    "image_index": b.image_index[:keep],
    "image_token": b.image_token[:keep],
  }
  if open_image:
    out = {
      "tokens": np.append(out["tokens"], special.img_start).astype(np.int32),
      "image_index": np.append(out["image_index"], -1).astype(np.int32),
      "image_token": np.append(out["image_token"], -1).astype(np.int32),
    }
  out["num_images"] = b.num_images
  return out

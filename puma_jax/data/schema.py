"""The example record every PUMA data source yields, and the skip marker for bad records.

An `Example` is what the sequence builder (`puma_jax.sequence`) consumes. Per kind (`Example.kind`):

- `t2i`: images (target,); `text` = caption (the prompt).
- `i2t`: images (image,); `text` = caption (the answer).
- `grounding`: images (image,); `text` = caption; `phrases[i]` = (start, end) character span of
  the phrase that `boxes[i]` locates.
- `text`: no images; `text` = the document.
- `chat`: 0..n images; `conversation` = turns; each image sits where `IMAGE_PLACEHOLDER`
  appears in the user turns (one placeholder per image, in order).
- `edit`: images (source, target); `instruction`.
- `conditional`: images (condition, target); `cond_type` in COND_TYPES; `text` = caption (may
  be empty); for `inpaint`, `mask` (H, W) uint8, 1 = the region to fill (black in condition).
- `image`: images (image,); `text` = caption if the record has one, else "". Decoder training
  (reconstruction from CLIP features) needs no caption.

Images are uint8 HWC RGB numpy arrays. `boxes` are float32 (N, 4) `[x_min, y_min, x_max, y_max]`
normalized to [0, 1] of the image as stored in `images` (after any crop the transforms apply,
boxes are re-expressed in the cropped frame). After `transforms.Preprocess`, `images` hold the
CLIP-resolution views and `vae_images` the VAE-resolution views of the same crop, and
`token_ids` maps "text", "instruction" and "turn.{i}" to token ids when a tokenizer is given;
`mask` is then at the CLIP view's resolution.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

# The kinds of `Example`: the sequence kinds (`puma_jax.sequence.KINDS`, same order so the ids
# agree) plus "image" (decoder training).
EXAMPLE_KINDS = ("t2i", "i2t", "chat", "edit", "conditional", "grounding", "text", "image")
EXAMPLE_KIND_IDS = {t: i for i, t in enumerate(EXAMPLE_KINDS)}
COND_TYPES = ("canny", "inpaint", "colorize")
ROLES = ("user", "assistant")
IMAGE_PLACEHOLDER = "<image>"
# How many images each kind carries (chat: any number up to a config limit).
NUM_IMAGES = {
  "t2i": 1,
  "i2t": 1,
  "grounding": 1,
  "text": 0,
  "edit": 2,
  "conditional": 2,
  "image": 1,
}


class BadRecord(Exception):
  """A record that must be skipped. `reason` is a short stable counter name."""

  def __init__(self, reason: str, detail: str = ""):
    super().__init__(f"{reason}: {detail}" if detail else reason)
    self.reason = reason
    self.detail = detail


@dataclasses.dataclass(frozen=True)
class Skip:
  """Marker that flows through the pipeline in place of a bad record, so it can be counted
  where it is dropped (the counters then live in iterator state, not in worker processes)."""

  reason: str
  source: str = ""
  key: str = ""
  detail: str = ""


@dataclasses.dataclass(frozen=True)
class Turn:
  role: str  # "user" or "assistant"
  text: str


@dataclasses.dataclass
class Example:
  kind: str  # one of EXAMPLE_KINDS
  key: str = ""  # "<source name>/<record key>": stable id, used for hashing
  source: str = ""  # source name from the data config
  images: tuple = ()  # uint8 HWC RGB arrays
  text: str = ""
  instruction: str = ""
  conversation: tuple = ()  # tuple[Turn, ...]
  boxes: np.ndarray | None = None  # float32 (N, 4), normalized xyxy
  phrases: tuple = ()  # tuple[(start, end), ...] character spans in `text`
  cond_type: str = ""
  mask: np.ndarray | None = None  # inpainting mask, uint8 (H, W) of images[1]'s frame
  vae_images: tuple = ()  # filled by transforms.Preprocess
  token_ids: dict[str, list[int]] = dataclasses.field(default_factory=dict)

  def validate(self) -> Example:
    """Raises BadRecord naming what is wrong; returns self when the record is usable."""
    validate(self)
    return self


def _check_image(img: Any, what: str) -> None:
  if not isinstance(img, np.ndarray):
    raise BadRecord("wrong_type:image", f"{what} is {type(img).__name__}, not an array")
  if img.dtype != np.uint8 or img.ndim != 3 or img.shape[-1] != 3:
    raise BadRecord("wrong_type:image", f"{what} must be uint8 HxWx3; got {img.dtype} {img.shape}")
  if img.shape[0] < 1 or img.shape[1] < 1:
    raise BadRecord("empty_image", f"{what} has shape {img.shape}")


def _check_text(value: Any, field: str, allow_empty: bool = False) -> None:
  if not isinstance(value, str):
    raise BadRecord(f"wrong_type:{field}", f"{field} is {type(value).__name__}")
  if not allow_empty and not value.strip():
    raise BadRecord(f"empty_{field}")


def validate(ex: Example) -> None:
  if ex.kind not in EXAMPLE_KINDS:
    raise BadRecord("unknown_kind", repr(ex.kind))
  if not isinstance(ex.images, tuple):
    raise BadRecord("wrong_type:images", type(ex.images).__name__)
  for i, img in enumerate(ex.images):
    _check_image(img, f"images[{i}]")
  want = NUM_IMAGES.get(ex.kind)
  if want is not None and len(ex.images) != want:
    raise BadRecord("wrong_image_count", f"{ex.kind} needs {want} image(s), got {len(ex.images)}")
  if ex.kind in ("t2i", "i2t", "grounding", "text"):
    _check_text(ex.text, "text")
  if ex.kind == "edit":
    _check_text(ex.instruction, "instruction")
  if ex.kind == "conditional":
    if ex.cond_type not in COND_TYPES:
      raise BadRecord("bad_cond_type", repr(ex.cond_type))
    _check_text(ex.text, "text", allow_empty=True)
    if ex.cond_type == "inpaint":
      if not isinstance(ex.mask, np.ndarray) or ex.mask.shape != ex.images[1].shape[:2]:
        raise BadRecord("bad_mask", "inpaint needs a mask of the target's (H, W)")
  if ex.kind == "image":
    _check_text(ex.text, "text", allow_empty=True)
  if ex.kind == "chat":
    _validate_conversation(ex)
  if ex.kind == "grounding":
    _validate_boxes(ex)


def _validate_conversation(ex: Example) -> None:
  turns = ex.conversation
  if not isinstance(turns, tuple) or not turns:
    raise BadRecord("bad_conversation", "no turns")
  placeholders = 0
  for i, t in enumerate(turns):
    if not isinstance(t, Turn) or t.role not in ROLES:
      raise BadRecord("bad_conversation", f"turn {i} is not a user/assistant Turn")
    _check_text(t.text, "turn_text")
    if t.role == "assistant" and IMAGE_PLACEHOLDER in t.text:
      raise BadRecord("bad_conversation", f"turn {i}: image placeholder in an assistant turn")
    placeholders += t.text.count(IMAGE_PLACEHOLDER)
  if not any(t.role == "assistant" for t in turns):
    raise BadRecord("bad_conversation", "no assistant turn to supervise")
  if placeholders != len(ex.images):
    raise BadRecord(
      "image_placeholder_mismatch", f"{placeholders} placeholder(s) for {len(ex.images)} image(s)"
    )


def _validate_boxes(ex: Example) -> None:
  b = ex.boxes
  if not isinstance(b, np.ndarray) or b.ndim != 2 or b.shape[1] != 4 or b.shape[0] < 1:
    raise BadRecord("bad_boxes", f"boxes must be (N>=1, 4); got {getattr(b, 'shape', b)!r}")
  if not np.all(np.isfinite(b)):
    raise BadRecord("bad_boxes", "non-finite box coordinate")
  if np.any(b < 0) or np.any(b > 1):
    raise BadRecord("box_out_of_range", "box coordinates must lie in [0, 1]")
  if np.any(b[:, 2] <= b[:, 0]) or np.any(b[:, 3] <= b[:, 1]):
    raise BadRecord("bad_boxes", "box with x_max <= x_min or y_max <= y_min")
  if len(ex.phrases) != len(b):
    raise BadRecord("bad_boxes", f"{len(ex.phrases)} phrase span(s) for {len(b)} box(es)")
  for s, e in ex.phrases:
    if not (isinstance(s, int) and isinstance(e, int) and 0 <= s < e <= len(ex.text)):
      raise BadRecord("bad_phrase_span", f"span ({s}, {e}) outside the caption")


def chat_pairs(ex: Example) -> list[tuple[str, str]]:
  """(question, answer) pairs of a chat example with image placeholders removed, the shape
  `puma_jax.sequence.chat` takes (its image goes before the first question). Consecutive
  turns of one speaker are joined with a newline; a conversation that starts with the
  assistant or ends with the user cannot be paired and raises BadRecord."""
  merged: list[list[str]] = []
  for t in ex.conversation:
    text = t.text.replace(IMAGE_PLACEHOLDER + "\n", "").replace(IMAGE_PLACEHOLDER, "").strip()
    if merged and merged[-1][0] == t.role:
      merged[-1][1] += "\n" + text
    else:
      merged.append([t.role, text])
  if not merged or merged[0][0] != "user" or merged[-1][0] != "assistant":
    raise BadRecord("bad_conversation", "turns must start with the user and end with the assistant")
  return [(merged[i][1], merged[i + 1][1]) for i in range(0, len(merged), 2)]

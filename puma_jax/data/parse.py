"""Raw records -> validated `Example`s, one parser per source family.

Parsers raise `BadRecord(reason)` for anything unusable; `Parser.__call__` turns that into a
`Skip` marker (never an exception), so one bad record can neither crash a run nor be trained on.
Choices made per example (t2i vs i2t, which condition to derive, which caption of several) hash
the example key with the seed, so they do not depend on read order, sharding or workers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os

import numpy as np

from puma_jax import fileio
from puma_jax.data import imaging
from puma_jax.data.schema import COND_TYPES, IMAGE_PLACEHOLDER, BadRecord, Example, Skip, Turn

# The families a source can hold ("pairs" become t2i or i2t).
PARSERS = ("pairs", "grounding", "text", "chat", "edit", "conditional", "images", "example")
_ROLE = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def key_hash(seed: int, key: str, salt: str = "") -> float:
  """A uniform number in [0, 1) from (seed, key, salt); stable across processes and runs."""
  h = hashlib.blake2b(f"{seed}|{salt}|{key}".encode(), digest_size=8).digest()
  return int.from_bytes(h, "little") / 2.0**64


def key_rng(seed: int, key: str, salt: str = "") -> np.random.Generator:
  h = hashlib.blake2b(f"{seed}|{salt}|{key}".encode(), digest_size=8).digest()
  return np.random.default_rng(int.from_bytes(h, "little"))


@dataclasses.dataclass(frozen=True)
class ParseOptions:
  seed: int = 0
  i2t_fraction: float = 0.5  # share of image-text pairs that become i2t
  cond_types: tuple = COND_TYPES  # conditions derived for the "conditional" family
  canny_low: float = 100.0
  canny_high: float = 200.0
  derive_short_side: int = 512  # images are downscaled to this short side before a
  # condition is derived (canny on 4k images is wasted)
  box_format: str = "normalized"  # grounding boxes: "normalized" [0,1] or "pixels"
  box_tolerance: float = 1e-3  # coordinates this far outside [0,1] are clipped, not bad
  max_file_bytes: int = 64 << 20  # image files larger than this are skipped, unread
  max_text_chars: int = 65_536  # longer captions / turns are skipped, documents cut


def load_image(value, rec: dict, opt: ParseOptions) -> np.ndarray:
  if value is None:
    raise BadRecord("missing_image")
  if isinstance(value, np.ndarray):
    return imaging.as_rgb_array(value)
  if isinstance(value, (bytes, bytearray, memoryview)):
    return imaging.decode_image(value)
  if isinstance(value, str):
    path = os.path.join(rec.get("__image_root__", ""), value)
    try:
      data = fileio.read_regular(path, opt.max_file_bytes)
    except fileio.NotRegularFileError as e:
      raise BadRecord("not_a_regular_file", f"{path}: {e.strerror}") from None
    except fileio.FileTooLargeError as e:
      raise BadRecord("file_too_large", f"{path}: {e.strerror}") from None
    except OSError as e:
      raise BadRecord("missing_image_file", f"{path}: {e.strerror}") from None
    return imaging.decode_image(data)
  raise BadRecord("wrong_type:image", f"image field is {type(value).__name__}")


def _capped(v: str, field: str, opt: ParseOptions, cut: bool = False) -> str:
  """A text over `opt.max_text_chars` is cut (documents) or refused (captions, instructions,
  turns) here, before it reaches the tokenizer: tokenizing megabytes per example costs
  gigabytes of memory and seconds, only for the sequence builder to drop the result."""
  if len(v) <= opt.max_text_chars:
    return v
  if cut:
    return v[: opt.max_text_chars]
  raise BadRecord(
    "text_too_long",
    f"{field} has {len(v)} characters (cap {opt.max_text_chars}, data.text.max_chars)",
  )


def _text(
  rec: dict, field: str, missing: str, opt: ParseOptions, key: str = "", cut: bool = False
) -> str:
  v = rec.get(field)
  if v is None:
    raise BadRecord(missing)
  if isinstance(v, (list, tuple)):  # several captions (COCO style): pick one per example
    v = [c for c in v if isinstance(c, str) and c.strip()]
    if not v:
      raise BadRecord(missing, "no usable caption in the list")
    v = v[int(key_hash(opt.seed, key, "caption") * len(v))]
  if not isinstance(v, str):
    raise BadRecord(f"wrong_type:{field}", f"{field} is {type(v).__name__}")
  v = _capped(v, field, opt, cut).strip()
  if not v:
    raise BadRecord(missing, f"empty {field}")
  return v


def parse_pairs(rec, key, opt: ParseOptions) -> Example:
  image = load_image(rec.get("image"), rec, opt)
  caption = _text(rec, "caption", "missing_caption", opt, key)
  kind = "i2t" if key_hash(opt.seed, key, "pair-task") < opt.i2t_fraction else "t2i"
  return Example(kind=kind, images=(image,), text=caption)


def parse_grounding(rec, key, opt: ParseOptions) -> Example:
  image = load_image(rec.get("image"), rec, opt)
  caption = _text(rec, "caption", "missing_caption", opt)
  chunks = rec.get("noun_chunks")
  if not isinstance(chunks, (list, tuple)) or not chunks:
    raise BadRecord("missing_boxes")
  spans, boxes = [], []
  for c in chunks:
    if not isinstance(c, (list, tuple)) or len(c) < 6:
      raise BadRecord("bad_boxes", f"noun chunk {c!r:.80} is not [start, end, x0, y0, x1, y1, ...]")
    s, e = c[0], c[1]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in c[:6]):
      raise BadRecord("wrong_type:noun_chunks", f"non-numeric noun chunk {c!r:.80}")
    if float(s) != int(s) or float(e) != int(e):
      raise BadRecord("bad_phrase_span", f"non-integer span ({s}, {e})")
    spans.append((int(s), int(e)))
    boxes.append([float(v) for v in c[2:6]])
  b = np.asarray(boxes, np.float64)
  if opt.box_format == "pixels":
    h, w = image.shape[:2]
    b = b / np.array([w, h, w, h], np.float64)
  elif opt.box_format != "normalized":
    raise ValueError(f"parse options: box_format {opt.box_format!r} is not normalized|pixels")
  tol = opt.box_tolerance
  if np.any(b < -tol) or np.any(b > 1 + tol):
    raise BadRecord("box_out_of_range", f"box outside the image: {b.min():.3f}..{b.max():.3f}")
  b = np.clip(b, 0.0, 1.0).astype(np.float32)
  return Example(kind="grounding", images=(image,), text=caption, boxes=b, phrases=tuple(spans))


def parse_text(rec, key, opt: ParseOptions) -> Example:
  field = "text" if "text" in rec else "caption"
  return Example(kind="text", text=_text(rec, field, "missing_text", opt, cut=True))


def parse_chat(rec, key, opt: ParseOptions) -> Example:
  conv = rec.get("conversations")
  if not isinstance(conv, (list, tuple)) or not conv:
    raise BadRecord("bad_conversation", "missing or empty 'conversations'")
  turns = []
  for i, t in enumerate(conv):
    if not isinstance(t, dict) or not isinstance(t.get("value"), str):
      raise BadRecord("bad_conversation", f"turn {i} lacks a string 'value'")
    role = _ROLE.get(t.get("from"))
    if role is None:
      raise BadRecord("bad_conversation", f"turn {i}: unknown speaker {t.get('from')!r}")
    turns.append(Turn(role, _capped(t["value"], f"turn {i}", opt).strip()))
  img = rec.get("image")
  paths = [] if img is None else list(img) if isinstance(img, (list, tuple)) else [img]
  images = tuple(load_image(p, rec, opt) for p in paths)
  if images and not any(IMAGE_PLACEHOLDER in t.text for t in turns):
    # LLaVA data always has the placeholder, but some converted sets drop it: the image then
    # goes before the first user message, where LLaVA puts it.
    first = next((i for i, t in enumerate(turns) if t.role == "user"), None)
    if first is None:
      raise BadRecord("bad_conversation", "no user turn to attach the image to")
    turns[first] = Turn("user", IMAGE_PLACEHOLDER * len(images) + "\n" + turns[first].text)
  return Example(kind="chat", images=images, conversation=tuple(turns))


def parse_edit(rec, key, opt: ParseOptions) -> Example:
  src = load_image(rec.get("source"), rec, opt)
  tgt = load_image(rec.get("target"), rec, opt)
  instr = _text(rec, "instruction", "missing_instruction", opt)
  return Example(kind="edit", images=(src, tgt), instruction=instr)


def _downscale_short_side(img: np.ndarray, short: int) -> np.ndarray:
  h, w = img.shape[:2]
  if min(h, w) <= short:
    return img
  s = short / min(h, w)
  return imaging.resize(
    img, (max(short, round(h * s)), max(short, round(w * s))), resample=imaging.Image.BICUBIC
  )


def parse_conditional(rec, key, opt: ParseOptions) -> Example:
  image = load_image(rec.get("image"), rec, opt)
  caption = rec.get("caption", "")
  if caption is None:
    caption = ""
  if not isinstance(caption, str):
    raise BadRecord("wrong_type:caption", f"caption is {type(caption).__name__}")
  caption = _capped(caption, "caption", opt)
  if not opt.cond_types:
    raise ValueError("parse options: cond_types is empty")
  cond = opt.cond_types[int(key_hash(opt.seed, key, "cond-type") * len(opt.cond_types))]
  image = _downscale_short_side(image, opt.derive_short_side)
  mask = None
  if cond == "canny":
    condition = imaging.canny_condition(image, opt.canny_low, opt.canny_high)
  elif cond == "colorize":
    condition = imaging.grayscale(image)
  elif cond == "inpaint":
    mask = imaging.inpaint_mask(*image.shape[:2], key_rng(opt.seed, key, "mask"))
    condition = imaging.apply_mask(image, mask)
  else:
    raise ValueError(f"parse options: unknown cond_type {cond!r}; choose from {COND_TYPES}")
  return Example(
    kind="conditional", images=(condition, image), text=caption.strip(), cond_type=cond, mask=mask
  )


def parse_images(rec, key, opt: ParseOptions) -> Example:
  """Images for decoder training; a caption is kept when present and well-formed."""
  image = load_image(rec.get("image"), rec, opt)
  cap = rec.get("caption")
  cap = _capped(cap, "caption", opt) if isinstance(cap, str) else ""
  return Example(kind="image", images=(image,), text=cap.strip())


def parse_example(rec, key, opt: ParseOptions) -> Example:
  """Records that already are Examples (built-in generators)."""
  if not isinstance(rec, Example):
    raise BadRecord("wrong_type:record", f"expected an Example, got {type(rec).__name__}")
  return dataclasses.replace(rec)


_FUNCS = {
  "pairs": parse_pairs,
  "grounding": parse_grounding,
  "text": parse_text,
  "chat": parse_chat,
  "edit": parse_edit,
  "conditional": parse_conditional,
  "images": parse_images,
  "example": parse_example,
}


class Parser:
  """Picklable map function: raw record -> Example or Skip. Never raises on data."""

  def __init__(self, family: str, source: str, options: ParseOptions = ParseOptions()):
    if family not in _FUNCS:
      raise ValueError(f"unknown source family {family!r}; choose from {PARSERS}")
    self.family, self.source, self.options = family, source, options

  def __call__(self, rec):
    raw_key = ""
    try:
      if isinstance(rec, Example):
        raw_key = rec.key
      elif isinstance(rec, dict):
        raw_key = str(rec.get("key", ""))
        if "__error__" in rec:
          return Skip(rec["__error__"], self.source, raw_key, str(rec.get("__detail__", "")))
      elif rec is None:
        raise BadRecord("empty_record")
      else:
        raise BadRecord("wrong_type:record", f"record is {type(rec).__name__}")
      key = f"{self.source}/{raw_key}"
      ex = _FUNCS[self.family](rec, key, self.options)
      ex.key, ex.source = key, self.source
      return ex.validate()
    except BadRecord as e:
      return Skip(e.reason, self.source, raw_key, e.detail[:300])
    except (
      KeyError,
      TypeError,
      ValueError,
      AttributeError,
      IndexError,
      OverflowError,
      UnicodeError,
      MemoryError,
    ) as e:
      # Anything a malformed record can trigger that the checks above did not foresee: count
      # it under its exception type rather than crash the run.
      if isinstance(e, ValueError) and str(e).startswith("parse options"):
        raise  # a configuration error, not a data error
      return Skip(f"unexpected:{type(e).__name__}", self.source, raw_key, str(e)[:300])

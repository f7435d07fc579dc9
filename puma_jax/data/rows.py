"""Examples (`data.schema.Example`) -> MLLM training rows (`puma_jax.sequence`).

`MLLMEncoder` is the `encode` callable of `data.pipeline.build`: every example becomes one row
of `seq_len` positions plus its images (uint8, CLIP resolution; normalized on the device).
With `data.pack` on the training split the pipeline instead packs several examples into each
row, first fit (`data.packing`, through `MLLMEncoder.packer()`), with `image_slots(seq_len)`
image slots per row.
An example that cannot be encoded (too long, too many images) raises ValueError, which the
pipeline counts as a skip.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from puma_jax import sequence as seq
from puma_jax.data.schema import IMAGE_PLACEHOLDER, Example, Turn

# example kind -> sequence kind
_KIND = {
  "t2i": "t2i",
  "i2t": "i2t",
  "grounding": "grounding",
  "text": "text",
  "chat": "chat",
  "edit": "edit",
  "conditional": "conditional",
}


def _chat(ex: Example) -> list[seq.Segment]:
  return chat_segments(ex.conversation)


def chat_segments(turns: Sequence[Turn]) -> list[seq.Segment]:
  """LLaVA-1.5 layout with the paper's system message, images where the user put `<image>`:
  `SYSTEM USER: <image>\\nQ ASSISTANT: A</s>USER: Q2 ASSISTANT: A2</s>`. Every answer but the
  last ends in its own supervised `</s>` (the last one's is `seq.build`'s), so an answer is
  always followed by `</s>`, where generation stops. Conversations ending with a user turn end
  in ` ASSISTANT:`: the inference prompt (`chat_prompt`)."""
  segs: list[seq.Segment] = [seq.Text(seq.SYSTEM_MESSAGE)]
  k = 0
  for i, turn in enumerate(turns):
    if turn.role == "user":
      segs.append(seq.Text(" USER: " if i == 0 or turns[i - 1].role == "user" else "USER: "))
      parts = turn.text.split(IMAGE_PLACEHOLDER)
      for j, part in enumerate(parts):
        if j:
          segs.append(seq.Image(k))
          k += 1
        if part:
          segs.append(seq.Text(part))
      segs.append(seq.Text(" ASSISTANT:"))
    else:
      segs.append(seq.Text(" " + turn.text, supervised=True, eos=i < len(turns) - 1))
  return segs


def chat_prompt(question: str) -> list[seq.Segment]:
  """The inference prompt of a one-image question: the training layout of the user turn
  `<image>\\n<question>` (stripped, as `parse.parse_chat` strips training turns), up to and
  including ` ASSISTANT:`, so that prompt and training tokens agree for any tokenizer."""
  return chat_segments([Turn("user", IMAGE_PLACEHOLDER + "\n" + question.strip())])


def segments(ex: Example) -> tuple[list[seq.Segment], str]:
  """The segments and the sequence kind of one example."""
  if ex.kind not in _KIND:
    raise ValueError(f"example kind {ex.kind!r} has no MLLM sequence (decoder-only data?)")
  t = ex.kind
  if t == "t2i":
    return seq.t2i(ex.text), t
  if t == "i2t":
    return seq.i2t(ex.text), t
  if t == "grounding":
    return seq.grounded_caption(ex.text, ex.phrases, ex.boxes), t
  if t == "text":
    return seq.text_only(ex.text), t
  if t == "chat":
    return _chat(ex), t
  if t == "edit":
    return seq.edit(ex.instruction), t
  return seq.conditional(ex.cond_type, ex.text), t


# [IMG] + 341 feature slots + [/IMG]: the positions one image takes in a row.
IMAGE_POSITIONS = seq.IMAGE_TOKENS + 2


def image_slots(seq_len: int) -> int:
  """Image slots of a packed row: the most images `seq_len` positions can physically hold
  (343 positions each), so the image bound never closes a row early nor rejects an example
  that fits by length; 2048 positions -> 5 slots, the tiny configs' 768 -> 2. Unused slots are
  zero images that the frozen CLIP still encodes: at most one slot's worth per row on the paper
  mix, against 2 slots for every single-example row before packing."""
  return max(1, seq_len // IMAGE_POSITIONS)


@dataclasses.dataclass
class Encoded:
  """One example's sequence arrays and its images, before it is put into a row."""

  built: seq.Built
  images: list[np.ndarray]  # uint8 (S, S, 3), CLIP resolution
  source: str = ""
  key: str = ""


class MLLMEncoder:
  """Example -> one row of arrays (see `sequence.pack`) + `images` (max_images, S, S, 3).

  `example` encodes without building a row; `packer()` returns the `RowPacker` that puts
  several encoded examples into one row (`data.packing`)."""

  def __init__(
    self,
    encode: Callable[[str], list[int]],
    special: seq.SpecialTokens,
    seq_len: int,
    max_images: int,
    image_size: int,
  ):
    self.encode, self.special = encode, special
    self.seq_len, self.max_images, self.image_size = seq_len, max_images, image_size

  def example(self, ex: Example, max_images: int | None = None) -> Encoded:
    max_images = self.max_images if max_images is None else max_images
    segs, kind = segments(ex)
    encode = self.encode
    if kind == "text":  # documents are cut to the row; everything else must fit whole
      budget = self.seq_len - 2
      encode = lambda s: self.encode(s)[:budget]
    built = seq.build(segs, encode, self.special, kind, num_images=len(ex.images))
    if len(built) > self.seq_len:
      raise ValueError(f"example of {len(built)} positions is longer than seq_len={self.seq_len}")
    if len(ex.images) > max_images:
      raise ValueError(f"{len(ex.images)} images > max_images={max_images}")
    s = self.image_size
    for i, im in enumerate(ex.images):
      if im.shape != (s, s, 3):
        raise ValueError(
          f"image {i} has shape {im.shape}; the encoder expects {(s, s, 3)} (data.image.clip_size)"
        )
    return Encoded(built, list(ex.images), ex.source, ex.key)

  def row(self, items: list[Encoded], max_images: int) -> dict[str, np.ndarray]:
    """Encoded examples -> one row of `seq_len` positions and `max_images` image slots."""
    row = seq.pack([it.built for it in items], self.seq_len, max_images, self.special.pad)
    if row.pop("packed") != len(items):
      raise ValueError(
        f"{len(items)} examples do not fit one row of {self.seq_len} positions "
        f"and {max_images} images"
      )
    s = self.image_size
    images = np.zeros((max_images, s, s, 3), np.uint8)
    k = 0
    for it in items:
      for im in it.images:
        images[k] = im
        k += 1
    row["images"] = images
    return row

  def __call__(self, ex: Example) -> dict[str, np.ndarray]:
    return self.row([self.example(ex)], self.max_images)

  def packer(self) -> RowPacker:
    return RowPacker(self)


class RowPacker:
  """The `data.packing` packer of MLLM rows: budgets are positions and image slots."""

  def __init__(self, encoder: MLLMEncoder):
    self.encoder = encoder
    self.image_slots = image_slots(encoder.seq_len)
    self.capacity = (encoder.seq_len, self.image_slots)

  def encode(self, ex: Example) -> Encoded:
    return self.encoder.example(ex, self.image_slots)

  def size(self, item: Encoded) -> tuple[int, int]:
    return len(item.built), len(item.images)

  def row(self, items: list[Encoded]) -> dict[str, np.ndarray]:
    return self.encoder.row(items, self.image_slots)


def fit_report(
  dcfg, encode: Callable[[str], list[int]], special: seq.SpecialTokens, sample: int = 16
) -> dict[str, dict]:
  """The row sizes the examples of each active source need: the first `sample` usable
  examples of every source are built exactly as in training. Returns source -> sequence kind ->
  {"positions": [...], "images": [...]} (documents, which are cut to the row, count 0).

  The one place that measures whether a sequence kind of the mix can be trained: the config check
  (`check_fit`) reads it, and so can anything that sizes rows (packing)."""
  from puma_jax.data import parse, pipeline

  out: dict[str, dict] = {}
  for name, scfg in pipeline.active_sources(dcfg).items():
    reader = pipeline.open_source(name, scfg, dcfg, "train")
    parser = parse.Parser(scfg.family, name, pipeline.parse_options(dcfg, scfg))
    kinds: dict[str, dict] = {}
    seen = 0
    for i in range(min(len(reader), 8 * sample)):
      ex = parser(reader[i])
      if not isinstance(ex, Example):
        continue
      segs, kind = segments(ex)
      n = (
        0
        if kind == "text"
        else len(seq.build(segs, encode, special, kind, num_images=len(ex.images)))
      )
      t = kinds.setdefault(kind, {"positions": [], "images": []})
      t["positions"].append(n)
      t["images"].append(len(ex.images))
      seen += 1
      if seen >= sample:
        break
    out[name] = kinds
  return out


def check_fit(report: dict[str, dict], seq_len: int, max_images: int) -> list[str]:
  """Warnings, one per (source, sequence kind) of which no sampled example fits a row of
  `seq_len` positions and `max_images` images: it would be skipped every time it comes round,
  i.e. never trained."""
  warnings = []
  for name, kinds in report.items():
    for kind, t in sorted(kinds.items()):
      pos, imgs = t["positions"], t["images"]
      if not pos or any(p <= seq_len and k <= max_images for p, k in zip(pos, imgs)):
        continue
      why = (
        f"needs {min(pos)}..{max(pos)} positions > seq_len={seq_len}"
        if min(pos) > seq_len
        else f"needs {max(imgs)} images > data.max_images={max_images}"
      )
      warnings.append(
        f"data.sources.{name}: sequence kind {kind!r} never fits a row: none of "
        f"{len(pos)} sampled examples fit ({why}); raise seq_len / "
        "data.max_images or give the source weight 0"
      )
  return warnings

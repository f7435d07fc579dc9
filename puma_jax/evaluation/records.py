"""Evaluation records: local jsonl files (image paths) or the built-in synthetic held-out set.

jsonl, one record per line (relative image paths are resolved against the file's directory):
  reconstruction  {"id", "image"}
  text_to_image   {"id", "caption", "image"}                 (COCO: caption + reference image)
  editing         {"id", "source", "instruction", "target_caption"[, "source_caption"]}
  understanding   {"id", "image", "question", "answer", "kind": "short"|"choice"|"yes_no",
                   "options": {"A": ...} (choice), "category", "image_id" (yes_no)}
                  "answer" may be a list of references for short answers (VQAv2's ten).
An "id" is optional (the line number is used). Images stay paths until an evaluator loads them,
so a missing or unreadable file is a per-item skip counted in the results, not a crash.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np

from puma_jax.data import imaging, synthetic

PROTOCOLS = ("reconstruction", "text_to_image", "editing", "understanding")
REQUIRED = {
  "reconstruction": ("image",),
  "text_to_image": ("caption", "image"),
  "editing": ("source", "instruction", "target_caption"),
  "understanding": ("image", "question", "answer", "kind"),
}
IMAGE_FIELDS = ("image", "source")


class EvalDataError(ValueError):
  """A dataset that cannot be evaluated at all (empty, malformed line, unknown protocol)."""


class ItemSkip(Exception):
  """One record that cannot be scored; `reason` is the key counted in the results."""

  def __init__(self, reason: str, detail: str = ""):
    super().__init__(f"{reason}: {detail}" if detail else reason)
    self.reason = reason


def read_jsonl(path: str, protocol: str) -> list[dict]:
  path = Path(path)
  if not path.exists():
    raise EvalDataError(f"{protocol}: records file {path} does not exist")
  root = path.parent
  out = []
  for n, line in enumerate(path.read_text().splitlines(), 1):
    if not line.strip():
      continue
    try:
      rec = json.loads(line)
    except json.JSONDecodeError as e:
      raise EvalDataError(f"{path}:{n}: not JSON ({e.msg})") from None
    if not isinstance(rec, dict):
      raise EvalDataError(f"{path}:{n}: a record must be a JSON object, got {type(rec).__name__}")
    missing = [f for f in REQUIRED[protocol] if f not in rec]
    if missing:
      raise EvalDataError(f"{path}:{n}: {protocol} record lacks field(s) {missing}")
    for f in IMAGE_FIELDS:
      if isinstance(rec.get(f), str) and not Path(rec[f]).is_absolute():
        rec[f] = str(root / rec[f])
    rec.setdefault("id", f"{path.name}:{n}")
    out.append(rec)
  return out


def load_image(value, size: int | None = None, mixed_sizes: str = "resize") -> np.ndarray:
  """A path or an array -> uint8 HWC RGB. With `size`: "resize" center-crops and resizes to
  size x size; "skip" raises ItemSkip("mixed_sizes") for an image of another size."""
  if isinstance(value, np.ndarray):
    img = value
  else:
    p = Path(str(value))
    if not p.exists():
      raise ItemSkip("missing_image", str(p))
    try:
      img = imaging.decode_image(p.read_bytes())
    except Exception as e:  # PIL raises several types for corrupt files
      raise ItemSkip("unreadable_image", f"{p}: {e}") from None
  img = imaging.as_rgb_array(img)
  if size is None or img.shape[:2] == (size, size):
    return img
  if mixed_sizes == "skip":
    raise ItemSkip("mixed_sizes", f"{img.shape[1]}x{img.shape[0]}, expected {size}x{size}")
  return imaging.resize(imaging.center_crop(img), size)


# ----------------------------------------------------------------------------------------------
# Synthetic held-out records (CPU runs)


def _source(family: str, cfg):
  return synthetic.SyntheticSource(
    family,
    "eval",
    seed=int(cfg.seed),
    image_size=int(cfg.size),
    num_train=int(cfg.num_train),
    num_eval=int(cfg.num_items),
  )


def synthetic_records(protocol: str, cfg) -> list[dict]:
  """`cfg`: seed, size, num_train, num_items (the synthetic set's held-out scenes)."""
  if protocol == "reconstruction":
    src = _source("pairs", cfg)
    return [{"id": r["key"], "image": r["image"]} for r in (src[i] for i in range(len(src)))]
  if protocol == "text_to_image":
    src = _source("pairs", cfg)
    return [
      {"id": r["key"], "caption": r["caption"], "image": r["image"]}
      for r in (src[i] for i in range(len(src)))
    ]
  if protocol == "editing":
    src = _source("edit", cfg)
    out = []
    for i in range(len(src)):
      r, sid = src[i], int(src.ids[i])
      scene = synthetic.make_scene(src.seed, sid)
      # The same draw SyntheticSource made, to recover the target scene's caption.
      rng = np.random.default_rng([src.seed, sid, synthetic.FAMILIES.index("edit")])
      target, instr = synthetic.edit(scene, rng)
      assert instr == r["instruction"]
      out.append(
        {
          "id": r["key"],
          "source": r["source"],
          "instruction": instr,
          "target_caption": synthetic.caption(target)[0],
          "source_caption": synthetic.caption(scene)[0],
        }
      )
    return out
  if protocol == "understanding":
    return _understanding(_source("chat", cfg))
  raise EvalDataError(f"unknown eval protocol {protocol!r}; choose from {PROTOCOLS}")


def _understanding(src) -> list[dict]:
  """Per held-out scene: its first chat question (short answer), a background-colour multiple
  choice, and an MME-style yes/no pair (one true, one false statement about the same image)."""
  out = []
  for i in range(len(src)):
    r, sid = src[i], int(src.ids[i])
    scene = synthetic.make_scene(src.seed, sid)
    img = r["image"]
    q = r["conversations"][0]["value"].replace("<image>\n", "")
    out.append(
      {
        "id": f"{r['key']}:short",
        "image": img,
        "question": q,
        "answer": r["conversations"][1]["value"],
        "kind": "short",
      }
    )
    opts = dict(zip("ABC", synthetic.BACKGROUNDS))
    answer = "ABC"[synthetic.BACKGROUNDS.index(scene.background)]
    out.append(
      {
        "id": f"{r['key']}:choice",
        "image": img,
        "kind": "choice",
        "options": opts,
        "question": "What colour is the background?",
        "answer": answer,
      }
    )
    other = [b for b in synthetic.BACKGROUNDS if b != scene.background]
    wrong = other[zlib.crc32(r["key"].encode()) % len(other)]
    for bg, ans in ((scene.background, "yes"), (wrong, "no")):
      out.append(
        {
          "id": f"{r['key']}:yn_{bg}",
          "image": img,
          "kind": "yes_no",
          "question": f"Is the background {bg}? Please answer yes or no.",
          "answer": ans,
          "category": "color",
          "image_id": r["key"],
        }
      )
  return out


def load_records(protocol: str, data_cfg) -> list[dict]:
  if protocol not in PROTOCOLS:
    raise EvalDataError(f"unknown eval protocol {protocol!r}; choose from {PROTOCOLS}")
  if data_cfg.source == "synthetic":
    recs = synthetic_records(protocol, data_cfg.synthetic)
  elif data_cfg.source == "jsonl":
    if not data_cfg.path:
      raise EvalDataError(f"{protocol}: data.source='jsonl' needs data.path")
    recs = read_jsonl(data_cfg.path, protocol)
  else:
    raise EvalDataError(f"data.source={data_cfg.source!r}; choose synthetic or jsonl")
  if not recs:
    raise EvalDataError(
      f"{protocol}: the dataset is empty ({data_cfg.source}"
      f"{': ' + str(data_cfg.path) if data_cfg.source == 'jsonl' else ''})"
    )
  ids = [str(r["id"]) for r in recs]
  if len(set(ids)) != len(ids):
    dup = next(i for i in ids if ids.count(i) > 1)
    raise EvalDataError(
      f"{protocol}: record id {dup!r} occurs more than once (ids key the resume files)"
    )
  return recs

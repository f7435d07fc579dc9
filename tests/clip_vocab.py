"""A tiny CLIP BPE vocabulary (vocab.json + merges.txt) for tokenizer tests, built here."""

from __future__ import annotations

import json
from pathlib import Path

MERGES = [
  ("a", "t</w>"),
  ("c", "at</w>"),
  ("d", "o"),
  ("do", "g</w>"),
  ("p", "h"),
  ("ph", "o"),
  ("t", "o</w>"),
  ("pho", "to</w>"),
  ("o", "f</w>"),
]


def byte_chars() -> list[str]:
  """The 256 printable stand-ins for bytes used by byte-level BPE (GPT-2 / CLIP convention)."""
  keep = (
    list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
  )
  chars, extra = [], 0
  for b in range(256):
    if b in keep:
      chars.append(chr(b))
    else:
      chars.append(chr(256 + extra))
      extra += 1
  return chars


def write(path: Path) -> dict[str, int]:
  """Writes vocab.json and merges.txt; the two special tokens get the highest ids (as in CLIP,
  where end-of-text is the largest id)."""
  path.mkdir(parents=True, exist_ok=True)
  tokens = byte_chars() + [c + "</w>" for c in byte_chars()]
  tokens += ["".join(m) for m in MERGES]
  tokens += ["<|startoftext|>", "<|endoftext|>"]
  vocab = {t: i for i, t in enumerate(tokens)}
  (path / "vocab.json").write_text(json.dumps(vocab))
  (path / "merges.txt").write_text(
    "#version: 0.2\n" + "\n".join(" ".join(m) for m in MERGES) + "\n"
  )
  return vocab

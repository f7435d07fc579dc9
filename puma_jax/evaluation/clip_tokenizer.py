"""The CLIP BPE tokenizer from local files (vocab.json + merges.txt), for CLIP-T.

Uses transformers' `CLIPTokenizer` on a local directory (never the network). `tokenize` pads to
`max_length` (77 for CLIP) and truncates overlong captions keeping the end-of-text token, which
is where the text tower pools.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

REQUIRED = ("vocab.json", "merges.txt")


def load(path):
  path = Path(path)
  missing = [n for n in REQUIRED if not (path / n).exists()]
  if missing:
    raise FileNotFoundError(
      f"CLIP tokenizer: {path} lacks {missing} (copy them from the HF CLIP "
      "directory; `python -m puma_jax.convert clip` does it)"
    )
  from transformers import CLIPTokenizer

  return CLIPTokenizer.from_pretrained(str(path), local_files_only=True)


def tokenize(
  tokenizer, texts: Sequence[str], max_length: int = 77
) -> tuple[np.ndarray, np.ndarray]:
  """-> (input_ids, attention_mask), int32 arrays of shape (len(texts), max_length)."""
  if isinstance(texts, str):
    raise TypeError("tokenize expects a list of strings, not one string")
  enc = tokenizer(
    list(texts),
    padding="max_length",
    truncation=True,
    max_length=max_length,
    return_attention_mask=True,
  )
  return (np.asarray(enc["input_ids"], np.int32), np.asarray(enc["attention_mask"], np.int32))

"""Choosing the output scale automatically (the reviews' request; the paper used an oracle).

Two levels:
  * per sequence kind (default): `sequence.KIND_SCALE` — coarse f3 for text-to-image
    (diversity), f1 for editing, f0 for conditional generation and reconstruction-like tasks
    (keep the layout);
    inpainting and colorization keep f0, canny-to-image uses f1.
  * learned: a PumaModel built with `router=True` scores the five scales from the hidden state
    at `[IMG]`; it is trained with the rest (cross-entropy against the kind's default, or
    against per-example labels a data source provides, e.g. from an offline quality oracle).
"""

from __future__ import annotations

import numpy as np

from puma_jax.models.pooling import SCALE_NAMES
from puma_jax.sequence import KIND_SCALE

COND_SCALE = {"canny": 1, "inpaint": 0, "colorize": 0}


def default_scale(kind: str, cond_type: str | None = None) -> str:
  """The output scale of a sequence kind (`sequence.KINDS`) that generates an image."""
  if kind == "conditional" and cond_type in COND_SCALE:
    return SCALE_NAMES[COND_SCALE[cond_type]]
  if kind not in KIND_SCALE:
    raise ValueError(
      f"no default output scale for sequence kind {kind!r}; kinds that generate "
      f"images: {sorted(KIND_SCALE)}"
    )
  return SCALE_NAMES[KIND_SCALE[kind]]


def choose(kind: str, router_logits=None, cond_type: str | None = None) -> list[str]:
  """One scale name per example: the learned router's argmax when the model has one, else the
  kind's default (router_logits None)."""
  if router_logits is None:
    raise ValueError("choose() needs router logits or a batch size; use default_scale()")
  logits = np.asarray(router_logits)
  if logits.ndim != 2 or logits.shape[1] != len(SCALE_NAMES):
    raise ValueError(f"router logits must be (batch, 5); got {logits.shape}")
  return [SCALE_NAMES[int(i)] for i in logits.argmax(-1)]
